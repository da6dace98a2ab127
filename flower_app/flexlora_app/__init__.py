"""flexlora's Flower App: ``server_app`` and ``client_app`` are thin shells over :mod:`flexlora.flower`."""

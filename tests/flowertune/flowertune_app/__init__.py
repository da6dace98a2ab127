"""A FlowerTune-shaped Flower App for the tests (the structure of Flower's examples/flowertune-llm,
written here): a ClientApp that builds its PEFT model, loads the global with
``set_peft_model_state_dict``, trains with its own loop and replies with ``get_peft_model_state_dict``;
a ServerApp that runs FedAvg and saves the global into its own PEFT model in ``evaluate_fn``.
``client_app_flexlora`` and the ``strategy = "flexlora"`` branch of the server are the diff a
FlowerTune user applies to adopt FlexLoRA (README, "Use FlexLoRA in your Flower app")."""

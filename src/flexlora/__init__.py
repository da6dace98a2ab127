"""flexlora: federated fine-tuning of LLMs when clients train LoRA adapters of different ranks.

The aggregation core (:mod:`flexlora.lowrank`, :mod:`flexlora.update`, :mod:`flexlora.methods`,
:mod:`flexlora.diagnostics`) is plain torch; PEFT, transformers and Flower live in the layers
around it.
"""

__version__ = "0.1.0"

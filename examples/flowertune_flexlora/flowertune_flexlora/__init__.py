"""A FlowerTune-style app: HF transformers + PEFT clients at their own LoRA ranks, FlexLoRA on the server."""

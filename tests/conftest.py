"""Shared fixtures: a real (byte-level BPE) tokenizer trained in-process and a tiny random Llama that
matches its vocabulary -- no download, a fraction of a second to build."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "The quick brown fox jumps over the lazy dog. A cat sat on the mat.",
    "Translate the sentence into French. Answer the question with yes or no.",
    "Classify the sentiment of the review as positive or negative. Summarize the article in one sentence.",
    "What is the capital of France? Paris is the capital of France. The answer is 42.",
]

# A ChatML-style template (as SmolLM2's), so the "chat" prompt format can be exercised.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with <pad>=0, <s>=1, </s>=2 and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer) -> LlamaForCausalLM:
    """A 2-layer random Llama over ``tiny_tokenizer``'s vocabulary, in eval mode. Treat as read-only
    (``copy.deepcopy`` it before changing weights)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # peakier logits than the default 0.02: varied outputs, no near-ties in argmax
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def private_flwr_home(tmp_path, monkeypatch):
    """Flower keeps its state under FLWR_HOME: a test's own, never the user's."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


@pytest.fixture(scope="module")
def restore_torch_threads():
    """Flower code paths set torch's thread count (model.threads); put it back after the module."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)

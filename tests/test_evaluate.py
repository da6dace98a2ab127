import copy
import json
import math
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from rouge_score import rouge_scorer

import flexlora.evaluate as ev
from flexlora.config import EvalConfig
from flexlora.data.prompts import encode_prompt
from flexlora.data.types import ClientData, Example
from flexlora.evaluate import evaluate_clients, generate, generate_with_counts, rouge_l, teacher_forced

# Prompts of clearly different lengths, so batches need padding.
EXAMPLES = [
    Example("Translate the sentence into French.", "The cat sat on the mat." * k, "Le chat est sur le tapis.") for k in range(1, 4)
] + [
    Example("Answer the question with yes or no.", "", "yes"),
    Example("What is the capital of France?", "France", "Paris is the capital of France."),
    Example("Classify the sentiment of the review as positive or negative.", "A lazy dog. " * 5, "negative"),
    Example("Summarize the article in one sentence.", "The quick brown fox jumps over the lazy dog.", "A fox jumps."),
]


# ------------------------------------------------------------------------------------------- Rouge-L


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _lcs_f(pred: str, ref: str) -> float:
    p, r = re.findall(r"[a-z0-9]+", pred.lower()), re.findall(r"[a-z0-9]+", ref.lower())
    lcs = _lcs(p, r)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 100 * 2 * precision * recall / (precision + recall)


# Words of <= 3 letters are never stemmed, so a plain LCS must agree exactly.
SIMPLE = [
    ("a b c d", "a c d e", 75.0),
    ("the cat sat on the mat", "the cat sat on the mat", 100.0),
    ("the cat sat on a mat", "a cat was on the mat", None),
    ("yes", "no", 0.0),
    ("", "the cat", 0.0),
    ("The CAT, sat!", "the cat sat", 100.0),
    ("x y z x y z", "z y x", None),
]


@pytest.mark.parametrize("pred, ref, expected", SIMPLE)
def test_rouge_l_matches_independent_lcs(pred, ref, expected):
    assert rouge_l(pred, ref) == pytest.approx(_lcs_f(pred, ref), abs=1e-9)
    if expected is not None:
        assert rouge_l(pred, ref) == pytest.approx(expected)


@pytest.mark.parametrize(
    "pred, ref",
    [(p, r) for p, r, _ in SIMPLE]
    + [
        ("The dogs were running quickly", "a dog runs quickly"),
        ("positive", "Positive."),
        ("Paris is the capital of France.", "The capital of France is Paris"),
    ],
)
def test_rouge_l_matches_rouge_score(pred, ref):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rouge_l(pred, ref) == pytest.approx(100 * scorer.score(ref, pred)["rougeL"].fmeasure)


def test_unicode_tokenizer_agrees_on_ascii_and_keeps_other_scripts():
    for pred, ref in [("running_fast dogs", "the dog runs fast"), ("Hello, World! 123", "hello world 1234"), ("a-b c_d", "a b c d")]:
        assert rouge_l(pred, ref, "unicode") == pytest.approx(rouge_l(pred, ref, "default"))
    urdu = "مجھے یقین ہے کہ اس دورے سے"
    assert rouge_l(urdu, urdu) == 0.0  # rouge-score's default tokenizer drops non-ASCII text
    assert rouge_l(urdu, urdu, "unicode") == pytest.approx(100.0)
    assert rouge_l("café au lait", "café noir", "unicode") == pytest.approx(100 * 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    # Han characters are one token each: 2 of 4 characters in common, in order.
    assert rouge_l("我爱北京", "我在北方", "unicode") == pytest.approx(50.0)


# --------------------------------------------------------------------------------------- aggregation


def _client(cid, category, weight, outputs, prefix="right"):
    return ClientData(
        client_id=cid, category=category, train=[], num_train_full=weight,
        eval=[Example("task", f"{tag}{i}", "alpha beta gamma") for i, tag in enumerate(outputs)],
    )


def test_weighting_by_data_size_and_per_category(monkeypatch, tiny_model, tiny_tokenizer):
    # A prediction is right (Rouge-L 100) when the input says so, else wrong (0).
    def fake(model, tokenizer, examples, cfg, on_batch=None):
        return ["alpha beta gamma" if ex.input.startswith("right") else "zzz" for ex in examples], [0] * len(examples)

    monkeypatch.setattr(ev, "generate_with_counts", fake)
    clients = [
        _client(1, "A", 10, ["right", "wrong"]),  # 50
        _client(2, "A", 30, ["right"]),  # 100
        _client(3, "B", 60, ["wrong", "right", "right", "wrong"]),  # capped to 3: 66.67
        _client(4, "B", 100, []),  # no examples: listed, excluded from averages
    ]
    res = evaluate_clients(tiny_model, tiny_tokenizer, clients, EvalConfig(examples_per_client=3), progress=False)
    assert res.rouge_l_weighted == pytest.approx((10 * 50 + 30 * 100 + 60 * 200 / 3) / 100)  # 75
    assert res.rouge_l_mean == pytest.approx((50 + 100 + 200 / 3) / 3)
    assert [r["rouge_l"] for r in res.per_client] == [pytest.approx(50), pytest.approx(100), pytest.approx(200 / 3), None]
    assert [r["n_examples"] for r in res.per_client] == [2, 1, 3, 0]
    assert [r["weight"] for r in res.per_client] == [10, 30, 60, 100]
    assert res.num_examples == 6
    assert res.per_category["A"] == {
        "rouge_l_weighted": pytest.approx(87.5), "rouge_l_mean": pytest.approx(75.0), "num_clients": 2, "num_examples": 3
    }
    assert res.per_category["B"] == {
        "rouge_l_weighted": pytest.approx(200 / 3), "rouge_l_mean": pytest.approx(200 / 3), "num_clients": 1, "num_examples": 3
    }
    assert res.proxy_eval_loss is None and res.proxy_teacher_forced_rouge_l_weighted is None
    # every example's score is kept (the averages above are made from them), and each figure has its interval
    assert [r["example_rouge_l"] for r in res.per_client] == [[100, 0], [100], [0, 100, 100], []]
    assert res.per_client[0]["examples_digest"] != res.per_client[1]["examples_digest"]
    low, high = res.intervals["rouge_l_weighted"]
    assert low <= res.rouge_l_weighted <= high and res.intervals["interval"]["units"] == 3
    json.dumps(res.to_dict())


def test_zero_weights_fall_back_to_plain_mean(monkeypatch, tiny_model, tiny_tokenizer):
    monkeypatch.setattr(ev, "generate_with_counts", lambda m, t, exs, cfg, on_batch=None: (["alpha beta gamma", "zzz"], [0, 0]))
    clients = [_client(1, "A", 0, ["x"]), _client(2, "A", 0, ["y"])]
    res = evaluate_clients(tiny_model, tiny_tokenizer, clients, EvalConfig(), progress=False)
    assert res.rouge_l_weighted == pytest.approx(50.0) == res.rouge_l_mean


def test_no_examples_is_an_error(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="no client has examples"):
        evaluate_clients(tiny_model, tiny_tokenizer, [_client(1, "A", 5, [])], EvalConfig(split="test"), progress=False)


def test_config_is_validated():
    with pytest.raises(ValueError):
        EvalConfig(split="train")
    with pytest.raises(ValueError):
        EvalConfig(batch_size=0)


# ---------------------------------------------------------------------------------------- generation


def _greedy_reference(model, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """Token by token, no cache, no padding: what greedy decoding means."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            new.append(token)
            ids.append(token)
            if token == eos:
                break
    return new


@pytest.fixture(scope="module")
def eos_prone_model(tiny_model, tiny_tokenizer):
    """The tiny model with the EOS row of lm_head boosted, so generations stop at different lengths."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        w = model.lm_head.weight
        w[tiny_tokenizer.eos_token_id] = w[tiny_tokenizer.eos_token_id] + 0.6 * w.mean(0) / w.mean(0).norm() * w.norm(dim=1).mean()
    return model


def test_batched_generation_equals_one_at_a_time(eos_prone_model, tiny_tokenizer):
    cfg = EvalConfig(max_new_tokens=10, batch_size=4)
    prompts = ev.encode_prompts(tiny_tokenizer, EXAMPLES, cfg)
    assert len({len(p) for p in prompts}) == len(prompts)  # every batch is padded
    batched = ev._generate_ids(eos_prone_model, tiny_tokenizer, prompts, cfg)
    single = ev._generate_ids(eos_prone_model, tiny_tokenizer, prompts, EvalConfig(max_new_tokens=10, batch_size=1))
    reference = [_greedy_reference(eos_prone_model, p, 10, tiny_tokenizer.eos_token_id) for p in prompts]
    assert batched == single == reference
    lengths = [len(ids) for ids in batched]
    assert min(lengths) < 10 and max(lengths) == 10, lengths  # both early EOS and the cap occur
    texts, counts = generate_with_counts(eos_prone_model, tiny_tokenizer, EXAMPLES, cfg)
    assert counts == lengths
    assert texts == [tiny_tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in reference]
    assert generate(eos_prone_model, tiny_tokenizer, EXAMPLES, cfg) == texts


def test_batched_generation_chat_template_and_no_pad_token(tiny_model, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None  # falls back to padding with EOS (masked out)
    cfg = EvalConfig(template="chat", max_new_tokens=6, batch_size=3)
    assert generate(tiny_model, tok, EXAMPLES, cfg) == generate(tiny_model, tok, EXAMPLES, EvalConfig(template="chat", max_new_tokens=6, batch_size=1))


def test_padding_side_and_training_flag_restored(tiny_model, tiny_tokenizer):
    model = copy.deepcopy(tiny_model).train()
    clients = [ClientData(client_id=1, category="A", train=[], eval=EXAMPLES[:3], num_train_full=3)]
    cfg = EvalConfig(max_new_tokens=3, batch_size=2, teacher_forced=True)
    try:
        for side in ("right", "left"):
            tiny_tokenizer.padding_side = side
            evaluate_clients(model, tiny_tokenizer, clients, cfg, progress=False)
            assert tiny_tokenizer.padding_side == side
            assert model.training
    finally:
        tiny_tokenizer.padding_side = "right"


# ------------------------------------------------------------------------------------------- proxies


def _tf_reference(model, tokenizer, examples, cfg):
    """Per example, unbatched, full logits: argmax and cross-entropy at the response positions."""
    out = []
    with torch.no_grad():
        for ex in examples:
            prompt = encode_prompt(tokenizer, ex, cfg.template, cfg.max_prompt_tokens)
            response = (tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[: cfg.max_new_tokens]
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : len(prompt) + len(response) - 1]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(response), reduction="sum")
            pred = tokenizer.decode(logits.argmax(-1).tolist(), skip_special_tokens=True).strip()
            ref = tokenizer.decode(response, skip_special_tokens=True).strip()
            out.append((pred, float(loss), len(response), rouge_l(pred, ref)))
    return out


def _check_tf(model, tokenizer, cfg):
    expected = _tf_reference(model, tokenizer, EXAMPLES, cfg)
    for full in (False, True):
        got = teacher_forced(model, tokenizer, EXAMPLES, cfg, full_logits=full)
        assert [g["prediction"] for g in got] == [e[0] for e in expected]
        assert [g["num_tokens"] for g in got] == [e[2] for e in expected]
        assert [g["loss_sum"] for g in got] == pytest.approx([e[1] for e in expected], rel=1e-4)
        assert [g["rouge_l"] for g in got] == pytest.approx([e[3] for e in expected])
    return expected


def test_teacher_forced_proxy_matches_full_logits_reference(tiny_model, tiny_tokenizer):
    assert ev._plain_head_parts(tiny_model) is not None  # the fast path is the one under test
    cfg = EvalConfig(max_new_tokens=5, batch_size=3)  # the cap truncates some responses
    expected = _check_tf(tiny_model, tiny_tokenizer, cfg)
    assert any(n == 5 for _, _, n, _ in expected) and any(n < 5 for _, _, n, _ in expected)


def test_peft_model_generation_and_proxies(tiny_model, tiny_tokenizer):
    peft_model = get_peft_model(
        copy.deepcopy(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    assert ev._plain_head_parts(peft_model) is not None
    cfg = EvalConfig(max_new_tokens=6, batch_size=3)
    expected = _check_tf(peft_model, tiny_tokenizer, cfg)
    base = _tf_reference(tiny_model, tiny_tokenizer, EXAMPLES, cfg)
    assert [e[1] for e in expected] != pytest.approx([b[1] for b in base], rel=1e-3)  # the adapter is applied
    assert generate(peft_model, tiny_tokenizer, EXAMPLES, cfg) == generate(peft_model, tiny_tokenizer, EXAMPLES, EvalConfig(max_new_tokens=6, batch_size=1))


def test_evaluate_clients_end_to_end_with_proxies(tiny_model, tiny_tokenizer):
    clients = [
        ClientData(client_id=7, category="Translation", train=[], eval=EXAMPLES[:4], num_train_full=40),
        ClientData(client_id=8, category="QA", train=[Example("t", "", "o")] * 3, eval=EXAMPLES[4:]),
    ]
    cfg = EvalConfig(max_new_tokens=4, batch_size=3, teacher_forced=True, eval_loss=True)
    res = evaluate_clients(tiny_model, tiny_tokenizer, clients, cfg, progress=True)
    tf = teacher_forced(tiny_model, tiny_tokenizer, EXAMPLES, cfg)
    losses = [sum(t["loss_sum"] for t in part) / sum(t["num_tokens"] for t in part) for part in (tf[:4], tf[4:])]
    tf_rouge = [sum(t["rouge_l"] for t in part) / len(part) for part in (tf[:4], tf[4:])]
    assert [r["proxy_eval_loss"] for r in res.per_client] == pytest.approx(losses)
    assert [sum(r["example_loss_sum"]) / sum(r["example_tokens"]) for r in res.per_client] == pytest.approx(losses)
    assert res.intervals["proxy_eval_loss"][0] <= res.proxy_eval_loss <= res.intervals["proxy_eval_loss"][1]
    assert [r["proxy_teacher_forced_rouge_l"] for r in res.per_client] == pytest.approx(tf_rouge)
    assert res.proxy_eval_loss == pytest.approx((40 * losses[0] + 3 * losses[1]) / 43)
    assert res.proxy_teacher_forced_rouge_l_weighted == pytest.approx((40 * tf_rouge[0] + 3 * tf_rouge[1]) / 43)
    assert math.isfinite(res.rouge_l_weighted) and 0 <= res.rouge_l_weighted <= 100
    assert res.num_examples == len(EXAMPLES) and 0 < res.generated_tokens <= 4 * len(EXAMPLES)
    assert set(res.per_category) == {"Translation", "QA"}
    d = res.to_dict()
    json.dumps(d)
    assert d["config"]["teacher_forced"] is True and d["seconds"] > 0

"""FlexLoRAStrategy (src/flexlora/flower/strategy.py): Flower's own ``Strategy.start`` loop over the
in-process grid (real Messages through Flower's protobuf serialisation), with real PEFT state dicts
of a tiny Llama at different ranks as the nodes' replies."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

from flexlora.flower.payloads import arrays_to_tensors, tensors_to_arrays  # noqa: E402
from flexlora.flower.strategy import FlexLoRAStrategy, lora_settings  # noqa: E402
from flexlora.methods import get_method  # noqa: E402
from flexlora.peft_io import factors_from_state_dict, peft_key, read_adapter  # noqa: E402
from flexlora.update import ClientUpdate  # noqa: E402
from flower_local import LocalGrid  # noqa: E402
from tiny import TARGETS, tiny_llama  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
DECLARED = {"r": 4, "lora_alpha": 16}


def _benchmark(name: str):
    """A module of benchmarks/ (the transport-error measurement lives there, not in the Strategy)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TransportProbe = _benchmark("transport_error").TransportProbe

MLP = ("gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("private_flwr_home")


def lora(r: int, r_mlp: int | None = None, alpha: float = 16, rslora: bool = False) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, rank_pattern={m: r_mlp for m in MLP} if r_mlp else {}, lora_dropout=0.0, use_rslora=rslora)


def peft_state(cfg: LoraConfig, seed: int | None) -> dict[str, torch.Tensor]:
    """A real PEFT LoRA state dict (get_peft_model_state_dict); ``seed``: random trained-like factors, None: fresh."""
    model = get_peft_model(tiny_llama(0), cfg)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


class Nodes:
    """A stand-in ClientApp: each node replies with a fixed PEFT state dict (and records what it got)."""

    def __init__(self, replies: dict, answers_query: bool = True) -> None:
        self.replies = replies  # node -> callable(round) -> (state dict, lora settings | None, num examples) or an exception
        self.answers_query = answers_query
        self.received: dict[int, list[tuple[str, dict, dict]]] = {}

    def __call__(self, msg: Message, context) -> Message:
        node = context.node_id
        conf = dict(msg.content["config"])
        if msg.metadata.message_type == "query":
            if not self.answers_query:
                raise RuntimeError("no query handler")
            _, settings, _ = self.replies[node](0)
            if settings is None:
                raise RuntimeError("this node does not know its LoRA config")
            return Message(RecordDict({"config": ConfigRecord({"lora-config": json.dumps(settings)})}), reply_to=msg)
        shapes = {k: tuple(t.shape) for k, t in arrays_to_tensors(msg.content["arrays"], conf.get("transport-dtype", "float32")).items()}
        self.received.setdefault(node, []).append((msg.metadata.message_type, conf, shapes))
        out = self.replies[node](int(conf["server-round"]))
        if isinstance(out, Exception):
            raise out
        sd, settings, n = out
        transport = conf.get("transport-dtype", "float32")  # a client replies in the dtype it was sent
        content = {"arrays": tensors_to_arrays(sd, transport), "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})}
        reply_conf = {"transport-dtype": transport} if transport != "float32" else {}
        if settings is not None:
            reply_conf["lora-config"] = json.dumps(settings)
        if reply_conf:
            content["config"] = ConfigRecord(reply_conf)
        return Message(RecordDict(content), reply_to=msg)


def fixed(sd, settings, n):
    return lambda rnd: (sd, settings, n)


def run(strategy, nodes: Nodes, rounds: int = 1):
    grid = LocalGrid(nodes, {n: {} for n in nodes.replies})
    init = ArrayRecord(peft_state(lora(4), None))
    return strategy.start(grid, init, num_rounds=rounds, timeout=60), grid


def core_updates(node_replies: dict, order: list | None = None) -> list[ClientUpdate]:
    """What the core method is given for the same replies (in ``order``, default node order; scales from each config)."""
    out = []
    for node in order if order is not None else sorted(node_replies):
        sd, settings, n = node_replies[node](1)
        modules, _ = factors_from_state_dict(sd, settings or DECLARED, infer_ranks=settings is None)
        out.append(ClientUpdate(str(node), n, modules))
    return out


HETERO = {
    1: fixed(peft_state(lora(2), 1), lora_settings(lora(2)), 30),
    2: fixed(peft_state(lora(4, 8), 2), lora_settings(lora(4, 8)), 50),
    3: fixed(peft_state(lora(8, 16, rslora=True), 3), lora_settings(lora(8, 16, rslora=True)), 20),
}
HOMO = {n: fixed(peft_state(lora(4), n), None, 10 * n) for n in (1, 2, 3)}  # FlowerTune's reply: no config, one declared rank


def _shared_a(replies: dict) -> dict:
    """FFA-LoRA's clients train B only: every node sends node 1's lora_A."""
    first = replies[1](1)[0]
    return {n: fixed({k: (first[k] if "lora_A" in k else v) for k, v in r(1)[0].items()}, None, r(1)[2]) for n, r in replies.items()}


FFA = _shared_a(HOMO)


@pytest.mark.parametrize(
    "method,replies",
    [("flexlora", HETERO), ("hetlora", HETERO), ("rank_partition", HETERO), ("fedavg", HOMO), ("ffa", FFA), ("lora_fair", HOMO), ("rolora", FFA)],
)
def test_aggregate_equals_the_core_methods_exactly(method, replies):
    strategy = FlexLoRAStrategy(method, lora_config=DECLARED)
    result, _ = run(strategy, Nodes(replies))
    core = get_method(method)
    held = core.aggregate(core_updates(replies), round=1)
    acc = core.accumulator()  # the strategy folds each reply as it comes (reply_order), as the core method's fold does
    for u in core_updates(replies, [int(n) for n in strategy.history[-1]["accepted"]]):
        acc.add(u)
    want = acc.finish(round=1)
    got = strategy.state
    for name, gm in held.adapter.items():  # and that is the core aggregate (to float32 rounding where the fold's arithmetic differs: tests/test_fold.py)
        assert torch.allclose(got.adapter[name].delta(), gm.delta(), rtol=1e-5, atol=1e-6 * float(gm.delta().abs().max())), name
    assert set(got.adapter) == set(want.adapter)
    for name, gm in want.adapter.items():
        assert torch.equal(got.adapter[name].A, gm.A) and torch.equal(got.adapter[name].B, gm.B), name
    # global_arrays() is the same global update as a PEFT state dict (full rank, scale 1: alpha = r)
    arrays = arrays_to_tensors(strategy.global_arrays())
    for name, gm in want.adapter.items():
        assert torch.equal(arrays[peft_key(name, "B")], gm.B.float()) and torch.equal(arrays[peft_key(name, "A")], gm.A.float())
    # the ArrayRecord start() returns (and evaluate_fn gets) is the share at the declared ranks: it loads into the declared model
    declared = arrays_to_tensors(result.arrays)
    for name, f in get_method(method).share_for(want, strategy.ranks.declared).items():
        assert torch.equal(declared[peft_key(name, "B")], f.B.float()) and torch.equal(declared[peft_key(name, "A")], f.A.float())
        assert f.A.shape[0] == DECLARED["r"]


@pytest.mark.parametrize("method", ["flexlora", "hetlora"])
def test_the_global_state_does_not_depend_on_the_node_ids_flower_draws(method):
    """Flower draws new node ids at each start: the same replies under other ids give the same bits."""
    states = []
    for ids in ((1, 2, 3), (3, 1, 2), (2, 3, 1)):
        strategy = FlexLoRAStrategy(method, lora_config=DECLARED)
        run(strategy, Nodes({new: HETERO[old] for old, new in zip((1, 2, 3), ids)}))
        states.append(strategy.state)
    for other in states[1:]:
        for name, gm in states[0].adapter.items():
            assert torch.equal(other.adapter[name].A, gm.A) and torch.equal(other.adapter[name].B, gm.B), name


def test_nodes_are_told_which_factors_to_train():
    nodes = Nodes(FFA)
    run(FlexLoRAStrategy("rolora", lora_config=DECLARED), nodes)  # RoLoRA's round 1 trains B (A frozen)
    assert {conf["trained-factors"] for n in nodes.received for _, conf, _ in nodes.received[n]} == {"B"}


def test_a_rank_never_seen_is_served_at_its_own_rank(tmp_path):
    # node 7 answers no query and replies at ranks (6 attention, 10 mlp) the strategy never saw, without a config:
    # round 1 it gets the declared rank 4; round 2 it gets its own ranks back (scale from the declared alpha)
    replies = {5: fixed(peft_state(lora(2), 5), lora_settings(lora(2)), 10), 7: fixed(peft_state(lora(6, 10), 7), None, 10)}
    nodes = Nodes(replies, answers_query=False)
    strategy = FlexLoRAStrategy("flexlora", lora_config=DECLARED, save_every=2, save_dir=str(tmp_path / "saved"))
    run(strategy, nodes, rounds=2)
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    g = "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"
    (_, c1, s1), (_, c2, s2) = nodes.received[7]
    assert s1[q][0] == 4 and s1[g][0] == 4 and json.loads(c1["lora-config"])["r"] == 4
    assert s2[q][0] == 6 and s2[g][0] == 10
    assert {k: v for k, v in json.loads(c2["lora-config"]).items() if k != "alpha_pattern"} == {
        "r": 6, "lora_alpha": 16.0, "use_rslora": False, "rank_pattern": {f"model.layers.{i}.mlp.{m}": 10 for i in (0, 1) for m in MLP}}
    assert nodes.received[5][1][2][q][0] == 2  # the other node keeps its own rank 2
    # saved every 2 rounds, a PEFT adapter folder the reader (and PEFT) accepts
    assert read_adapter(tmp_path / "saved" / "round-2").modules


def bad(kind: str):
    sd = peft_state(lora(4), 11)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    if kind == "nan":
        sd[key][0, 0] = float("nan")
    elif kind == "shape":
        sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    elif kind == "missing":
        del sd[key]
    elif kind == "rank":  # declares rank 8, sends rank 4
        return fixed(sd, {"r": 8, "lora_alpha": 16}, 10)
    elif kind == "examples":
        return fixed(sd, None, 0)
    elif kind == "error":
        return lambda rnd: RuntimeError("out of memory")
    return fixed(sd, None, 10)


def test_bad_replies_are_dropped_with_the_reason():
    good = {1: fixed(peft_state(lora(4), 1), None, 10), 2: fixed(peft_state(lora(2), 2), lora_settings(lora(2)), 20)}
    kinds = {10: "nan", 11: "shape", 12: "missing", 13: "rank", 14: "examples", 15: "error"}
    replies = {**good, **{n: bad(k) for n, k in kinds.items()}}
    strategy = FlexLoRAStrategy("flexlora", lora_config=DECLARED)
    run(strategy, Nodes(replies, answers_query=False))
    rec = strategy.history[-1]
    assert rec["accepted"] == ["1", "2"]
    reasons = {int(n): " ".join(r) for n, r in rec["dropped"].items()}
    assert set(reasons) == set(kinds)
    assert "NaN" in reasons[10] and "layer shape" in reasons[11] and "lora_B" in reasons[12]
    assert "declares rank 8 but the weights have rank 4" in reasons[13] and "num-examples" in reasons[14] and "out of memory" in reasons[15]
    want = get_method("flexlora").aggregate(core_updates(good), round=1)
    for name, gm in want.adapter.items():
        assert torch.equal(strategy.state.adapter[name].B, gm.B)


def test_a_round_with_too_few_good_replies_keeps_the_previous_state():
    good_sd = peft_state(lora(4), 1)

    def flaky(rnd):
        return (good_sd, None, 10) if rnd == 1 else bad("nan")(rnd)

    strategy = FlexLoRAStrategy("flexlora", lora_config=DECLARED, min_good_replies=2)
    result, _ = run(strategy, Nodes({1: flaky, 2: fixed(peft_state(lora(4), 2), None, 10)}, answers_query=False), rounds=2)
    first, second = strategy.history
    assert "kept_previous_state" not in first and "fewer than min_good_replies=2" in second["kept_previous_state"]
    assert strategy.state.round == 1
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"  # start() returns round 1's global (at the declared ranks)
    assert torch.equal(arrays_to_tensors(result.arrays)[key], arrays_to_tensors(strategy.declared_arrays())[key])


@pytest.mark.parametrize("transport", ["float16", "bfloat16"])
def test_half_precision_transport_halves_the_bytes_and_its_error_is_measured(transport):
    def strat(t):
        if t == "float32":  # measured by the benchmarks' probe, not the Strategy
            return TransportProbe("flexlora", lora_config=DECLARED, transport=t, probe=("bfloat16",))
        return FlexLoRAStrategy("flexlora", lora_config=DECLARED, transport=t)

    full, half = strat("float32"), strat(transport)
    run(full, Nodes(HETERO), rounds=2)
    run(half, Nodes(HETERO), rounds=2)
    p32 = full.history[-1]["nodes"]["2"]
    p16 = half.history[-1]["nodes"]["2"]
    assert p16["payload_down"] * 2 == p32["payload_down"] and p16["payload_up"] * 2 == p32["payload_up"]
    assert p16["bytes_down"] < 0.7 * p32["bytes_down"]
    assert half.traffic.report()["total_bytes"] == sum(r["bytes_down"] + r["bytes_up"] for r in half.history)
    # the aggregate of float32 updates is exact; bfloat16's error is measured on the same updates (8 bits of mantissa)
    assert full.history[-1]["aggregation"]["max_rel_error_vs_exact"] < 1e-5
    err = full.history[-1]["transport_error"]["bfloat16"]
    assert 1e-4 < err["aggregate_rel_error_vs_exact"] < 2e-2 and 1e-4 < err["share_max_rel_error"] < 2e-2
    # the half-precision run's global update is close to the float32 run's
    for name, gm in full.state.adapter.items():
        d = (half.state.adapter[name].delta() - gm.delta()).norm() / gm.delta().norm()
        assert float(d) < 5e-2, name


def test_bfloat16_bits_travel_as_int16_and_come_back_exactly():
    t = torch.randn(5, 7).to(torch.bfloat16)
    rec = tensors_to_arrays({"x": t}, "bfloat16")
    assert rec["x"].dtype == "int16"
    assert torch.equal(arrays_to_tensors(rec, "bfloat16")["x"], t)


def test_a_lost_reply_is_recorded_and_the_query_is_sent_once():
    replies = {1: fixed(peft_state(lora(4), 1), None, 10), 2: fixed(peft_state(lora(4), 2), None, 10)}
    nodes = Nodes(replies, answers_query=False)
    strategy = FlexLoRAStrategy("flexlora", lora_config=DECLARED)
    grid = LocalGrid(nodes, {n: {} for n in replies}, fault=lambda node, msg: "timeout" if node == 2 and msg.metadata.message_type == "train" else None)
    strategy.start(grid, ArrayRecord(peft_state(lora(4), None)), num_rounds=2, timeout=5)
    for rec in strategy.history:
        assert rec["accepted"] == ["1"] and rec["dropped"] == {"2": ["no reply within the round's timeout"]}
    assert [e["type"] for e in grid.log].count("query") == 2  # once per node, not every round


@pytest.mark.parametrize("kwargs,msg", [
    ({"min_good_reply": 2}, "unknown FlexLoRAStrategy setting 'min_good_reply'"),
    ({"method": "flora"}, "merges its update into the clients' base weights"),
    ({"method": "nope"}, "unknown aggregation method"),
    ({"transport": "int8"}, "unknown transport dtype"),
    ({"save_every": 2}, "save_every needs a save_dir"),
])
def test_bad_settings_fail_in_one_line(kwargs, msg):
    with pytest.raises(ValueError, match=msg) as e:
        FlexLoRAStrategy(lora_config=DECLARED, **kwargs)
    assert "\n" not in str(e.value)


def test_adapter_evaluate_fn_hands_over_a_peft_adapter_folder(tmp_path):
    from peft import PeftModel

    seen = {}

    def evaluate(rnd, folder):
        model = PeftModel.from_pretrained(tiny_llama(0), str(folder))  # PEFT itself loads it
        seen[rnd] = float(sum(p.abs().sum() for n, p in model.named_parameters() if "lora_B" in n))
        return MetricRecord({"lora_b_abs": seen[rnd]})

    strategy = FlexLoRAStrategy("flexlora", lora_config=DECLARED, fraction_evaluate=1.0)
    grid = LocalGrid(Nodes(HETERO), {n: {} for n in HETERO})
    result = strategy.start(grid, ArrayRecord(peft_state(lora(4), None)), num_rounds=1, evaluate_fn=strategy.adapter_evaluate_fn(evaluate, tmp_path / "eval"))
    assert seen[0] == 0.0 and seen[1] > 0 and not math.isnan(seen[1])
    assert result.evaluate_metrics_serverapp[1]["lora_b_abs"] == seen[1]
    # federated evaluation: every node got its own-rank share, metrics weighted by num-examples
    assert result.evaluate_metrics_clientapp[1]["num-examples"] == 100 and result.evaluate_metrics_clientapp[1]["train_loss"] == 1.0

"""flexlora.flower.client: the query answer, load_share at any ranks (exact when the model's rank is
larger, FlexLoRA's own share when smaller), the reply the strategy parses back, and the size-mismatch
error a plain client sends read back into the node's ranks."""

import json

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

from flexlora.flower.client import answer_query, load_share, train_reply  # noqa: E402
from flexlora.flower.payloads import tensors_to_arrays  # noqa: E402
from flexlora.flower.peft_messages import ranks_from_load_error  # noqa: E402
from flexlora.flower.peft_messages import parse_reply  # noqa: E402
from flexlora.methods import get_method  # noqa: E402
from flexlora.peft_io import factors_from_state_dict, state_dict_from_factors  # noqa: E402
from flexlora.update import ClientUpdate, ModuleSpec  # noqa: E402
from flower_local import LocalGrid  # noqa: E402
from tiny import TARGETS, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("private_flwr_home")


@pytest.fixture(autouse=True)
def server_process():
    """Messages are created as in a ServerApp process (the in-process grid sets Flower's task identity)."""
    LocalGrid(lambda msg, context: msg, {})


def model_at(r: int, alpha: float = 16):
    return get_peft_model(tiny_llama(0), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0))


def global_state():
    """A FlexLoRA global from three random updates at ranks 2, 4, 8."""
    g = torch.Generator().manual_seed(0)
    updates = []
    for i, r in enumerate((2, 4, 8)):
        sd = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in get_peft_model_state_dict(model_at(r)).items()}
        modules, _ = factors_from_state_dict(sd, {"r": r, "lora_alpha": 16})
        updates.append(ClientUpdate(str(i), 10 + i, modules))
    method = get_method("flexlora")
    return method, method.aggregate(updates, round=1)


def share_message(method, state, rank: int, transport: str = "float32") -> Message:
    spec = {n: ModuleSpec(rank, 16.0) for n in state.adapter}
    tensors = state_dict_from_factors(method.share_for(state, spec))
    conf = ConfigRecord({"server-round": 1, "lora-config": json.dumps({"r": rank, "lora_alpha": 16.0}), "transport-dtype": transport})
    msg = Message(RecordDict({"arrays": tensors_to_arrays(tensors, transport), "config": conf}), dst_node_id=5, message_type="train")
    return msg


def lora_products(model) -> dict[str, torch.Tensor]:
    modules, _ = factors_from_state_dict(get_peft_model_state_dict(model), {"lora_alpha": 16}, infer_ranks=True)
    return {n: f.scale * f.B.double() @ f.A.double() for n, f in modules.items()}


@pytest.mark.parametrize("model_rank", [4, 6, 12])
def test_load_share_at_any_rank(model_rank):
    method, state = global_state()
    sent = 6
    model = model_at(model_rank)
    differ = load_share(model, share_message(method, state, sent))
    assert bool(differ) == (model_rank != sent)
    got = lora_products(model)
    if model_rank >= sent:  # exact: the model holds the share's update s B A
        want = {n: f.scale * f.B.double() @ f.A.double() for n, f in method.share_for(state, {n: ModuleSpec(sent, 16.0) for n in state.adapter}).items()}
    else:  # smaller: FlexLoRA's own share at the model's rank (the best rank-r approximation)
        want = {n: f.scale * f.B.double() @ f.A.double() for n, f in method.share_for(state, {n: ModuleSpec(model_rank, 16.0) for n in state.adapter}).items()}
    for name, w in want.items():
        assert float((got[name] - w).norm() / w.norm()) < 1e-5, name


def test_the_reply_describes_the_node_and_the_strategy_reads_it_back():
    method, state = global_state()
    model = model_at(4, alpha=8)
    msg = share_message(method, state, 4, transport="bfloat16")
    load_share(model, msg)
    reply = train_reply(msg, model, num_examples=7, metrics={"train_loss": 1.5})
    parsed = parse_reply(reply, {"r": 16, "lora_alpha": 16})
    assert parsed.update.num_examples == 7 and parsed.metrics["train_loss"] == 1.5
    assert {s.rank for s in parsed.spec.values()} == {4} and {s.alpha for s in parsed.spec.values()} == {8.0}  # from the reply, not the declared config
    answer = answer_query(msg, model.peft_config["default"])
    assert json.loads(answer.content["config"]["lora-config"])["r"] == 4


def test_a_plain_clients_size_mismatch_names_its_ranks():
    small = model_at(4)
    with pytest.raises(RuntimeError) as e:
        set_peft_model_state_dict(small, get_peft_model_state_dict(model_at(8)))
    reason = f"<class 'RuntimeError'>:<'{e.value}'>"  # as Flower's runtime wraps it in the error reply
    ranks = ranks_from_load_error(reason)
    assert ranks and set(ranks.values()) == {(8, 4)} and len(ranks) == 2 * len(TARGETS)
    assert ranks_from_load_error("CUDA out of memory") is None

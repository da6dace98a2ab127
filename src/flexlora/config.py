"""Run configuration: dataclasses, TOML in, ``key.sub=value`` overrides, validation before any work.

Every config dataclass a run reads is defined here, at the bottom of the orchestration: local training
(:mod:`flexlora.train`), evaluation (:mod:`flexlora.evaluate`), the runners and the CLI import them
from here, and this module imports only what it checks values against (methods, models, precision,
resources, prompt templates). ``ModelConfig`` stays beside the loaders in :mod:`flexlora.models`,
below this module. Unknown keys, wrong types and impossible values are reported with the key's full
dotted name before a model is loaded or a client trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, get_args, get_origin, get_type_hints

from flexlora.algorithms import ALGORITHMS, algorithm_name
from flexlora.data.prompts import TEMPLATES, Template
from flexlora.methods import METHODS, get_method
from flexlora.models import DTYPES, SERVER_DTYPES, ModelConfig, ModelError, check_model_folder, check_quantization, resolve_device, resolve_model_dtype
from flexlora.precision import PRECISIONS, pass_precision, resolve_precision
from flexlora.resources import PAPER_DISTRIBUTIONS, PAPER_TYPES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package (a dependency there)
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem found before any work starts; the message names the key."""


Split = Literal["eval", "test"]
RougeTokenizer = Literal["default", "unicode"]


@dataclass
class TrainConfig:
    """Local training. ``optimizer``: "adamw" (FedIT) or "sgd" (FedAvg); the step count is
    ``local_epochs`` over the client's data unless ``max_steps`` caps it."""

    optimizer: str = "adamw"  # "adamw" (FedIT) | "sgd" (FedAvg)
    lr: float = 2e-4  # local learning rate
    weight_decay: float = 0.0  # the optimizer's weight decay
    momentum: float = 0.0  # sgd only
    local_epochs: float = 1.0  # passes over the client's data per round (fractions allowed)
    max_steps: int | None = None  # caps the optimizer steps per round
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 320  # tokens per training example (prompt + response), longer ones are cut
    train_on_inputs: bool = True  # the paper's choice: loss over the whole sequence
    template: Template = "alpaca"  # the prompt format: "alpaca" (the paper's) or the tokenizer's "chat" template
    lora_dropout: float = 0.05  # dropout on the LoRA branch's input (the paper: 0.05)
    grad_clip: float | None = 1.0  # clip the gradient norm to this (unset or 0: no clipping)
    max_examples: int | None = None  # use at most this many of a client's training examples
    # Switches of the local trainer, not options of one method: a user may set them with any method
    # (an ablation), and methods set them each round through ``local_training`` (FFA-LoRA: A always,
    # RoLoRA: the factor it does not train that round); a switch the user set stays on.
    freeze_A: bool = False  # train B only, with any method (FFA-LoRA and RoLoRA's B rounds set it themselves)
    freeze_B: bool = False  # train A only, with any method (RoLoRA's A rounds set it themselves)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less GPU memory, ~30% more time
    deterministic: bool = False  # CUDA: deterministic kernels + cuBLAS workspace + math attention (slower); see use_deterministic_kernels
    precision: str = "auto"  # "auto" | "float32" | "bf16-autocast": the forward/backward passes (flexlora.precision); factors stay float32


@dataclass
class EvalConfig:
    """How to evaluate. Defaults favour affordable CPU runs, not the paper's full test sets.

    ``examples_per_client`` caps each client's examples (the first ones, in order, so runs are
    reproducible); ``None`` evaluates all. ``rouge_tokenizer="default"`` is rouge-score's own
    tokenizer (lowercase, ASCII ``[a-z0-9]`` only, Porter stemming): it drops every non-ASCII
    character, so e.g. a translation into Urdu scores 0 whatever the model writes.
    ``"unicode"`` keeps letters and digits of every script (see :class:`UnicodeRougeTokenizer`) and
    is identical to the default on ASCII text; it is not the paper's setting.
    """

    template: Template = "alpaca"  # the prompt format (as in training)
    max_prompt_tokens: int = 512  # longer prompts are cut
    max_new_tokens: int = 64  # greedy generation stops at EOS or after this many tokens
    batch_size: int = 8  # prompts generated together
    examples_per_client: int | None = None  # score at most this many examples per client (the first ones); unset: all
    split: Split = "eval"  # which of each client's splits is scored
    teacher_forced: bool = False  # also report the official code's teacher-forced Rouge-L proxy (not the paper's number)
    eval_loss: bool = False  # also report the mean token cross-entropy on the references (proxy_eval_loss)
    rouge_tokenizer: RougeTokenizer = "default"  # "default" (rouge-score: ASCII only, the paper's) | "unicode" (every script)
    precision: str = "auto"  # "auto" | "float32" | "bf16-autocast" for the forward passes; see pass_precision

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.split not in ("eval", "test"):
            raise ValueError(f"split must be 'eval' or 'test', got {self.split!r}")
        if self.rouge_tokenizer not in ("default", "unicode"):
            raise ValueError(f"rouge_tokenizer must be 'default' or 'unicode', got {self.rouge_tokenizer!r}")
        for name in ("max_prompt_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.examples_per_client is not None and self.examples_per_client < 1:
            raise ValueError(f"examples_per_client must be >= 1 or None, got {self.examples_per_client}")

    def settings(self) -> dict[str, Any]:
        """The evaluation settings alone, as a result records them: a :class:`RunEvalConfig`'s keys
        about when and whom a run evaluates are left out, so the same scoring records the same."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EvalConfig)}


@dataclass
class DataConfig:
    """``kind``: "suite" (built-in tasks, the default), "ni" (Natural Instructions, ``path``), or
    "instruct" (Dolly-style JSON/JSONL with categories, ``path``, partitioned over clients).

    Held-out clients (never trained, evaluated zero-shot) exist for every kind: ``heldout_file``
    (a JSON list of client ids, or ``{"client_ids": [...]}``) names them for any kind; otherwise
    ``heldout_clients`` (a count) or ``heldout_fraction`` choose them: for instruct data a seeded
    random set of the partitioned clients (default 10%, at least one), for the suite the number
    of held-out tasks (default one per category, 8). NI data marks its own held-out clients."""

    kind: str = "suite"  # "suite" (built-in tasks) | "ni" (Natural Instructions at `path`) | "instruct" (Dolly-style JSON/JSONL at `path`)
    path: str | None = None  # the data file or folder for kind = "ni" / "instruct"
    heldout_file: str | None = None  # a JSON list of held-out client ids (or {"client_ids": [...]}), for any kind
    heldout_clients: int | None = None  # how many clients to hold out (suite: held-out tasks, default 8; instruct: seeded random clients)
    heldout_fraction: float | None = None  # the held-out share of the clients instead of a count (instruct default 0.1, at least one)
    # suite
    suite_clients: int = 24  # suite: training clients (one task each)
    suite_examples: int = 32  # suite: mean training examples per client (sizes vary ~0.25x-1.75x so data-size weights matter)
    suite_eval: int = 8  # suite: eval examples per client
    # instruct
    partition: str = "dirichlet"  # instruct: "dirichlet" (category mix per client drawn with dirichlet_alpha) | "category" (one client per category)
    num_clients: int = 20  # instruct, dirichlet: how many clients the records are split into
    dirichlet_alpha: float = 0.5  # instruct, dirichlet: concentration; smaller = each client's categories more skewed
    eval_fraction: float = 0.1  # instruct: share of each client's records kept for evaluation
    # caps
    max_train_per_client: int | None = None  # NI: keep at most this many training records per client (file order)
    max_eval_per_client: int | None = None  # NI: keep at most this many eval (and test) records per client
    on_error: str = "raise"  # a bad record: "raise" (one line naming file and record) | "skip" (dropped, with one warning per file)


@dataclass
class LoraSettings:
    """``targets``: layer names (a name matches a layer whose name is it or ends in ``.name``) or
    ``"all-linear"`` (every linear / Conv1D layer but the output layer). ``groups`` names layers
    whose module group (the key a resource type ranks: attention, mlp) the architecture does not
    tell, e.g. ``{ mlp = ["wi", "wo"] }``; explicit entries win over the derived groups."""

    alpha: float = 16.0  # LoRA alpha: a rank-r adapter is scaled by alpha / r (the paper: 16)
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # layers LoRA trains: names (matching a layer named so or ending in .name) or "all-linear"
    groups: dict[str, list[str]] = field(default_factory=dict)  # module group of layers the architecture does not tell: { mlp = ["wi", "wo"] }
    rank_scale: float = 1.0  # multiplies every resource type's ranks (rounded, at least 1): the paper's types on a smaller model
    cap_at_width: bool = True  # a rank above a layer's width is capped at the width (false: refused)
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023): high ranks learn as fast as low ones


@dataclass
class ResourceConfig:
    """``mode``: "types" (the paper: a type per client from ``distribution``) or "budget"."""

    mode: str = "types"  # "types" (the paper: a resource type per client from `distribution`) | "budget" (memory budgets)
    distribution: str = "heavy-tail-strong"  # the paper's spread of types over clients: homo, uniform, heavy-tail-light, heavy-tail-strong, normal
    custom_distribution: dict[str, float] = field(default_factory=dict)  # overrides ``distribution`` when set
    types: dict[str, dict[str, int]] = field(default_factory=dict)  # extra/overriding types: {"tiny": {"attention": 2, "mlp": 4}}
    budget_mib: list[float] = field(default_factory=lambda: [2.0, 8.0, 32.0])  # budget mode: per-client budgets, cycled
    budget_ranks: list[int] = field(default_factory=lambda: [4, 8, 16, 30, 64, 128, 200])  # budget mode: a client trains the largest of these ranks that fits
    budget_fluctuation: float = 0.3  # budget mode: each round a budget is multiplied by a seeded factor in [1 - f, 1 + f]


@dataclass
class FederationConfig:
    """``algorithm`` is the base federated algorithm (local optimiser and init), ``aggregation`` the
    method that combines adapters. ``clients_per_round`` (count) wins over ``fraction``."""

    algorithm: str = "fedit"  # fedit (LoRA, train.optimizer) | fedavg_sgd (LoRA, SGD; was "fedavg") | slora (sparse warm-up, then LoRA)
    aggregation: str = "flexlora"  # the method that combines adapters (flexlora, fedavg, hetlora, flora, ffa, ...)
    method_options: dict[str, Any] = field(default_factory=dict)  # the aggregation method's own options, e.g. { singular_values = "sqrt" }
    rounds: int = 3  # federated rounds
    clients_per_round: int | None = 4  # training clients sampled each round (wins over `fraction`)
    fraction: float | None = None  # the share of training clients sampled each round, when clients_per_round is unset
    min_clients: int = 1  # a round with fewer valid updates is skipped (global state unchanged)
    seed: int = 0  # the run's seed: client sampling, resource types, data partition, training batches
    server_dtype: str = "float32"  # the dtype of aggregation; float64 for reference-grade exactness
    server_device: str = "cpu"  # where the server aggregates ("cuda" for large models); its state is always kept on the CPU
    slora_rounds: int = 2  # SLoRA: the first rounds train sparse full weights (stage 1)
    slora_lr: float = 5e-5  # stage-1 learning rate (full weights want a smaller one than LoRA)


@dataclass
class FailureConfig:
    """Failure injection (simulator, and Flower nodes on their own replies): fractions of the selected
    clients per round that crash, return garbage (NaN / wrong shapes / huge norms), or straggle past
    the timeout; drawn per round and client from the run seed (:func:`flexlora.failures.client_failure`)."""

    crash: float = 0.0  # share of each round's selected clients that crash (no update)
    garbage: float = 0.0  # share that return garbage (NaN, wrong shapes, huge norms)
    straggle: float = 0.0  # share that straggle past the round's timeout
    norm_factor: float | None = 100.0  # reject an update whose norm exceeds this multiple of the round median (unset: no norm check)


@dataclass
class PrivacyConfig:
    """Central user-level differential privacy (:mod:`flexlora.privacy`). ``clip_norm`` > 0 clips every
    client's whole update to that Frobenius norm; ``noise_multiplier`` > 0 adds Gaussian noise of std
    ``noise_multiplier * clip_norm / m`` to the aggregate (m: the round's client count; its expectation
    under Poisson sampling) and switches to uniform client weights and ``sampling``; epsilon at ``delta``
    is accounted with Google's dp-accounting (RDP). Clipping alone is a robustness option (no epsilon)."""

    clip_norm: float = 0.0  # > 0: clip every client's whole update to this Frobenius norm
    noise_multiplier: float = 0.0  # > 0: Gaussian noise of std noise_multiplier * clip_norm / m on the aggregate (needs clip_norm)
    delta: float = 1e-5  # the delta at which epsilon is reported
    sampling: str = "poisson"  # poisson (each client joins w.p. clients_per_round / N) | fixed (m of N without replacement)

    @property
    def clips(self) -> bool:
        return self.clip_norm > 0

    @property
    def noisy(self) -> bool:
        return self.noise_multiplier > 0


@dataclass
class RunEvalConfig(EvalConfig):
    """Evaluation inside a run: every ``every`` rounds (0 = only at the end), before training
    (the base model's line) if ``at_start``, on ``clients`` held-out clients (all of them when
    there are no more; otherwise a fixed random subset drawn with seed 0, the same for every run)."""

    # An EvalConfig (``[eval]`` is one flat table): evaluation takes it as it is and reads its own settings.

    every: int = 0  # evaluate every this many rounds (0: only after the last round)
    at_start: bool = True  # evaluate the base model before round 1 (the curve's round 0)
    clients: int = 8  # held-out clients evaluated (a fixed seed-0 subset when there are more)


@dataclass
class RunConfig:
    name: str = "run"  # the run's name in tables and summaries (compare: each entry's label)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: RunEvalConfig = field(default_factory=RunEvalConfig)
    failures: FailureConfig = field(default_factory=FailureConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compare: list[dict[str, Any]] = field(default_factory=list)  # `flexlora compare`: [[compare]] tables, each a label and the keys it changes, e.g. label = "fedavg", federation = { aggregation = "fedavg" }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- building dataclasses from plain data, with dotted-key errors --------------------------------
def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return from_dict(hint, value, key)
    if origin is type(None) or hint is type(None):
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0] if len(inner) == 1 else inner, key)
    if isinstance(hint, list):  # a union without None
        for h in hint:
            try:
                return _coerce(value, h, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit any of {hint}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin in (list, Sequence):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {str(k): (_coerce(v, args[1], f"{key}.{k}") if args else v) for k, v in value.items()}
    return value  # Literal and Any: checked by validate()


def from_dict(cls, data: Mapping[str, Any], prefix: str = ""):
    if cls is RunConfig:  # keys an older version had elsewhere: loaded where they live now, with a note
        data, notes = moved_keys(data)
        for note in notes:
            warnings.warn_explicit(note, ConfigDeprecation, "flexlora config", 0, module=__name__)  # one line: no source line to show
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known keys in {prefix or 'the top level'}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own check (e.g. EvalConfig's): say which table it is
        raise ConfigError(f"{prefix}: {e}" if prefix else str(e)) from None


# Method options a run sets itself, from these keys (``flexlora aggregate --option`` takes them).
RUN_SETS = {"dtype": "federation.server_dtype", "seed": "federation.seed", "device": "federation.server_device"}


class ConfigDeprecation(FutureWarning):
    """A config key that moved: it still loads (where it lives now), and the message names the new key."""


def moved_keys(data: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
    """``data`` with the ``train.*`` keys that became a method's options (``former_train_keys``) moved
    into ``federation.method_options``, and one note per moved key naming its new place. A key at its
    default is dropped (it changes nothing); a key set for another method than the run's is refused,
    as is a value that disagrees with the same option given in ``method_options``. Used for a user's
    config and for the config a checkpoint was saved with, so old runs still resume."""
    train = data.get("train")
    if not isinstance(train, Mapping):
        return data, []
    moved = {old: (cls, option) for cls in METHODS.values() for old, option in cls.former_train_keys.items() if old in train}
    if not moved:
        return data, []
    fed = data.get("federation", {})
    fed = fed if isinstance(fed, Mapping) else {}  # not a table: from_dict says so
    aggregation = fed.get("aggregation", FederationConfig.aggregation)
    given = fed.get("method_options", {})
    options = dict(given) if isinstance(given, Mapping) else {}
    train = dict(train)
    notes = []
    for old, (cls, option) in moved.items():
        value = train.pop(old)
        notes.append(f"train.{old} is deprecated: use federation.method_options.{option} ({cls.name}'s option; read as that this time)")
        if value == inspect.signature(cls).parameters[option].default:
            continue
        if cls.name != aggregation:
            raise ConfigError(f"train.{old} (now federation.method_options.{option}) belongs to {cls.name} ({cls.paper}); it needs federation.aggregation = {cls.name!r}, not {aggregation!r}")
        if option in options and options[option] != value:
            raise ConfigError(f"train.{old} = {value!r} and federation.method_options.{option} = {options[option]!r} disagree; keep federation.method_options.{option} only")
        options[option] = value
    out = {**data, "train": train}
    if options != given:
        out["federation"] = {**fed, "method_options": options}
    return out, notes


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """``federation.rounds=5`` into nested dicts; the value is parsed as TOML/JSON when it can be."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a table")
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    cfg = from_dict(RunConfig, load_config_dict(path, overrides))
    validate(cfg)
    return cfg


def deep_merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_config_dict(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The config file as plain data with the overrides applied (not yet validated)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
    for o in overrides:
        apply_override(data, o)
    return data


def validate(cfg: RunConfig) -> None:
    """Everything that can be checked without the model; rank-vs-width is checked once it is loaded."""
    fed, tr, res, d = cfg.federation, cfg.train, cfg.resources, cfg.data
    if fed.aggregation not in METHODS:
        raise ConfigError(f"federation.aggregation: unknown method {fed.aggregation!r}; choose one of {sorted(METHODS)}")
    for option, key in RUN_SETS.items():
        if option in fed.method_options:
            raise ConfigError(f"federation.method_options.{option}: a run sets the method's {option} from {key}; set that instead")
    try:  # typed and range-checked before any work: the method's constructor is cheap
        get_method(fed.aggregation, **dict(fed.method_options))
    except ValueError as e:
        raise ConfigError(f"federation.method_options: {e}") from None
    fed.algorithm, renamed = algorithm_name(fed.algorithm)
    if renamed:  # the same one-line note as a moved key's
        warnings.warn_explicit(renamed, ConfigDeprecation, "flexlora config", 0, module=__name__)
    if fed.algorithm not in ALGORITHMS:
        raise ConfigError(f"federation.algorithm: {fed.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    algorithm = ALGORITHMS[fed.algorithm]
    if fed.rounds < 1:
        raise ConfigError(f"federation.rounds must be >= 1, got {fed.rounds}")
    if fed.clients_per_round is None and fed.fraction is None:
        raise ConfigError("federation: set clients_per_round or fraction")
    if fed.clients_per_round is not None and fed.clients_per_round < 1:
        raise ConfigError(f"federation.clients_per_round must be >= 1, got {fed.clients_per_round}")
    if fed.fraction is not None and not 0 < fed.fraction <= 1:
        raise ConfigError(f"federation.fraction must be in (0, 1], got {fed.fraction}")
    why = algorithm.check(cfg, METHODS[fed.aggregation].restarts_adapter, METHODS[fed.aggregation].__name__)
    if why:
        raise ConfigError(why)
    if fed.server_dtype not in SERVER_DTYPES:
        raise ConfigError(f"federation.server_dtype: {fed.server_dtype!r} is not one of {list(SERVER_DTYPES)} (QR and SVD need them)")
    if tr.optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"train.optimizer must be 'adamw' or 'sgd', got {tr.optimizer!r}")
    if tr.lr <= 0 or tr.batch_size < 1 or tr.grad_accum < 1 or tr.max_length < 16:
        raise ConfigError("train: lr must be > 0, batch_size and grad_accum >= 1, max_length >= 16")
    if tr.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}, got {tr.precision!r}")
    if tr.template not in ("alpaca", "chat"):
        raise ConfigError(f"train.template must be 'alpaca' or 'chat', got {tr.template!r}")
    targets = cfg.lora.targets
    if isinstance(targets, str) and targets != "all-linear":
        raise ConfigError(f"lora.targets: {targets!r} is neither a list of layer names nor \"all-linear\"")
    if not isinstance(targets, (str, list)) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"lora.targets must be \"all-linear\" or a non-empty list of layer names, got {targets!r}")
    if res.mode not in ("types", "budget"):
        raise ConfigError(f"resources.mode must be 'types' or 'budget', got {res.mode!r}")
    types = {**PAPER_TYPES, **res.types}
    for name, ranks in res.types.items():
        for group, r in ranks.items():
            if not isinstance(r, int) or r < 1:
                raise ConfigError(f"resources.types.{name}.{group}: rank must be a positive integer, got {r!r}")
    dist = res.custom_distribution or PAPER_DISTRIBUTIONS.get(res.distribution)
    if dist is None:
        raise ConfigError(f"resources.distribution: unknown {res.distribution!r}; choose one of {sorted(PAPER_DISTRIBUTIONS)} or set custom_distribution")
    for t in dist:
        if t not in types:
            raise ConfigError(f"resources: distribution uses type {t!r} which is not defined (known: {sorted(types)})")
    if d.kind not in ("suite", "ni", "instruct"):
        raise ConfigError(f"data.kind must be 'suite', 'ni' or 'instruct', got {d.kind!r}")
    if d.kind in ("ni", "instruct"):
        if not d.path:
            raise ConfigError(f"data.path is required for data.kind = {d.kind!r}")
        if not Path(d.path).exists():
            raise ConfigError(f"data.path: {d.path} does not exist")
    if d.partition not in ("dirichlet", "category"):
        raise ConfigError(f"data.partition must be 'dirichlet' or 'category', got {d.partition!r}")
    if d.on_error not in ("raise", "skip"):
        raise ConfigError(f"data.on_error must be 'raise' or 'skip', got {d.on_error!r}")
    for key in ("suite_clients", "suite_examples", "suite_eval", "num_clients"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {getattr(d, key)}")
    if not d.dirichlet_alpha > 0:
        raise ConfigError(f"data.dirichlet_alpha must be > 0, got {d.dirichlet_alpha}")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    _validate_heldout(d)
    if cfg.model.source not in ("smollm2", "tiny") and not Path(cfg.model.source).exists():
        raise ConfigError(f"model.source: {cfg.model.source} does not exist (use 'smollm2', 'tiny', a model directory or a .gguf file)")
    if Path(cfg.model.source).is_dir():
        try:
            check_model_folder(Path(cfg.model.source))
        except ModelError as e:
            raise ConfigError(f"model.source: {e}") from None
    if cfg.model.dtype != "auto" and cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {cfg.model.dtype!r} is not one of {['auto', *sorted(DTYPES)]}")
    if cfg.model.dtype == "float16":
        raise ConfigError("model.dtype: float16 training has no loss scaling here (small gradients underflow to zero); use bfloat16 or float32 ('auto' picks)")
    try:
        device = resolve_device(cfg.model.device, "model.device")
        resolve_device(fed.server_device, "federation.server_device")
        check_quantization(cfg.model, device)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    merging = fed.aggregation if METHODS[fed.aggregation].merges_into_base else fed.algorithm if algorithm.merges_into_base() else None
    if cfg.model.quantization is not None and merging:
        raise ConfigError(
            f"model.quantization: {merging} merges updates into the base weights, "
            "which 4-/8-bit weights cannot take exactly; use another method or unquantised weights"
        )
    f = cfg.failures
    if min(f.crash, f.garbage, f.straggle) < 0 or f.crash + f.garbage + f.straggle > 1:
        raise ConfigError("failures: crash, garbage and straggle are fractions >= 0 that add up to at most 1")
    _validate_privacy(cfg)
    if cfg.eval.every < 0 or cfg.eval.clients < 0:
        raise ConfigError("eval.every and eval.clients must be >= 0")
    algorithm.prescribe(cfg)  # fedavg_sgd: train.optimizer = "sgd" (the paper's FedAvg rows), said in the run's start notes


def _validate_privacy(cfg: RunConfig) -> None:
    pv, fed = cfg.privacy, cfg.federation
    if not (math.isfinite(pv.clip_norm) and pv.clip_norm >= 0):
        raise ConfigError(f"privacy.clip_norm must be a finite number >= 0 (0 = no clipping), got {pv.clip_norm}")
    if not (math.isfinite(pv.noise_multiplier) and pv.noise_multiplier >= 0):
        raise ConfigError(f"privacy.noise_multiplier must be a finite number >= 0, got {pv.noise_multiplier}")
    if not pv.noisy:
        return
    if not pv.clips:
        raise ConfigError("privacy.noise_multiplier needs privacy.clip_norm > 0: noise is calibrated to the clipping bound")
    if not 0 < pv.delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {pv.delta}")
    if pv.sampling not in ("poisson", "fixed"):
        raise ConfigError(f"privacy.sampling must be 'poisson' or 'fixed', got {pv.sampling!r}")
    method = METHODS[fed.aggregation]
    if method.dp_release is None:
        ok = sorted(n for n, m in METHODS.items() if m.dp_release is not None)
        raise ConfigError(f"privacy: {fed.aggregation} has no differentially private form here ({method.dp_note}); use one of {ok}")
    if fed.min_clients > 1:
        raise ConfigError("privacy: federation.min_clients must be 1 under DP (skipping a round because few clients came would reveal how many did)")


def _validate_heldout(d: DataConfig) -> None:
    """One source of held-out clients, of a size the data kind can give."""
    from flexlora.data.suite import SUITE_CATEGORIES, SUITE_TASKS

    given = [k for k in ("heldout_file", "heldout_clients", "heldout_fraction") if getattr(d, k) is not None]
    if len(given) > 1:
        raise ConfigError(f"data: set one of {', '.join('data.' + k for k in given)}, not several (they all choose the held-out clients)")
    if d.heldout_file is not None and not Path(d.heldout_file).is_file():
        raise ConfigError(f"data.heldout_file: {d.heldout_file} is not a file")
    if d.kind == "ni" and (d.heldout_clients is not None or d.heldout_fraction is not None):
        raise ConfigError("data.heldout_clients / data.heldout_fraction apply to suite and instruct data; NI data marks its held-out clients itself (or use data.heldout_file)")
    if d.heldout_clients is not None and d.heldout_clients < 0:
        raise ConfigError(f"data.heldout_clients must be >= 0, got {d.heldout_clients}")
    if d.heldout_fraction is not None and not 0 <= d.heldout_fraction < 1:
        raise ConfigError(f"data.heldout_fraction must be in [0, 1), got {d.heldout_fraction}")
    max_tasks = len(SUITE_TASKS) - len(SUITE_CATEGORIES)
    if d.kind == "suite" and suite_heldout_tasks(d) is not None and suite_heldout_tasks(d) > max_tasks:
        raise ConfigError(f"data.heldout_clients: the suite can hold out at most {max_tasks} of its {len(SUITE_TASKS)} tasks (each category keeps a training task)")


def suite_heldout_tasks(d: DataConfig) -> int | None:
    """The suite's held-out tasks (one held-out client each); None: the suite's default."""
    from flexlora.data.suite import SUITE_TASKS

    if d.heldout_clients is not None:
        return d.heldout_clients
    if d.heldout_fraction is not None:
        return int(d.heldout_fraction * len(SUITE_TASKS) + 0.5)
    return None


# -- comparing configs: what makes a checkpoint unusable ---------------------------------------
def config_fingerprint(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    d.pop("name", None)
    d.pop("compare", None)
    d["eval"] = {k: v for k, v in d["eval"].items()}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("types", "custom_distribution", "method_options"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


RUNS_ANYWHERE = ("model.device", "federation.server_device")  # a run moves between devices: not a config change


def config_changes(saved: dict[str, Any], cfg: RunConfig, allowed: Sequence[str] = ()) -> list[str]:
    """The config keys that make a checkpoint unusable for ``cfg``: values that differ, except options
    the checkpoint's config does not know yet (added to flexlora since) that are at their default,
    which by construction change nothing, and the keys in ``allowed`` (the caller checks those).
    ``name`` and ``compare`` never matter."""
    def plain(d: dict[str, Any]) -> dict[str, Any]:  # as config.json stores it: JSON types, flat dotted keys
        return _flatten(json.loads(json.dumps(d, default=str)))

    old, new, default = plain(dict(moved_keys(saved)[0])), plain(cfg.to_dict()), plain(RunConfig().to_dict())
    here = str(resolve_model_dtype("auto", resolve_device(cfg.model.device))).removeprefix("torch.")
    device = resolve_device(cfg.model.device)
    for key in ("train.precision", "eval.precision"):
        old.setdefault(key, "float32")  # a config written before the option existed trained and scored in float32
    if "federation.algorithm" in old:  # a config written before an algorithm was renamed (fedavg -> fedavg_sgd)
        old["federation.algorithm"] = algorithm_name(old["federation.algorithm"])[0]
    for d in (old, new, default):  # "auto" means what it resolves to on this machine
        if d.get("model.dtype") == "auto":
            d["model.dtype"] = here
        if d.get("train.precision") == "auto":
            d["train.precision"] = resolve_precision("auto", device)
        if d.get("eval.precision") == "auto":  # per pass; "float32" when no pass autocasts here
            passes = {pass_precision(EvalConfig(precision="auto"), device, which) for which in ("generation", "scoring")}
            d["eval.precision"] = passes.pop() if len(passes) == 1 else "auto"
    changed = []
    for key in sorted(set(old) | set(new)):
        if key == "name" or key.startswith("compare") or key in RUNS_ANYWHERE or key in allowed:
            continue
        if key not in old:
            if new[key] != default.get(key):
                changed.append(f"{key} = {new[key]!r} is new")
        elif key not in new:
            changed.append(f"{key} no longer exists")
        elif old[key] != new[key]:
            changed.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return changed

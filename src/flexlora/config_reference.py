"""Every config key, read from the config dataclasses: ``flexlora config --defaults`` and docs/config.md.

A key's meaning is the comment on its line in the dataclass (``batch_size: int = 4  # ...``), or
else an attribute docstring under it, the comment lines right above it, or the sentence of the
class docstring that names it (````batch_size````). A new field therefore appears here, with its
type and default, as soon as it is declared; regenerate the page with
``flexlora config --markdown > docs/config.md`` (a test checks that it is in sync).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, get_args, get_origin, get_type_hints

__all__ = ["ConfigKey", "config_keys", "defaults_toml", "markdown_reference", "toml_value"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ConfigKey:
    """One leaf key: ``section`` is the dotted table it lives in ("" at the top level)."""

    section: str
    name: str
    type: str
    default: Any  # None: unset by default (TOML has no null: leave the key out)
    meaning: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


# ------------------------------------------------------------------------------- reading the source


@functools.lru_cache(maxsize=None)
def _field_comments(cls: type) -> dict[str, str]:
    """{field: meaning} from the class's own source (fields it declares itself)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a frozen app): types and defaults still come out
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}  # line -> comment after code on that line
    alone: dict[int, str] = {}  # line -> a comment line on its own
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            (alone if not lines[row - 1][:col].strip() else trailing)[row] = text
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        meaning = next((trailing[r] for r in range(node.lineno, (node.end_lineno or node.lineno) + 1) if r in trailing), "")
        after = body[i + 1] if i + 1 < len(body) else None
        if not meaning and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            meaning = " ".join(after.value.value.split())
        if not meaning:
            above, row = [], node.lineno - 1
            while row in alone:
                above.insert(0, alone[row])
                row -= 1
            meaning = " ".join(above)
        if not meaning:
            meaning = _docstring_sentence(doc, name)
        out[name] = meaning
    return out


def _docstring_sentence(doc: str, name: str) -> str:
    """The first sentence of a class docstring that names ````name````."""
    text = " ".join(doc.split())
    for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z`(])", text):
        if f"``{name}``" in sentence:
            return _plain(sentence)
    return ""


def _meaning(cls: type, name: str) -> str:
    for klass in cls.__mro__:  # a subclass's own comment wins; inherited fields keep their base's
        if dataclasses.is_dataclass(klass) and name in _field_comments(klass):
            found = _field_comments(klass)[name]
            if found:
                return found
    return ""


# --------------------------------------------------------------------------------- types and values


def _type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (", optional" if type(None) in args else "")
    if origin in (list, tuple) or hint in (list, tuple):
        return f"array of {_type_name(args[0])}" if args else "array"
    if origin is dict or hint is dict:
        return f"table of {_type_name(args[1])}" if args else "table"
    return {str: "string", int: "integer", float: "float", bool: "boolean"}.get(hint, getattr(hint, "__name__", str(hint)))


def toml_value(value: Any) -> str:
    """A value as TOML (inline tables and arrays; None has no TOML form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = [f"{k if _BARE_KEY.fullmatch(str(k)) else json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"no TOML form for {value!r}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"config field {f.name} has no default")


def config_keys(cls: type | None = None, section: str = "") -> list[ConfigKey]:
    """Every leaf key of ``cls`` (default: :class:`flexlora.config.RunConfig`), depth first, in
    declaration order; a field whose type is a dataclass is a section."""
    if cls is None:
        from flexlora.config import RunConfig

        cls = RunConfig
    hints = get_type_hints(cls)
    keys: list[ConfigKey] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += config_keys(hint, f"{section}.{f.name}" if section else f.name)
        else:
            keys.append(ConfigKey(section, f.name, _type_name(hint), _default(f), _meaning(cls, f.name)))
    return keys


def _sections(keys: list[ConfigKey]) -> dict[str, list[ConfigKey]]:
    out: dict[str, list[ConfigKey]] = {}
    for k in keys:
        out.setdefault(k.section, []).append(k)
    return out


def _section_doc(section: str) -> str:
    """The first paragraph of the section's dataclass docstring, on one line."""
    from flexlora.config import RunConfig

    cls: Any = RunConfig
    for part in section.split(".") if section else []:
        cls = get_type_hints(cls)[part]
    doc = inspect.getdoc(cls) or ""
    return _plain(" ".join(doc.split("\n\n")[0].split())) if cls is not RunConfig else ""


def _plain(text: str) -> str:
    """Docstring markup as Markdown: ````x```` and ``:mod:`x``` become ```x```."""
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


# ---------------------------------------------------------------------------------------- the outputs

_TOML_HEAD = """\
# flexlora configuration: every key with its default value (`flexlora config --defaults`).
# This file is itself a valid config; a config file needs only the keys it changes, and any key
# can also be set on the command line: --set section.key=value. Keys whose default is unset are
# commented out (TOML has no null): uncomment and give a value to set them.
# Reference with types: docs/config.md.
"""


def defaults_toml(values: dict[str, Any] | None = None) -> str:
    """A commented TOML of every key; ``values`` (a config's ``to_dict()``) replaces the defaults."""
    keys = config_keys()
    lines = [_TOML_HEAD]
    for section, group in _sections(keys).items():
        if section:
            lines.append(f"\n[{section}]")
            doc = _section_doc(section)
            if doc:
                lines += ["# " + line for line in textwrap.wrap(doc, 98, break_on_hyphens=False)] + [""]
        for k in group:
            value = k.default
            if values is not None:
                node: Any = values
                for part in k.key.split("."):
                    node = node[part]
                value = node
            lines += ["# " + line for line in textwrap.wrap(f"{k.meaning} [{k.type}]".strip(), 98, break_on_hyphens=False)]
            lines.append(f"# {k.name} = <{k.type.removesuffix(', optional')}>  (unset)" if value is None else f"{k.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def markdown_reference() -> str:
    """docs/config.md: one table per section: key, type, default, meaning."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the config dataclasses by `flexlora config --markdown > docs/config.md`; do not edit by hand",
        "     (tests/test_config_reference.py fails when it is out of date). -->",
        "",
        "A run's configuration is a TOML file whose tables are the sections below; a file needs only the",
        "keys it changes, and `--set section.key=value` overrides any key on the command line.",
        "`flexlora config --defaults` prints every key with its default as a commented TOML that is itself",
        "a valid config; `flexlora config --config my_run.toml` prints the configuration a run would use.",
        "\"optional\" keys are unset by default: leave them out of the file (TOML has no null).",
    ]
    for section, group in _sections(config_keys()).items():
        out += ["", f"## `[{section}]`" if section else "## Top level", ""]
        doc = _section_doc(section)
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for k in group:
            default = "unset" if k.default is None else f"`{toml_value(k.default)}`"
            cells = [f"`{k.key}`", k.type, default, _plain(k.meaning)]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out + _method_options_section()) + "\n"


def _method_options_section() -> list[str]:
    """Every method's own options (``federation.method_options``), read from its constructor."""
    from flexlora.config import RUN_SETS
    from flexlora.methods import METHODS, method_options, option_types

    sets = ", ".join(f"`{option}` from `{key}`" for option, key in RUN_SETS.items())
    out = [
        "",
        "## `federation.method_options`, per method",
        "",
        "A method's own settings, its client side's included, are options of the method (its constructor's:",
        "typed and range-checked before any work; `flexlora aggregate --option KEY=VALUE` takes the same).",
        f"A run sets {sets}.",
        "",
        "| method | paper | options: type (default) |",
        "|---|---|---|",
    ]
    for name, cls in METHODS.items():
        params, hints = inspect.signature(cls).parameters, option_types(cls)
        own = [o for o in method_options(cls) if o not in RUN_SETS and o in params]
        default = {o: "unset" if params[o].default is None else f"`{toml_value(params[o].default)}`" for o in own}
        cells = [f"`{name}`", cls.paper, ", ".join(f"`{o}`: {_type_name(hints[o])} ({default[o]})" for o in own) or "none"]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    moved = [f"`train.{old}` -> `{option}` ({cls.name})" for cls in METHODS.values() for old, option in cls.former_train_keys.items()]
    if moved:
        out += ["", "Keys that moved here from `[train]` still load, with a one-line deprecation note: " + ", ".join(moved) + "."]
    return out

"""The config reference comes from the config dataclasses: every key, its type, default and meaning;
``flexlora config --defaults`` is itself a valid config; docs/config.md is in sync."""

import dataclasses
import tomllib
from pathlib import Path

from flexlora.cli import main
from flexlora.config import RunConfig, from_dict, load_config
from flexlora.config_reference import config_keys, defaults_toml, markdown_reference

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def _leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        sub = getattr(cls(), f.name)
        if dataclasses.is_dataclass(sub):
            yield from _leaf_fields(type(sub), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_key_has_type_default_and_a_meaning():
    keys = config_keys()
    assert [k.key for k in keys] == list(_leaf_fields(RunConfig))  # picked up from the dataclasses, nothing missed
    missing = [k.key for k in keys if not k.meaning]
    assert not missing, f"config keys without a meaning (add a trailing # comment to the field): {missing}"
    by_key = {k.key: k for k in keys}
    assert by_key["train.batch_size"].default == 4 and by_key["train.batch_size"].type == "integer"
    assert by_key["train.max_length"].default == 320 and by_key["train.local_epochs"].default == 1.0
    assert by_key["eval.split"].type == '"eval" | "test"' and by_key["model.threads"].type == "integer, optional"
    assert "Evaluation inside a run" not in by_key["eval.every"].meaning  # its own comment, not the class docstring


def test_defaults_toml_is_a_valid_config_equal_to_the_defaults(tmp_path, capsys):
    text = defaults_toml()
    assert from_dict(RunConfig, tomllib.loads(text)) == RunConfig()
    path = tmp_path / "defaults.toml"
    path.write_text(text)
    assert load_config(path) == load_config(None)
    for k in config_keys():  # every key is there, unset ones commented out
        assert (f"\n{k.name} = " if k.default is not None else f"\n# {k.name} = <") in text, k.key
    assert main(["config", "--defaults"]) == 0
    assert capsys.readouterr().out == text


def test_config_shows_a_users_config_with_every_key(tmp_path, capsys):
    cfg = tmp_path / "my.toml"
    cfg.write_text('[train]\nbatch_size = 2\n[model]\nthreads = 3\n')
    assert main(["config", "--config", str(cfg), "--set", "federation.rounds=7"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["train"]["batch_size"] == 2 and shown["model"]["threads"] == 3 and shown["federation"]["rounds"] == 7
    assert shown["train"]["max_length"] == 320
    assert main(["config", "--set", "train.batch_size=0"]) == 2  # checked like a run's config


def test_docs_page_is_in_sync_with_the_dataclasses():
    expected = markdown_reference()
    assert DOCS.read_text(encoding="utf-8") == expected, "docs/config.md is out of date: flexlora config --markdown > docs/config.md"
    for k in config_keys():
        assert f"| `{k.key}` |" in expected

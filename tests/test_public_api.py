"""The entry points ``import flexlora`` offers: loaded on first use, and ``flexlora.run`` is ``flexlora run``."""

import subprocess
import sys
from pathlib import Path

import pytest

import flexlora
from flexlora.fsutil import OutputFolderError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")


def test_import_flexlora_loads_no_framework_and_every_public_name_resolves():
    code = "import sys, flexlora; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'flwr'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    for name in flexlora.__all__:
        if name == "FlexLoRAStrategy":
            pytest.importorskip("flwr")
        assert getattr(flexlora, name) is not None, name
        assert name in dir(flexlora)
    assert flexlora.get_method("flexlora").name == "flexlora"
    with pytest.raises(AttributeError):
        flexlora.no_such_entry_point


def test_run_refuses_a_non_empty_folder_before_any_work(tmp_path):
    (tmp_path / "mine.txt").write_text("the user's")
    with pytest.raises(OutputFolderError):
        flexlora.run(SMOKE, tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "the user's"


def test_run_is_the_command_line_run(tmp_path):
    from flexlora.cli import main

    assert main(["run", "--config", SMOKE, "--out", str(tmp_path / "cli"), "--quiet", "--set", "federation.rounds=1"]) == 0
    summary = flexlora.run(SMOKE, tmp_path / "api", overrides=["federation.rounds=1"], progress=False)
    assert summary["rounds"] == 1
    a = (tmp_path / "cli" / "final" / "global" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "api" / "final" / "global" / "adapter_model.safetensors").read_bytes()
    assert a == b


def test_run_checks_a_config_object_before_any_work(tmp_path):
    from flexlora.config import ConfigError, load_config

    cfg = load_config(SMOKE)
    cfg.federation.rounds = 0
    with pytest.raises(ConfigError, match="federation.rounds"):
        flexlora.run(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

"""The aggregation core is torch only: importing it pulls in no transformers, PEFT or Flower."""

import subprocess
import sys

CORE = ["flexlora.lowrank", "flexlora.update", "flexlora.methods", "flexlora.diagnostics", "flexlora.validate", "flexlora.fold"]
FRAMEWORKS = ("transformers", "peft", "flwr", "safetensors", "tokenizers")


def test_the_core_imports_nothing_but_torch():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"the core imports {out}"

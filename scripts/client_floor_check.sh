#!/usr/bin/env bash
# The client helpers (flexlora.flower.client) and the FlowerTune-shaped app at FlowerTune's own pins,
# transformers 4.53 and PEFT 0.6.2, installed into a temporary --target folder that shadows the
# environment's versions (the environment itself is not changed). Needs the package registry.
#   bash scripts/client_floor_check.sh            # uses .venv/bin/python (make test's)
#   PYTHON=/path/to/python bash scripts/client_floor_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
FLOOR=$(mktemp -d)
trap 'rm -rf "$FLOOR"' EXIT
"$PY" -m pip install --quiet --no-deps --target "$FLOOR" "transformers==4.53.0" "peft==0.6.2" "tokenizers>=0.21,<0.22" "huggingface-hub>=0.30,<1.0"
PYTHONPATH="$FLOOR:$PWD/src" "$PY" -c "import transformers, peft; print('transformers', transformers.__version__, '| peft', peft.__version__)"
PYTHONPATH="$FLOOR:$PWD/src" "$PY" -m pytest -q -p no:cacheprovider tests/test_flower_client.py tests/test_flowertune_app.py

#!/usr/bin/env bash
# Rehearse the offline GPU node on the CPU: `make gpu-rehearsal` (not part of make test; run it after
# every change to scripts/gpu_check.py or to the device code).
#
#  (a) a fresh virtual environment OUTSIDE the tree holding only the node's package set: transformers
#      5.17.0 and safetensors 0.8.0 as on the node, peft at the lowest version pyproject.toml allows,
#      accelerate, numpy, tokenizers, rich, matplotlib, pytest, hypothesis, setuptools, wheel and the
#      small packages those pull in (six, regex, click, joblib, tqdm, pyyaml, scipy, psutil); torch is
#      the CPU build this machine installs (the node's CUDA build cannot be rehearsed here);
#  (b) the wheel folder exactly as README "On a GPU" tells a GPU user to prepare it, inside the tree
#      copy as it would travel (fails if it is over 60 MB);
#  (c) a copy of the tree as it travels to the node: tracked and untracked-not-ignored files only;
#  (d) scripts/gpu_check.py --cpu-dry-run in that copy with the network cut off (`unshare --net`; where
#      unshare is missing or not permitted it says so and runs with the network up, offline by flags only);
#  (e) fails unless gpu_check.json is written with every part "passed".
#
#   bash scripts/gpu_rehearsal.sh [download]    # "download": only fetch what (a) and (b) need, then stop
#
# REHEARSAL_DIR (default: ../flexlora-gpu-rehearsal beside the tree) holds the venv, the downloads, the
# tree copy and the output; it is this script's own folder and is rebuilt on every run, except its
# downloads/. REHEARSAL_PYTHON picks the interpreter (default python3), REHEARSAL_TORCH the torch
# requirement (default torch==2.13.0, from wherever pip finds it: the project's CPU pin).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${REHEARSAL_DIR:-$(dirname "$ROOT")/flexlora-gpu-rehearsal}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
case "$WORK/" in "$ROOT"/*) echo "gpu_rehearsal: REHEARSAL_DIR must be outside the tree ($WORK)" >&2; exit 2 ;; esac
CACHE="$WORK/downloads"
PYTHON="${REHEARSAL_PYTHON:-python3}"
TORCH="${REHEARSAL_TORCH:-torch==2.13.0}"
PEFT_FLOOR="$(sed -n 's/^ *"peft>=\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")"
[ -n "$PEFT_FLOOR" ] || { echo "gpu_rehearsal: no peft floor found in pyproject.toml" >&2; exit 2; }
NODE=(transformers==5.17.0 safetensors==0.8.0 numpy tokenizers rich matplotlib pytest hypothesis setuptools wheel six regex click joblib tqdm pyyaml scipy psutil)
NEEDS_TORCH=("peft==$PEFT_FLOOR" accelerate)  # fetched without their dependencies (torch comes from the CPU pin)
MAX_WHEELS_MB=60
MAX_TRAVEL_MIB=64
START=$(date +%s)
say() { echo "gpu_rehearsal: $*"; }

# -- downloads (the only step that needs the network) ------------------------------------------------
mkdir -p "$CACHE"
say "downloads -> $CACHE"
"$PYTHON" -m pip download --quiet --disable-pip-version-check -d "$CACHE" "$TORCH" "${NODE[@]}"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps -d "$CACHE" "${NEEDS_TORCH[@]}"
# (b) the wheel folder, as README "On a GPU" prepares it (rouge-score publishes no wheel: build it)
rm -rf "$CACHE/gpu_wheels"
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$CACHE/gpu_wheels" rouge-score==0.1.2
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps -d "$CACHE/gpu_wheels" absl-py nltk defusedxml
WHEELS_BYTES=$(du -sb "$CACHE/gpu_wheels" | cut -f1)
say "wheel folder: $(ls "$CACHE/gpu_wheels" | tr '\n' ' ')($((WHEELS_BYTES / 1000)) kB)"
if [ "$WHEELS_BYTES" -gt $((MAX_WHEELS_MB * 1000 * 1000)) ]; then say "FAILED: the wheel folder is over $MAX_WHEELS_MB MB"; exit 1; fi
[ "${1:-}" = "download" ] && { say "downloads done"; exit 0; }

# -- (a) the node's environment, offline from the downloads ------------------------------------------
rm -rf "$WORK/venv" "$WORK/tree" "$WORK/out"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$CACHE" "$TORCH" "${NODE[@]}" "${NEEDS_TORCH[@]}"
say "environment: $("$VPY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|safetensors|accelerate|tokenizers|numpy|six)==' | tr '\n' ' ')"
for missing in flexlora rouge_score nltk absl defusedxml gguf tomli_w flwr dp_accounting; do
    if "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$missing') is None)"; then say "FAILED: $missing is in the rehearsal environment; the node has no such package"; exit 1; fi
done

# -- (c) the tree as it travels: tracked + untracked-not-ignored files, the wheel folder inside it --
mkdir -p "$WORK/tree"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$WORK/tree"
cp -r "$CACHE/gpu_wheels" "$WORK/tree/gpu_wheels"
[ ! -e "$WORK/tree/.venv" ] || { say "FAILED: .venv travelled with the tree"; exit 1; }
TRAVEL=$(du -sb "$WORK/tree" | cut -f1)
say "tree as it travels: $(find "$WORK/tree" -type f | wc -l) files, $((TRAVEL / 1024)) KiB (limit $MAX_TRAVEL_MIB MiB)"
if [ "$TRAVEL" -gt $((MAX_TRAVEL_MIB * 1024 * 1024)) ]; then say "FAILED: the tree is over $MAX_TRAVEL_MIB MiB"; exit 1; fi

# -- (d) the dry run with the network cut ------------------------------------------------------------
mkdir -p "$WORK/out"
RUN=(env -u PYTHONPATH HF_HUB_OFFLINE=1 "$VPY" scripts/gpu_check.py --cpu-dry-run --wheels gpu_wheels --out "$WORK/out/")
if command -v unshare >/dev/null && unshare --net true 2>/dev/null; then
    say "running gpu_check --cpu-dry-run under unshare --net (no network)"
    (cd "$WORK/tree" && unshare --net -- "${RUN[@]}") || true
else
    say "unshare --net is not available here: running WITH the network up (pip --no-index and HF_HUB_OFFLINE=1 keep it offline by flags only, which proves less)"
    (cd "$WORK/tree" && "${RUN[@]}") || true
fi

# -- (e) every part complete ------------------------------------------------------------------------
"$VPY" - "$WORK/out/gpu_check.json" "$START" <<'EOF'
import json, sys, time
path, start = sys.argv[1], float(sys.argv[2])
try:
    result = json.load(open(path))
except (OSError, ValueError) as e:
    sys.exit(f"gpu_rehearsal: FAILED: no readable gpu_check.json ({e})")
parts = result.get("parts", {})
statuses = {name: parts.get(name, {}).get("status", "missing") for name in ("tests", "federated", "aggregation", "training")}
errors = result.get("setup", {}).get("errors", [])
print(f"gpu_rehearsal: set-up errors: {errors or 'none'}; parts: {statuses}; gpu_check wall {result.get('wall_s', 0):.0f} s; rehearsal wall {time.time() - start:.0f} s")
if errors or any(s != "passed" for s in statuses.values()):
    sys.exit(f"gpu_rehearsal: FAILED (see {path})")
print(f"gpu_rehearsal: passed ({path})")
EOF

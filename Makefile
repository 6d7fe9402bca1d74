# llamabox: the two set-up commands are `make serve` and `make test`.
# Each creates .venv (once) and installs what it needs; both are safe to run again.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llamabox-installed
ARGS   ?=

.PHONY: serve test bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing llamabox (the first install builds llama.cpp from source: 4-8 minutes)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/llamabox serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Llama 2 7B shapes, random weights, Q4_K_M (needs ~34 GB free disk; about an hour on 2 cores:
# ~14 min to make, convert and quantize the checkpoint, ~40 min of measuring).
bench: $(STAMP)
	$(PY) bench/synth7b.py --dir bench/scratch
	$(PY) bench/run.py --model bench/scratch/synth7b.q4_k_m.gguf $(ARGS)

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

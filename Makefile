# One local virtual environment, created on first use and reused.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

.PHONY: install demo test lint
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/comask demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check comask tests
	@# A crash (signal) ends pytest without a summary: name the test that was running, from conftest's log.
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -x --durations=15 || { rc=$$?; \
	  [ $$rc -gt 128 ] && echo "pytest died (exit $$rc) in: $$(cat .pytest-running 2>/dev/null)"; exit $$rc; }

lint: $(STAMP)
	$(BIN)/ruff check comask tests

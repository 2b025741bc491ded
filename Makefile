# Two entry points for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.torchslim-installed

.PHONY: setup data demo test bench clean

$(STAMP): pyproject.toml requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q -e '.[export,test]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist (idx files in /usr/share/datasets/fashion-mnist).
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "$$TORCHSLIM_DATA" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; \
	fi

demo: setup data
	$(BIN)/torchslim demo

test: setup data
	$(BIN)/python -m pytest

bench: setup data
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info runs

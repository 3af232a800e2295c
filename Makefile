# faceps set-up and the two main commands. Each target creates the environment when
# missing and is fast when nothing changed.
#   make demo   - synthesize a three-light capture with the built-in model and process it
#   make test   - lint (ruff) and the test suite (pytest)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.faceps-installed
TORCH  := torch==2.13.0
OUT    ?= demo-out

.PHONY: demo test lint setup system clean

demo: setup
	$(BIN)/faceps demo --out $(OUT)

test: setup
	$(BIN)/ruff check faceps tests bench
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check faceps tests bench

setup: system $(STAMP)

# System library open3d needs (libusb-1.0); installed with apt-get when missing and possible.
system:
	@sh scripts/ensure-system-deps.sh

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first: a looser requirement resolves to a CUDA build of
# several GB. The rest comes from pyproject.toml.
$(STAMP): pyproject.toml $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,sfm,landmarks,ray]'
	@touch $@

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache

# vitune: the set-up contract. `make demo` and `make test` install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=


.PHONY: install browser test test-slow clean

install: $(STAMP)

# torch first, pinned to the local CPU wheel: a bare `torch` requirement would pull CUDA builds.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The web demo's test drives Debian's Chromium (headless, through playwright); never a downloaded browser.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: install browser
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build src/*.egg-info

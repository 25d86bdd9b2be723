# `make run` and `make test` each do the whole set-up on a fresh Debian machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PKGS := fuse3 libfuse3-dev pkg-config rsync attr git sqlite3 systemd
# The peers `make bench` measures against (borg mount needs llfuse).
BENCH_PKGS := restic borgbackup python3-llfuse
CONFIG  ?= config/dwsd.yaml

.PHONY: setup system-packages bench-packages apt-install run test lint clean bench

setup: system-packages $(BIN)/.installed

# Install only what is missing, so a set-up machine does not need apt or the network.
system-packages:
	@$(MAKE) --no-print-directory apt-install PKGS="$(APT_PKGS)"

bench-packages:
	@$(MAKE) --no-print-directory apt-install PKGS="$(BENCH_PKGS)"

apt-install:
	@missing=""; for p in $(PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: setup
	$(BIN)/python -m dwsd.cli.demo --config $(CONFIG)
	exec $(BIN)/dwsd --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/mypy

bench: setup bench-packages
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache

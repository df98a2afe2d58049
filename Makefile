# berth: build, install, run and test.
#
#   make deps      Debian packages the runtime and the tests need (only the missing ones)
#   make install   deps + the Python package (editable) + systemd unit, tmpfiles.d entry, example config
#   make run       install, then berthd in the foreground with its defaults
#   make test      install, then the unit, integration, security and short chaos tests
#   make bench     containerd + install, then the figures side by side with containerd
#   make lint      pyflakes over every package and the tests
#   make chaos     fault-injection soak for $(DURATION) seconds
#
# Everything here runs as root: berthd mounts, creates cgroups and runs containers.

PYTHON      ?= python3
PIP         ?= $(PYTHON) -m pip
PYTEST_ARGS ?= -n 2 -q
DURATION    ?= 600

# runc and crun: OCI runtimes; docker-registry, skopeo, umoci: a local registry and
# tools to fill it; busybox-static: the test image's payload; criu: checkpoint and
# restore; apache2-utils: htpasswd, for registries behind basic auth.
DEBS        := runc crun docker-registry skopeo umoci busybox-static criu apache2-utils
# Only the benchmarks compare against containerd.
BENCH_DEBS  := containerd

SYSTEMD_UNIT_DIR := /etc/systemd/system
TMPFILES_DIR     := /usr/lib/tmpfiles.d
CONFIG_DIR       := /etc/berth
BIN_DIR          := /usr/local/bin

# install_debs(packages): apt-get only what dpkg does not report as installed,
# refreshing the package lists once and only if something is missing. The
# packages' own services (docker-registry, containerd) are kept from starting
# unless the machine already has a policy: the tests and benchmarks start their
# own on ports and roots they choose.
define install_debs
	@missing=; \
	for p in $(1); do \
		case "$$(dpkg-query -W -f='$${Status}' $$p 2>/dev/null)" in \
			*" ok installed") ;; \
			*) missing="$$missing $$p" ;; \
		esac; \
	done; \
	if [ -z "$$missing" ]; then \
		echo "deps: $(strip $(1)) already installed"; \
	else \
		echo "deps: installing$$missing"; \
		policy=; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			policy=/usr/sbin/policy-rc.d; \
			printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 0755 $$policy; \
			trap 'rm -f $$policy' EXIT; \
		fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && \
		apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $$missing; \
	fi
endef

.PHONY: all deps bench-deps install run test bench lint chaos

all: install

deps:
	$(call install_debs,$(DEBS))

# Both lists in one pass, so a fresh machine refreshes the package lists once.
bench-deps:
	$(call install_debs,$(DEBS) $(BENCH_DEBS))

# Bytecode is compiled here once: with PYTHONDONTWRITEBYTECODE set (as on many CI machines)
# Python would otherwise compile berth's modules on every start. `berth` and `berthd` in
# $(BIN_DIR) are the launchers berth/cli/launcher.py writes: the interpreter started without
# site's .pth hooks.
install: deps
	$(PIP) install -e '.[test]'
	$(PYTHON) -m compileall -q berth bus actors shimd
	install -d $(BIN_DIR)
	for s in berth berthd; do $(PYTHON) -m berth.cli.launcher $$s $(BIN_DIR)/$$s; done
	install -D -m 0644 systemd/berthd.service $(SYSTEMD_UNIT_DIR)/berthd.service
	install -D -m 0644 systemd/berth.conf $(TMPFILES_DIR)/berth.conf
	install -D -m 0644 systemd/config.toml.example $(CONFIG_DIR)/config.toml.example

# The launcher just written, not whatever `berthd` PATH finds first.
run: install
	$(BIN_DIR)/berthd

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: bench-deps install
	$(PYTHON) -m tests.bench

lint: install
	$(PYTHON) -m pyflakes bus actors berth shimd tests

chaos: install
	$(PYTHON) -m tests.chaos --duration $(DURATION)

# hv-vss-agent: `make demo` and `make test` install what they need themselves.
# As root they also install system packages and create the unprivileged account.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
USER_NAME := hvvss
ROOT    := $(shell id -u)
TESTS   ?=

.PHONY: demo test lint bench syscalls mutate deps container-deps account venv clean install \
        uninstall check-install systemd-container

# Installation (Linux): a root-owned virtualenv holding the agent and its two dependencies,
# the command, the systemd unit, sysusers and tmpfiles entries, the man page, and the
# example config if there is none yet.  DESTDIR stages it for a package; PREFIX moves it.
PREFIX     ?= /usr/local
SYSCONFDIR ?= /etc
PYTHON3    ?= /usr/bin/python3
LIBDIR     ?= $(PREFIX)/lib/hv-vss-agent
BINDIR     ?= $(PREFIX)/bin
MANDIR     ?= $(PREFIX)/share/man
# systemd reads units, sysusers.d and tmpfiles.d under /usr/lib and /usr/local/lib, not
# under other prefixes: elsewhere they go to /etc.
SDLIB      := $(if $(filter /usr /usr/local,$(PREFIX)),$(PREFIX)/lib,$(SYSCONFDIR))
UNITDIR    ?= $(if $(filter /usr /usr/local,$(PREFIX)),$(PREFIX)/lib/systemd/system,$(SYSCONFDIR)/systemd/system)
SYSUSERSDIR ?= $(SDLIB)/sysusers.d
TMPFILESDIR ?= $(SDLIB)/tmpfiles.d
CONFIG     := $(SYSCONFDIR)/hv-vss-agent.toml

# As root in a clone that is not root's alone (`sudo make test` in your own clone), root
# would run code that someone else can change, which the agent refuses: so root works in
# a root-owned copy under STAGE_ROOT instead, and nothing in the clone becomes root's.
STAGE_ROOT ?= /var/tmp/hv-vss-agent-root
STAGE   := $(STAGE_ROOT)/$(notdir $(CURDIR))-$(shell printf %s "$(CURDIR)" | cksum | cut -d" " -f1)
NOT_ROOTS := $(if $(filter 0,$(ROOT)),$(shell sh tools/root_copy.sh why "$(CURDIR)"))
ROOT_HOME := $(or $(shell getent passwd 0 | cut -d: -f6),/root)

ifneq ($(NOT_ROOTS),)

demo test lint bench syscalls mutate deps container-deps systemd-container account venv:
	@echo "make: $(NOT_ROOTS): as root, make works in a root-owned copy, $(STAGE)" \
	  "(sudo make clean removes it)"
	@sh tools/root_copy.sh sync "$(CURDIR)" "$(STAGE)" "$(STAGE_ROOT)"
	@HOME="$(ROOT_HOME)" PIP_CACHE_DIR="$(STAGE_ROOT)/pip-cache" \
	  $(MAKE) --no-print-directory -C "$(STAGE)" $@
	@$(if $(filter bench,$@),sh tools/root_copy.sh back "$(CURDIR)" "$(STAGE)" \
	  BENCHMARKS.md bench/out/scale.png,:)
	@$(if $(filter mutate,$@),sh tools/root_copy.sh back "$(CURDIR)" "$(STAGE)" SECURITY.md,:)

clean:
	rm -rf "$(STAGE)" $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

else

demo: deps account venv
	$(VENV)/bin/hv-vss-agent --simulate

# TESTS: pytest arguments, such as TESTS=tests/test_config.py (default: the whole suite)
test: deps container-deps account venv
	$(VPY) -m pytest -q $(TESTS)

lint: venv
	$(VENV)/bin/ruff check agent privileged tests tools bench
	$(VENV)/bin/mypy
	$(VENV)/bin/bandit -q -ll -c bandit.yaml -r agent privileged
	$(VPY) -m tools.root_loc --no-rss --figures

# The syscalls the sandboxed agent makes, measured with strace (see SECURITY.md).
syscalls: deps account venv
	$(VPY) -m tools.measure_syscalls

# Mutation testing of the root side (tools/mutation/): long; resumable; not part of `make test`.
# Options through MUTATE, e.g. make mutate MUTATE="--module privileged/wire.py --sample 20".
mutate: deps account venv
	$(VPY) -m tools.mutation $(MUTATE)

bench: deps account venv
	$(VPY) -m pip install -q -e '.[bench]'
	$(VPY) -m bench

# The shipped unit started by a real systemd (PID 1 of a throw-away Debian container),
# the agent installed inside by the README's steps and checked from outside.  The Debian
# tree is cached in /var/cache/hv-vss-agent-test (HVVSS_CONTAINER_CACHE); `make test` runs
# the same test.
systemd-container: deps container-deps account venv
	HVVSS_CONTAINER_REPORT=$${HVVSS_CONTAINER_REPORT:-/tmp/hv-vss-agent-container.json} \
	  $(VPY) -m pytest -q -s tests/test_systemd_container.py
	@cat $${HVVSS_CONTAINER_REPORT:-/tmp/hv-vss-agent-container.json}; echo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,lint]'
	touch $@

# System packages (filesystem tools for the scratch filesystems); root only.
deps:
	@if [ "$(ROOT)" = 0 ]; then \
	  missing=""; \
	  for t in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs mkfs.vfat:dosfstools \
	           losetup:util-linux sqlite3:sqlite3 strace:strace sudo:sudo; do \
	    command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; \
	  done; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  [ -e /usr/include/asm-generic/unistd.h ] || missing="$$missing linux-libc-dev"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	  fi; \
	else echo "not root: skipping system packages"; fi

# debootstrap and systemd-nspawn, for the test that starts the unit under systemd; root only.
container-deps:
	@if [ "$(ROOT)" = 0 ]; then \
	  missing=""; \
	  for t in debootstrap:debootstrap systemd-nspawn:systemd-container; do \
	    command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; \
	  done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; }; \
	  fi; \
	fi

# The unprivileged account the parent drops to (same as etc/sysusers.d); root only.
account:
	@if [ "$(ROOT)" = 0 ] && ! id $(USER_NAME) >/dev/null 2>&1; then \
	  echo "creating account $(USER_NAME)"; \
	  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $(USER_NAME); \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

endif

# Root runs this code, so every file and directory of it must be root's and writable by
# nobody else (agent/engine/integrity.py refuses it otherwise): root installs, with umask 022.
# The package is built from a copy, so a clone owned by someone else gets no root-owned
# build/ or egg-info.  Only a real install (no DESTDIR) creates the account and /var/empty.
install:
	@[ "$(ROOT)" = 0 ] || { echo "make install: run it as root (the agent runs only root-owned code)"; exit 1; }
	@[ -x "$(PYTHON3)" ] || { echo "make install: $(PYTHON3) not found (apt-get install python3 python3-venv)"; exit 1; }
	@set -e; umask 022; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir "$$tmp/src"; cp -R agent privileged pyproject.toml README.md "$$tmp/src/"; \
	find "$$tmp/src" -name __pycache__ -prune -exec rm -rf {} +; \
	$(PYTHON3) -m venv "$$tmp/pip" || { echo "make install: python3 -m venv failed (apt-get install python3-venv)"; exit 1; }; \
	echo "installing the agent into $(DESTDIR)$(LIBDIR)"; \
	$(PYTHON3) -m venv --clear --without-pip "$(DESTDIR)$(LIBDIR)"; \
	"$$tmp/pip/bin/python" -m pip -q --disable-pip-version-check --python "$(DESTDIR)$(LIBDIR)/bin/python" \
	  install --no-compile --no-warn-script-location "$$tmp/src"; \
	rm -f "$(DESTDIR)$(LIBDIR)"/bin/[Aa]ctivate*; \
	if [ -n "$(DESTDIR)" ]; then \
	  grep -rlIF -- "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(LIBDIR)/bin" "$(DESTDIR)$(LIBDIR)/pyvenv.cfg" \
	    | xargs -r sed -i 's|$(DESTDIR)$(LIBDIR)|$(LIBDIR)|g'; \
	  "$(DESTDIR)$(LIBDIR)/bin/python" -m compileall -q -s "$(DESTDIR)" "$(DESTDIR)$(LIBDIR)/lib"; \
	else "$(LIBDIR)/bin/python" -m compileall -q "$(LIBDIR)/lib"; fi; \
	install -d "$(DESTDIR)$(BINDIR)" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(SYSUSERSDIR)" \
	  "$(DESTDIR)$(TMPFILESDIR)" "$(DESTDIR)$(MANDIR)/man8" "$(DESTDIR)$(SYSCONFDIR)"; \
	main=$$("$(DESTDIR)$(LIBDIR)/bin/python" -I -c 'import agent, os; print(os.path.join(os.path.dirname(agent.__file__), "__main__.py"))'); \
	main=$${main#"$(DESTDIR)"}; rm -f "$(DESTDIR)$(BINDIR)/hv-vss-agent"; \
	printf '#!/bin/sh\n# -I: no PYTHON* variable, no user site; -S: no site.py, so no .pth file runs as root.\nexec %s -I -S %s "$$@"\n' \
	  "$(LIBDIR)/bin/python" "$$main" > "$(DESTDIR)$(BINDIR)/hv-vss-agent"; \
	chmod 0755 "$(DESTDIR)$(BINDIR)/hv-vss-agent"; \
	sed 's|/usr/local/bin/hv-vss-agent|$(BINDIR)/hv-vss-agent|' etc/systemd/hv-vss-agent.service \
	  > "$(DESTDIR)$(UNITDIR)/hv-vss-agent.service"; \
	chmod 0644 "$(DESTDIR)$(UNITDIR)/hv-vss-agent.service"; \
	install -m 0644 etc/sysusers.d/hv-vss-agent.conf "$(DESTDIR)$(SYSUSERSDIR)/hv-vss-agent.conf"; \
	install -m 0644 etc/tmpfiles.d/hv-vss-agent.conf "$(DESTDIR)$(TMPFILESDIR)/hv-vss-agent.conf"; \
	install -m 0644 man/hv-vss-agent.8 "$(DESTDIR)$(MANDIR)/man8/hv-vss-agent.8"; \
	if [ -e "$(DESTDIR)$(CONFIG)" ]; then echo "keeping $(DESTDIR)$(CONFIG)"; \
	else install -m 0644 etc/hv-vss-agent.toml "$(DESTDIR)$(CONFIG)"; fi; \
	if [ -z "$(DESTDIR)" ]; then \
	  systemd-sysusers hv-vss-agent.conf; \
	  systemd-tmpfiles --create hv-vss-agent.conf; \
	  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	fi
	@if [ -z "$(DESTDIR)" ]; then $(MAKE) -s check-install || exit 1; \
	  echo "installed; start it with: systemctl enable --now hv-vss-agent"; fi

# The agent's own check of what root runs (agent/engine/integrity.py), on the installed tree, by the
# installed interpreter with -I so that nothing from this clone is imported.
define CHECK_INSTALL
import sys
import multiprocessing_logging, psutil  # the agent imports both as root: check them too
from agent.errors import StartupError
from agent.engine.integrity import check_install
try:
    check_install(sys.argv[1] if len(sys.argv) > 1 else None)
except StartupError as e:
    sys.exit(f"hv-vss-agent: {e}")
print(f"install check passed: {sys.prefix}")
endef
export CHECK_INSTALL

check-install:
	@"$(DESTDIR)$(LIBDIR)/bin/python" -I -c "$$CHECK_INSTALL" $(wildcard $(DESTDIR)$(CONFIG))

uninstall:
	@[ "$(ROOT)" = 0 ] || { echo "make uninstall: run it as root"; exit 1; }
	rm -rf "$(DESTDIR)$(LIBDIR)"
	rm -f "$(DESTDIR)$(BINDIR)/hv-vss-agent" "$(DESTDIR)$(UNITDIR)/hv-vss-agent.service" \
	  "$(DESTDIR)$(SYSUSERSDIR)/hv-vss-agent.conf" "$(DESTDIR)$(TMPFILESDIR)/hv-vss-agent.conf" \
	  "$(DESTDIR)$(MANDIR)/man8/hv-vss-agent.8"
	@[ ! -e "$(DESTDIR)$(CONFIG)" ] || echo "kept $(DESTDIR)$(CONFIG) (remove it by hand)"

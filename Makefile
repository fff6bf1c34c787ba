# hv-vss-agent: `make demo` and `make test` install what they need themselves.
# As root they also install system packages and create the unprivileged account.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
USER_NAME := hvvss
ROOT    := $(shell id -u)
TESTS   ?=

.PHONY: demo test lint bench syscalls deps account venv clean

# As root in a clone that is not root's alone (`sudo make test` in your own clone), root
# would run code that someone else can change, which the agent refuses: so root works in
# a root-owned copy under STAGE_ROOT instead, and nothing in the clone becomes root's.
STAGE_ROOT ?= /var/tmp/hv-vss-agent-root
STAGE   := $(STAGE_ROOT)/$(notdir $(CURDIR))-$(shell printf %s "$(CURDIR)" | cksum | cut -d" " -f1)
NOT_ROOTS := $(if $(filter 0,$(ROOT)),$(shell sh tools/root_copy.sh why "$(CURDIR)"))
ROOT_HOME := $(or $(shell getent passwd 0 | cut -d: -f6),/root)

ifneq ($(NOT_ROOTS),)

demo test lint bench syscalls deps account venv:
	@echo "make: $(NOT_ROOTS): as root, make works in a root-owned copy, $(STAGE)" \
	  "(sudo make clean removes it)"
	@sh tools/root_copy.sh sync "$(CURDIR)" "$(STAGE)" "$(STAGE_ROOT)"
	@HOME="$(ROOT_HOME)" PIP_CACHE_DIR="$(STAGE_ROOT)/pip-cache" \
	  $(MAKE) --no-print-directory -C "$(STAGE)" $@
	@$(if $(filter bench,$@),sh tools/root_copy.sh back "$(CURDIR)" "$(STAGE)" \
	  BENCHMARKS.md bench/out/scale.png,:)

clean:
	rm -rf "$(STAGE)" $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

else

demo: deps account venv
	$(VENV)/bin/hv-vss-agent --simulate

# TESTS: pytest arguments, such as TESTS=tests/test_config.py (default: the whole suite)
test: deps account venv
	$(VPY) -m pytest -q $(TESTS)

lint: venv
	$(VENV)/bin/ruff check agent privileged tests tools bench
	$(VENV)/bin/mypy
	$(VENV)/bin/bandit -q -ll -c bandit.yaml -r agent privileged

# The syscalls the sandboxed agent makes, measured with strace (see SECURITY.md).
syscalls: deps account venv
	$(VPY) -m tools.measure_syscalls

bench: deps account venv
	$(VPY) -m pip install -q -e '.[bench]'
	$(VPY) -m bench

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

# The unprivileged account the parent drops to (same as etc/sysusers.d); root only.
account:
	@if [ "$(ROOT)" = 0 ] && ! id $(USER_NAME) >/dev/null 2>&1; then \
	  echo "creating account $(USER_NAME)"; \
	  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $(USER_NAME); \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

endif

# minivmm: every target installs what it needs (Debian 12, run as root or with sudo).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: the guest build's list (guest/debian-packages.txt), plus what the
# tests and `make run` use on the host (mkfs.ext4, debugfs, dumpe2fs; venv).
DEBS := $(shell grep -v '^\#' guest/debian-packages.txt) e2fsprogs python3-venv
PYTEST_ARGS ?=

.PHONY: all deps venv guest run test test-fast bench clean
all: guest

venv: $(STAMP)
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

deps:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

guest: deps venv
	$(PY) -m minivmm guest build

# The default pmem image: 4 GiB sparse, ext4 with 4 KiB blocks (ext4 DAX needs block size = page
# size) and stripe_width=512 blocks, so ext4 allocates extents 2 MiB aligned and DAX can map them
# with 2 MiB (PMD) faults (README "DAX with 2 MiB pages"). PMEM_SIZE must be a multiple of 2M.
PMEM_IMG ?= pmem.img
PMEM_SIZE ?= 4G
$(PMEM_IMG):
	truncate -s $(PMEM_SIZE) $@.tmp && mkfs.ext4 -q -F -b 4096 -E stripe_width=512 -L minivmm $@.tmp && mv $@.tmp $@

run: guest $(PMEM_IMG)
	$(VENV)/bin/minivmm run --pmem $(PMEM_IMG) $(ARGS)

test: guest
	$(PY) -m pytest -n 2 -v -rfE $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -n 2 -m 'not boot' $(PYTEST_ARGS)

bench: guest
	$(PY) bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache

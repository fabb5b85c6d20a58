# Two entry points on a fresh Debian 12 machine: `make demo` and `make test`.
# Each installs what it needs itself (apt, then a venv at .venv).

VENV := .venv
PY := $(VENV)/bin/python
# Debian's interpreter, not one under /root: clients running as `nobody` in
# the tests use the venv too.
PYTHON ?= /usr/bin/python3
STAMP := $(VENV)/.installed
APT_PACKAGES := qemu-system-x86 qemu-utils qemu-system-common libsystemd-dev pkg-config gcc \
	python3-venv python3-dev linux-image-amd64 busybox-static polkitd ovmf dbus cpio zstd xz-utils \
	systemd util-linux python3-pip python3-setuptools systemd-container mmdebstrap qemu-guest-agent
PREFIX ?= /usr
DESTDIR ?=
# dbus-daemon and polkitd read their policy from /usr/share only, whatever PREFIX is.
DBUS_POLICY_DIR ?= /usr/share/dbus-1/system.d
POLKIT_ACTIONS_DIR ?= /usr/share/polkit-1/actions
# Debian's pip installs under /usr/local whatever --prefix says, unless told
# the layout (as Debian's own packaging does); elsewhere the variable is ignored.
DEB_LAYOUT := $(if $(filter /usr,$(PREFIX)),deb_system,deb)

# The Nova driver's tests (integrations/nova) run in a venv of their own: Nova
# 34 pins much of what it imports, and SQLAlchemy must stay below 2.1.
NOVA := integrations/nova
NOVA_VENV := .venv-nova
NOVA_STAMP := $(NOVA_VENV)/.installed

.PHONY: all deps test lint unit integration demo bench install clean nova-deps nova-test

all: test

deps: $(STAMP)

$(STAMP): pyproject.toml
	apt-get update
	apt-get install -y --no-install-recommends $(APT_PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

lint: deps
	$(VENV)/bin/ruff check vmspawnd tests tools bench $(NOVA)
	$(VENV)/bin/ruff format --check vmspawnd tests tools bench $(NOVA)
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -v -p no:cacheprovider --durations=30 tests
	$(MAKE) nova-test

nova-deps: $(NOVA_STAMP)

# Nova, its test requirements, and vmspawnd itself (the level-2 tests start
# the daemon and reuse tests/integration's fixtures); pip from PyPI only.
$(NOVA_STAMP): pyproject.toml $(NOVA)/test-requirements.txt $(NOVA)/constraints.txt | $(STAMP)
	$(PYTHON) -m venv $(NOVA_VENV)
	$(NOVA_VENV)/bin/pip install -c $(NOVA)/constraints.txt -r $(NOVA)/test-requirements.txt -e '.[test]'
	touch $@

# The driver is installed as Nova would find it (into nova/virt/), afresh on
# every run so the tests see this tree's code; then its three levels.
nova-test: nova-deps
	rm -rf $(NOVA)/build
	$(NOVA_VENV)/bin/pip install --quiet --no-deps --force-reinstall ./$(NOVA)
	cd $(NOVA) && ../../$(NOVA_VENV)/bin/mypy
	cd $(NOVA) && ../../$(NOVA_VENV)/bin/python -m pytest -v -p no:cacheprovider driver_tests/unit driver_tests/integration
	# Nova's own suites (its base classes need stestr, not pytest): the
	# conformance suite and the two-host functional test, in one run.
	cd $(NOVA) && ../../$(NOVA_VENV)/bin/stestr run

demo: deps
	bash tools/demo.sh

bench: deps
	apt-get install -y --no-install-recommends libvirt-daemon-system libvirt-dev
	$(VENV)/bin/pip install -e '.[bench]'
	$(PY) bench/run.py

# The package and its commands (/usr/bin/vmspawnd, vmspawnctl) for Debian's
# python3, as a distribution package would; its dependencies (dbus-fast,
# qemu.qmp, python3-systemd) are the system's to provide.
install:
	# setuptools builds in build/: a module deleted since the last build must not be installed.
	rm -rf build
	DEB_PYTHON_INSTALL_LAYOUT=$(DEB_LAYOUT) $(PYTHON) -m pip install --quiet --no-deps --no-build-isolation \
		--no-warn-script-location --root-user-action=ignore --root=$(or $(DESTDIR),/) --prefix=$(PREFIX) .
	install -Dm644 units/vmspawnd.service $(DESTDIR)$(PREFIX)/lib/systemd/system/vmspawnd.service
	install -Dm644 dbus/org.vmspawnd1.conf $(DESTDIR)$(DBUS_POLICY_DIR)/org.vmspawnd1.conf
	install -Dm644 dbus/org.vmspawnd1.service $(DESTDIR)$(PREFIX)/share/dbus-1/system-services/org.vmspawnd1.service
	install -Dm644 dbus/org.vmspawnd1.Manager.xml $(DESTDIR)$(PREFIX)/share/dbus-1/interfaces/org.vmspawnd1.Manager.xml
	install -Dm644 dbus/org.vmspawnd1.Machine.xml $(DESTDIR)$(PREFIX)/share/dbus-1/interfaces/org.vmspawnd1.Machine.xml
	install -Dm644 dbus/org.vmspawnd1.policy $(DESTDIR)$(POLKIT_ACTIONS_DIR)/org.vmspawnd1.policy
	install -Dm644 completion/vmspawnctl.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/vmspawnctl
	install -Dm644 etc/vmspawnd.conf $(DESTDIR)/etc/vmspawnd/vmspawnd.conf

clean:
	rm -rf $(VENV) $(NOVA_VENV) build *.egg-info $(NOVA)/build $(NOVA)/*.egg-info $(NOVA)/.stestr

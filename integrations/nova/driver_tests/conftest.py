"""The driver's tests run as nova-compute runs: Nova's monkey patching comes
first, before anything imports socket, select or jeepney. nova.tests.unit
patches too, but only when something imports it, which may be after the
client took the unpatched selectors: a blocking call then holds the whole
process, and the green threads it waits for (a migration's listener) never
run."""

from nova import monkey_patch

monkey_patch.patch()

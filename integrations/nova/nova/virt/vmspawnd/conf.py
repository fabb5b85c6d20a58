"""The [vmspawnd] section of nova.conf."""

from oslo_config import cfg

group = cfg.OptGroup("vmspawnd", title="vmspawnd compute driver")

opts = [
    cfg.StrOpt(
        "bus_address",
        default="SYSTEM",
        help="D-Bus address of the bus vmspawnd serves on: SYSTEM (the system bus) or an address "
        "such as unix:path=/run/dbus/system_bus_socket.",
    ),
    cfg.StrOpt(
        "login1_bus_address",
        default="SYSTEM",
        help="D-Bus address of the bus systemd-logind serves on, for the host power actions "
        "(reboot, shutdown) an admin asks of this host.",
    ),
    cfg.StrOpt(
        "kernel",
        help="Boot every instance from this kernel (direct kernel boot) instead of its Glance image.",
    ),
    cfg.StrOpt("initrd", help="The initrd to go with 'kernel'."),
    cfg.StrOpt("cmdline", default="", help="The kernel command line to go with 'kernel'."),
    cfg.StrOpt(
        "image",
        help="Boot every instance from this local disk image (raw or qcow2, see image_format) "
        "instead of its Glance image; with 'kernel' it is the instance's disk.",
    ),
    cfg.StrOpt("image_format", default="raw", choices=["raw", "qcow2"], help="The format of 'image'."),
    cfg.StrOpt(
        "rescue_image",
        help="The disk a rescue boots from (as libvirt's rescue_image_id), for instances booted from "
        "the configured kernel or image; it is never written: the rescue machine writes to a "
        "copy-on-write layer over it in the instance's directory, gone at unrescue.",
    ),
    cfg.StrOpt("rescue_image_format", default="raw", choices=["raw", "qcow2"], help="The format of 'rescue_image'."),
    cfg.StrOpt("accel", default="auto", choices=["auto", "kvm", "tcg"], help="QEMU accelerator."),
    cfg.IntOpt(
        "hotplug_spares",
        default=2,
        min=0,
        help="Spare hotplug ports of an instance whose flavor asks for none "
        "(resources:CUSTOM_VMSPAWND_HOTPLUG_PORT=N in the flavor asks for N).",
    ),
    cfg.IntOpt(
        "hotplug_ports",
        default=256,
        min=0,
        help="Hotplug ports this host offers to the scheduler (the CUSTOM_VMSPAWND_HOTPLUG_PORT inventory).",
    ),
    cfg.IntOpt(
        "max_hotplug_spares",
        default=100,
        min=1,
        help="Most hotplug ports one instance may ask for (vmspawnd packs about 120 per machine).",
    ),
    cfg.StrOpt(
        "console_address",
        help="The address nova-compute listens on for Nova's console proxies (novncproxy, "
        "spicehtml5proxy, serialproxy) and names to them: vmspawnd's QEMU listens nowhere, the driver "
        "puts a TCP port of its own in front of each console. Default: Nova's own for the kind, "
        "[vnc] server_proxyclient_address, [spice] server_proxyclient_address or "
        "[serial_console] proxyclient_address.",
    ),
    cfg.StrOpt(
        "console_port_range",
        default="15900:16899",
        regex=r"^\d+:\d+$",
        help="The TCP ports (first:last) the console listeners take, one per instance and console kind.",
    ),
    cfg.IntOpt(
        "console_idle_timeout",
        default=0,
        min=0,
        help="Seconds a console port handed out keeps accepting connections (0: Nova's "
        "[consoleauth] token_ttl, how long its console token is valid). Connections made go on until "
        "either side closes.",
    ),
    cfg.IntOpt("call_timeout", default=120, min=1, help="Seconds to wait for vmspawnd's answer to one call."),
    cfg.IntOpt("unplug_timeout", default=10, min=1, help="Seconds to wait for the guest to release a detached volume."),
    cfg.IntOpt(
        "copy_timeout",
        default=1800,
        min=1,
        help="Seconds a disk copy may take: the root disk's for a snapshot, a volume's for a swap "
        "(vmspawnd cancels the copy past it).",
    ),
    cfg.StrOpt(
        "live_migration_inbound_addr",
        help="The address (IP or host name) this host listens on for an incoming live migration's TCP "
        "stream, on an ephemeral port; the default is my_ip.",
    ),
    cfg.IntOpt(
        "live_migration_accept_timeout",
        default=360,
        min=1,
        help="Seconds a destination waits for the source's migration stream after pre_live_migration "
        "(the source may first wait vif_plugging_timeout for Neutron).",
    ),
    cfg.IntOpt(
        "live_migration_completion_timeout",
        default=800,
        min=1,
        help="Seconds per GiB of guest memory (at least 2 GiB counted) a live migration may take before "
        "it is cancelled and the guest runs on at the source (as libvirt's option of that name).",
    ),
    cfg.IntOpt(
        "live_migration_bandwidth",
        default=0,
        min=0,
        help="Most MiB/s a live migration sends; 0 leaves it to QEMU.",
    ),
]


def register(conf: cfg.ConfigOpts) -> None:
    conf.register_group(group)
    conf.register_opts(opts, group=group)


def list_opts() -> list[tuple[cfg.OptGroup, list[cfg.Opt]]]:
    return [(group, opts)]

"""A Nova compute driver that runs instances as vmspawnd machines.

Every call goes to the host's vmspawnd over D-Bus (client.py); the driver
itself keeps no state: what runs, with which drives, is the daemon's.
Instances are created with `keep`, so a powered-off instance stays defined
with its volumes, and power_on starts it again.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from typing import Any

import nova.conf
import os_resource_classes as orc
from nova.compute import power_state, task_states, vm_states
from nova.compute import utils as compute_utils
from nova.console import type as ctype
from nova.image import glance
from nova.objects import diagnostics as diagnostics_obj
from nova.objects import fields
from oslo_concurrency import processutils
from oslo_log import log as logging
from oslo_serialization import jsonutils
from oslo_utils import units, versionutils

from nova import context as nova_context
from nova import exception, objects
from nova.virt import driver, hardware, images
from nova.virt.vmspawnd import client as vclient
from nova.virt.vmspawnd import conf as vconf
from nova.virt.vmspawnd import consoleproxy, hostpower, mapping, transport

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF
vconf.register(CONF)

# What libvirt returns at most for the console log (nova.virt.libvirt.driver).
MAX_CONSOLE_BYTES = 100 * units.Ki
HYPERVISOR_TYPE = fields.HVType.QEMU
FORCED_OFF = 1e-6  # s
# The reason recorded on this host's nova-compute service when set_host_enabled disables it.
HOST_DISABLED_REASON = "disabled by set_host_enabled (os-hosts)"
# What a rescue adds to the instance's directory (libvirt's suffix): gone at unrescue.
RESCUE_FILES = ".rescue"
# The serial by which a rescue machine's guest finds the instance's own disk.
RESCUED_DISK_SERIAL = "nova-rescued-disk"
# Beside instances_path/<uuid> during a resize: the disks as they were (libvirt's suffix).
RESIZE_STASH = "_resize"
# The daemon's id of a machine's first boot drive: the instance's own disk.
ROOT_DRIVE = "disk0"
# In instances_path: one file per compute (named by its my_ip) that writes there,
# so a source host knows which destinations see its instance directories.
COMPUTES_SEEING = ".vmspawnd-computes"
# A live migration's destination check leaves such a file in instances_path:
# a source that sees it shares the destination's (libvirt's check).
SHARED_CHECK = ".vmspawnd-shared-"


def local_volume(data: dict[str, Any]) -> tuple[str, str]:
    """os-brick's 'local' connection: a block device or file already on this host."""
    path = data.get("device_path")
    if not path:
        raise exception.VolumeDriverNotFound(driver_type="local (without a device_path)")
    return path, data.get("format", "raw")


class VmspawndDriver(driver.ComputeDriver):
    capabilities = {
        "has_imagecache": False,
        "supports_evacuate": False,
        "supports_migrate_to_same_host": False,
        "supports_attach_interface": False,
        "supports_device_tagging": False,
        "supports_tagged_attach_interface": False,
        "supports_tagged_attach_volume": False,
        "supports_extend_volume": False,
        "supports_multiattach": False,
        "supports_trusted_certs": False,
        "supports_pcpus": False,
        "supports_accelerators": False,
        "supports_remote_managed_ports": False,
        "supports_address_space_passthrough": False,
        "supports_address_space_emulated": False,
        "supports_stateless_firmware": False,
        "supports_virtio_fs": False,
        "supports_mem_backing_file": False,
        "supports_image_type_raw": True,
        "supports_image_type_qcow2": True,
        "supports_image_type_aki": False,
        "supports_image_type_ami": False,
        "supports_image_type_ari": False,
        "supports_image_type_iso": False,
        "supports_image_type_vdi": False,
        "supports_image_type_vhd": False,
        "supports_image_type_vhdx": False,
        "supports_image_type_vmdk": False,
        "supports_image_type_ploop": False,
    }

    # driver_volume_type -> (path, format) on this host; other types are refused.
    volume_types = {"local": local_volume}

    def __init__(self, virtapi: Any, read_only: bool = False) -> None:
        super().__init__(virtapi)
        self.client = vclient.Client(CONF.vmspawnd.bus_address, timeout=CONF.vmspawnd.call_timeout)
        # Live migrations this host sends, by instance uuid (as libvirt's):
        # what was asked of each meanwhile ("abort").
        self.active_migrations: dict[str, deque[str]] = {}
        # Incoming live migrations, by instance uuid: each one's listener,
        # from pre_live_migration to post_live_migration_at_destination or the rollback.
        self._incoming: dict[str, transport.Listener] = {}
        # This host's name, as init_host gets it (several computes may share one process in tests).
        self._host = str(CONF.host)
        # The TCP ports in front of the instances' consoles (Nova's proxies connect there).
        self._consoles = consoleproxy.Consoles()

        self._image_api = glance.API()

    # -- the host ---------------------------------------------------------

    def init_host(self, host: str) -> None:
        self._host = host
        try:
            self.client.list_machines()
        except vclient.VmspawndError as e:
            raise exception.HypervisorUnavailable(host=f"{host} (vmspawnd: {e})") from e
        self._announce_instances_path()

    def cleanup_host(self, host: str) -> None:
        self._consoles.close_all()
        for listener in self._incoming.values():
            listener.close()
        self.client.close()

    def set_host_enabled(self, enabled: bool) -> str:
        """This host's nova-compute service record, as libvirt's _set_host_enabled
        keeps it: disabled (with a reason) or enabled, so the scheduler's
        ComputeFilter skips it or not (the compute manager sets the provider's
        COMPUTE_STATUS_DISABLED trait). It is the operator's call (os-hosts),
        so unlike libvirt's automatic one it also undoes a manual disable."""
        service = objects.Service.get_by_compute_host(nova_context.get_admin_context(), self._host)
        service.disabled = not enabled
        service.disabled_reason = None if enabled else HOST_DISABLED_REASON
        service.save()
        LOG.info("compute service on %s %s", self._host, "enabled" if enabled else "disabled")
        return "enabled" if enabled else "disabled"

    def get_available_nodes(self, refresh: bool = False) -> list[str]:
        return [self._host]

    def get_host_ip_addr(self) -> str:
        return str(CONF.my_ip)

    def get_volume_connector(self, instance: Any) -> dict[str, Any]:
        return {
            "ip": CONF.my_block_storage_ip,
            "initiator": None,
            "host": self._host,
            "multipath": False,
            "platform": "x86_64",
            "os_type": "linux",
        }

    def get_host_uptime(self) -> str:
        with open("/proc/uptime") as f:
            seconds = float(f.read().split()[0])
        return f"up {int(seconds // 86400)} days, {int(seconds % 86400 // 3600)}:{int(seconds % 3600 // 60):02d}"

    def host_power_action(self, action: str) -> str:
        """An admin's reboot or shutdown of this host, through its systemd-logind."""
        if action not in hostpower.METHODS:
            raise NotImplementedError(
                f"a running host cannot {action} itself: power it on from its BMC, or have it wake on LAN"
            )
        try:
            hostpower.power_action(CONF.vmspawnd.login1_bus_address, action, CONF.vmspawnd.call_timeout)
        except hostpower.HostPowerError as e:
            raise exception.NovaException(f"cannot {action} host {self._host}: {e}") from e
        return action

    def get_host_cpu_stats(self) -> dict[str, int]:
        """Nanoseconds in each mode since boot, as libvirt's getCPUStats gives them."""
        with open("/proc/stat") as f:
            fields_ = f.readline().split()[1:]
        tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait = (int(v) * tick for v in fields_[:5])
        return {
            "kernel": system,
            "idle": idle,
            "user": user + nice,
            "iowait": iowait,
            "frequency": self._cpu_mhz(),
        }

    @staticmethod
    def _cpu_mhz() -> int:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]))
        return 0

    def _host_resources(self) -> tuple[int, int, int]:
        """(vCPUs, memory MiB, disk GiB under instances_path) of this host."""
        with open("/proc/meminfo") as f:
            total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        os.makedirs(CONF.instances_path, exist_ok=True)
        disk = shutil.disk_usage(CONF.instances_path)
        return os.cpu_count() or 1, total_kb // 1024, disk.total // units.Gi

    def get_available_resource(self, nodename: str) -> dict[str, Any]:
        vcpus, memory_mb, disk_gb = self._host_resources()
        disk = shutil.disk_usage(CONF.instances_path)
        node_uuid = next((u for u, name in self.get_nodenames_by_uuid().items() if name == nodename), None)
        return {
            # The compute node's uuid is the one this host's identity gives it.
            "uuid": node_uuid,
            "vcpus": vcpus,
            "memory_mb": memory_mb,
            "local_gb": disk_gb,
            "vcpus_used": 0,
            "memory_mb_used": 0,
            "local_gb_used": (disk.total - disk.free) // units.Gi,
            "hypervisor_type": "vmspawnd",
            "hypervisor_version": self._daemon_version(),
            "hypervisor_hostname": nodename,
            "cpu_info": jsonutils.dumps({"arch": fields.Architecture.X86_64, "vendor": "", "features": []}),
            "disk_available_least": disk.free // units.Gi,
            "numa_topology": None,
            "supported_instances": [(fields.Architecture.X86_64, HYPERVISOR_TYPE, fields.VMMode.HVM)],
        }

    def _daemon_version(self) -> int:
        try:
            version = self.client.manager_property("Version")
        except vclient.VmspawndError:
            return 0
        return int(versionutils.convert_version_to_int(version))

    def update_provider_tree(self, provider_tree: Any, nodename: str, allocations: Any = None) -> None:
        vcpus, memory_mb, disk_gb = self._host_resources()
        inventory = mapping.inventory(
            vcpus, memory_mb, disk_gb, CONF.vmspawnd.hotplug_ports, CONF.vmspawnd.max_hotplug_spares
        )
        old = provider_tree.data(nodename).inventory
        ratios = self._get_allocation_ratios(old)
        reserved = {
            orc.VCPU: CONF.reserved_host_cpus,
            orc.MEMORY_MB: CONF.reserved_host_memory_mb,
            orc.DISK_GB: self._get_reserved_host_disk_gb_from_config(),
        }
        for rc in (orc.VCPU, orc.MEMORY_MB, orc.DISK_GB):
            if rc in inventory:
                inventory[rc]["allocation_ratio"] = ratios[rc]
                inventory[rc]["reserved"] = reserved[rc]
        provider_tree.update_inventory(nodename, inventory)

    # -- what runs --------------------------------------------------------

    def _owned(self) -> list[tuple[mapping.Owned, str]]:
        owned = []
        for name, state in self.client.list_machines():
            if (who := mapping.parse_machine_name(name)) is not None:
                owned.append((who, state))
        return owned

    def list_instances(self) -> list[str]:
        return [who.instance_name for who, _ in self._owned()]

    def list_instance_uuids(self) -> list[str]:
        return [who.instance_uuid for who, _ in self._owned()]

    def instance_exists(self, instance: Any) -> bool:
        return instance.uuid in self.list_instance_uuids()

    @staticmethod
    def _name(instance: Any) -> str:
        try:
            return mapping.machine_name(instance.name, instance.uuid)
        except mapping.NameRefused as e:
            raise exception.InvalidInstanceName(instance_name=instance.name) from e

    def _properties(self, instance: Any) -> dict[str, Any]:
        try:
            return self.client.properties(self._name(instance))
        except vclient.VmspawndError as e:
            if e.name == "NoSuchMachine":
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            raise

    def _state(self, instance: Any) -> str | None:
        """The machine's State, or None when there is no machine."""
        try:
            return str(self._properties(instance)["State"])
        except exception.InstanceNotFound:
            return None

    def get_info(self, instance: Any, use_cache: bool = True) -> hardware.InstanceInfo:
        state = self._state(instance)
        if state is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        if state == "stopped":
            # In rescue the instance runs as its rescue machine (as libvirt's
            # domain is the rescue one then).
            state = self._state_of(mapping.rescue_name(instance.uuid)) or state
        return hardware.InstanceInfo(state=getattr(power_state, mapping.power_state_name(state)))

    def _properties_of(self, name: str) -> dict[str, Any] | None:
        """A machine's properties, or None when there is none of that name."""
        try:
            return self.client.properties(name)
        except vclient.VmspawndError as e:
            if e.name == "NoSuchMachine":
                return None
            raise

    def _state_of(self, name: str) -> str | None:
        """A machine's State, or None when there is none of that name."""
        props = self._properties_of(name)
        return None if props is None else str(props["State"])

    # -- spawn and destroy ------------------------------------------------

    def _instance_dir(self, instance: Any) -> str:
        return os.path.join(CONF.instances_path, instance.uuid)

    @staticmethod
    def _configured_kernel() -> dict[str, Any]:
        """The options of [vmspawnd]'s kernel, initrd and cmdline ({} without a kernel)."""
        vconf_ = CONF.vmspawnd
        if not vconf_.kernel:
            return {}
        source = {"kernel": vconf_.kernel, "cmdline": vconf_.cmdline}
        return source | ({"initrd": vconf_.initrd} if vconf_.initrd else {})

    @staticmethod
    def _glance_format(image_meta: Any) -> str:
        disk_format = image_meta.disk_format if "disk_format" in image_meta else None
        if disk_format not in ("raw", "qcow2"):
            raise exception.ImageUnacceptable(
                image_id=image_meta.id if "id" in image_meta else "",
                reason=f"vmspawnd boots raw or qcow2 images, not {disk_format!r}",
            )
        return str(disk_format)

    def _fetch(self, context: Any, instance: Any, image_id: str, path: str) -> None:
        """The Glance image at `path`, unless it is there: a disk the instance
        wrote (power on of a lost machine, a resize) is never fetched over."""
        if os.path.exists(path):
            return
        os.makedirs(self._instance_dir(instance), exist_ok=True)
        # Fetched beside it and renamed: a fetch cut short leaves no disk to boot.
        partial = path + ".part"
        images.fetch(context, image_id, partial, trusted_certs=instance.trusted_certs)
        os.rename(partial, path)

    def _boot_source(self, context: Any, instance: Any, image_meta: Any) -> dict[str, Any]:
        """The configured kernel or image if there is one, else the Glance
        image fetched into the instance's directory (raw or qcow2 only)."""
        vconf_ = CONF.vmspawnd
        if vconf_.kernel or vconf_.image:
            source = self._configured_kernel()
            if vconf_.image:
                source |= {"image": vconf_.image, "image_format": vconf_.image_format}
            return source
        disk_format = self._glance_format(image_meta)
        disk = os.path.join(self._instance_dir(instance), "disk")
        self._fetch(context, instance, image_meta.id, disk)
        return {"image": disk, "image_format": disk_format}

    def _local_disk(self, instance: Any) -> tuple[str, str] | None:
        """(path, format) of the instance's own disk by _boot_source's rules;
        None for an instance booted from the configured kernel alone."""
        vconf_ = CONF.vmspawnd
        if vconf_.image:
            return vconf_.image, vconf_.image_format
        if vconf_.kernel:
            return None
        return os.path.join(self._instance_dir(instance), "disk"), self._glance_format(instance.image_meta)

    @staticmethod
    def _sized(instance: Any, spares: int) -> dict[str, Any]:
        """A machine's options from the instance's flavor."""
        return {
            "memory": instance.flavor.memory_mb * units.Mi,
            "cpus": instance.flavor.vcpus,
            "hotplug_spares": spares,
            "network": "user",
            "accel": CONF.vmspawnd.accel,
        }

    def _options(self, context: Any, instance: Any, image_meta: Any, spares: int) -> dict[str, Any]:
        """An instance's machine (what a live migration's destination makes again too)."""
        return (
            self._boot_source(context, instance, image_meta)
            | self._sized(instance, spares)
            | {
                "keep": True,
                # As libvirt: the image asks for the agent's channel.
                "guest_agent": self._wants_agent(image_meta),
                "graphics": self._graphics(),
            }
        )

    def _create(self, context: Any, instance: Any, image_meta: Any, allocations: Any, block_device_info: Any) -> None:
        volumes = driver.block_device_info_get_mapping(block_device_info)
        spares = mapping.hotplug_spares(
            mapping.requested_ports(allocations),
            CONF.vmspawnd.hotplug_spares,
            len(volumes),
            CONF.vmspawnd.max_hotplug_spares,
        )
        options = self._options(context, instance, image_meta, spares)
        name = self._name(instance)
        try:
            self.client.create(name, options)
        except vclient.VmspawndError as e:
            raise exception.InstanceDeployFailure(reason=str(e), instance_id=instance.uuid) from e
        try:
            self._plug_missing(name, block_device_info)
        except Exception:
            # A failed spawn leaves no machine behind.
            self.client.terminate(name)
            raise

    def spawn(
        self,
        context: Any,
        instance: Any,
        image_meta: Any,
        injected_files: Any,
        admin_password: Any,
        allocations: Any,
        network_info: Any = None,
        block_device_info: Any = None,
        power_on: bool = True,
        accel_info: Any = None,
    ) -> None:
        self._make(context, instance, image_meta, allocations, block_device_info, power_on)

    def _make(
        self, context: Any, instance: Any, image_meta: Any, allocations: Any, block_device_info: Any, power_on: bool
    ) -> None:
        self._create(context, instance, image_meta, allocations, block_device_info)
        if not power_on:
            self.power_off(instance)

    def destroy(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        block_device_info: Any = None,
        destroy_disks: bool = True,
        destroy_secrets: bool = True,
    ) -> None:
        # A rescued instance goes with its rescue machine.
        self._terminate_if_there(mapping.rescue_name(instance.uuid))
        self._terminate_if_there(self._name(instance))
        self._consoles.close(instance.uuid)
        self.cleanup(context, instance, network_info, block_device_info, destroy_disks)

    @staticmethod
    def _graphics() -> str:
        """The display Nova's configuration asks for: VNC, else SPICE (one of them when both are on)."""
        if CONF.vnc.enabled:
            return "vnc"
        return "spice" if CONF.spice.enabled else "none"

    def _terminate_if_there(self, name: str) -> None:
        try:
            self.client.terminate(name)
        except vclient.VmspawndError as e:
            if e.name != "NoSuchMachine":
                raise

    def cleanup(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        block_device_info: Any = None,
        destroy_disks: bool = True,
        migrate_data: Any = None,
        destroy_vifs: bool = True,
        destroy_secrets: bool = True,
    ) -> None:
        if destroy_disks:
            shutil.rmtree(self._instance_dir(instance), ignore_errors=True)

    def delete_instance_files(self, instance: Any) -> bool:
        shutil.rmtree(self._instance_dir(instance), ignore_errors=True)
        return not os.path.exists(self._instance_dir(instance))

    # -- power ------------------------------------------------------------

    def power_off(self, instance: Any, timeout: int = 0, retry_interval: int = 0) -> None:
        try:
            # Nova's 0 is "no clean shutdown"; the daemon's 0 is its default 30 s
            # of ACPI: the shortest wait it takes stops the guest at once instead.
            self.client.power_off(self._name(instance), float(timeout) or FORCED_OFF)
        except vclient.VmspawndError as e:
            if e.name == "NoSuchMachine":
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            # Already off: what Nova asked for holds.
            if e.name != "NotRunning":
                raise

    def power_on(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        block_device_info: Any = None,
        accel_info: Any = None,
        share_info: Any = None,
    ) -> None:
        state = self._state(instance)
        name = self._name(instance)
        # A suspended one resumes where it was (Start), as a stopped one boots.
        if state in ("stopped", "suspended", "failed"):
            drives = self._drives(name)
            present = [d for d, _ in drives]
            if mapping.volumes_to_change(present, self._wanted_volumes(block_device_info, drives))[1]:
                # A volume detached while it was off: the kept machine still
                # holds it, and a guest still booting misses an unplug, so
                # the machine is made again from Nova's records instead.
                self.client.terminate(name)
                state = None
            else:
                self.client.start(name)
        if state is None:
            # Gone from the daemon (a host that lost its machines, or the case
            # above): made again from what Nova knows, its volumes plugged.
            self._create(context, instance, instance.image_meta, None, block_device_info)
            return
        if state == "paused":
            self.client.resume(name)
        # Volumes attached while it was off are plugged now.
        self._plug_missing(name, block_device_info)

    def reboot(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        reboot_type: str,
        block_device_info: Any = None,
        bad_volumes_callback: Any = None,
        accel_info: Any = None,
        share_info: Any = None,
    ) -> None:
        """A reset, soft or hard (vmspawnd's Reboot); a stopped instance is started."""
        if self._state(instance) == "running":
            self.client.reboot(self._name(instance))
        else:
            self.power_on(context, instance, network_info, block_device_info)

    def resume_state_on_host_boot(
        self, context: Any, instance: Any, network_info: Any, share_info: Any, block_device_info: Any = None
    ) -> None:
        self.power_on(context, instance, network_info, block_device_info)

    def poll_rebooting_instances(self, timeout: int, instances: Any) -> None:
        """Reboot returns once the reset is done: nothing is left to poll."""

    @staticmethod
    def _wants_agent(image_meta: Any) -> bool:
        return "properties" in image_meta and bool(image_meta.properties.get("hw_qemu_guest_agent", False))

    def set_admin_password(self, instance: Any, new_pass: str) -> None:
        """As libvirt: only for an image with hw_qemu_guest_agent, for its
        os_admin_user or root; an agent that does not answer is not supported."""
        image_meta = instance.image_meta
        if not self._wants_agent(image_meta):
            raise exception.QemuGuestAgentNotEnabled()
        user = image_meta.properties.get("os_admin_user") or (
            "Administrator" if instance.os_type == "windows" else "root"
        )
        try:
            self.client.set_user_password(self._name(instance), user, new_pass)
        except vclient.VmspawndError as e:
            if e.name == "NoSuchMachine":
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            if e.name == "AgentUnavailable":
                raise exception.SetAdminPasswdNotSupported() from e
            raise exception.InternalError(f"vmspawnd could not set the password of {user!r}: {e}") from e

    def pause(self, instance: Any) -> None:
        self.client.pause(self._name(instance))

    def unpause(self, instance: Any) -> None:
        if self._state(instance) == "paused":
            self.client.resume(self._name(instance))

    # -- suspend to disk --------------------------------------------------

    def suspend(self, context: Any, instance: Any) -> None:
        """The guest's memory and device state saved to disk and its QEMU
        stopped (vmspawnd's Suspend, as libvirt's managed save)."""
        try:
            self.client.suspend(self._name(instance), mapping.save_timeout(instance.flavor.memory_mb) + vclient.MARGIN)
        except vclient.VmspawndError as e:
            if e.name == "NoSuchMachine":
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            if e.name == "NotRunning":
                raise exception.InstanceNotRunning(instance_id=instance.uuid) from e
            raise exception.InstanceSuspendFailure(reason=str(e)) from e

    def resume(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        block_device_info: Any = None,
        share_info: Any = None,
    ) -> None:
        """A suspended instance goes on where it was (Start resumes it); one
        that runs already is left as it is: what Nova asked for holds."""
        state = self._state(instance)
        name = self._name(instance)
        if state is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        if state != "suspended":
            LOG.info("resume of %s, which is %s and not suspended: nothing to do", instance.uuid, state)
            return
        try:
            self.client.start(name, mapping.save_timeout(instance.flavor.memory_mb) + vclient.MARGIN)
        except vclient.VmspawndError as e:
            # The daemon keeps it suspended, its saved state too: resume may be retried.
            raise exception.InstanceResumeFailure(reason=str(e)) from e
        # Volumes attached while it was suspended are plugged now.
        self._plug_missing(name, block_device_info)

    def soft_delete(self, instance: Any) -> None:
        self.power_off(instance)

    def restore(self, instance: Any) -> None:
        if self._state(instance) in ("stopped", "failed"):
            self.client.start(self._name(instance))

    @staticmethod
    @contextlib.contextmanager
    def _running_instance(instance: Any) -> Iterator[None]:
        """The daemon's NotRunning and NoSuchMachine as Nova's exceptions for `instance`."""
        try:
            yield
        except vclient.VmspawndError as e:
            if e.name == "NotRunning":
                raise exception.InstanceNotRunning(instance_id=instance.uuid) from e
            if e.name == "NoSuchMachine":
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            raise

    def trigger_crash_dump(self, instance: Any) -> None:
        """An NMI to every vCPU (InjectNMI): a guest with kdump set up writes a crash dump."""
        with self._running_instance(instance):
            self.client.inject_nmi(self._name(instance))

    @staticmethod
    def _snapshot_metadata(instance: Any, disk_format: str, name: str) -> dict[str, Any]:
        """The snapshot image's metadata, as libvirt's _create_snapshot_metadata makes it."""
        properties = {
            "kernel_id": instance.kernel_id,
            "image_location": "snapshot",
            "image_state": "available",
            "owner_id": instance.project_id,
            "ramdisk_id": instance.ramdisk_id,
        }
        if instance.os_type:
            properties["os_type"] = instance.os_type
        image_meta = instance.image_meta
        container = image_meta.container_format if image_meta.obj_attr_is_set("container_format") else "bare"
        return {
            "status": "active", "name": name, "properties": properties, "disk_format": disk_format,
            "container_format": container,
        }  # fmt: skip

    def snapshot(self, context: Any, instance: Any, image_id: str, update_task_state: Any) -> None:
        """The instance's own disk as it is now (SnapshotDrive: the guest runs
        on) into a file of the instance's directory, then uploaded to the
        image service as libvirt does; the file goes whatever happens."""
        if self._state(instance) not in ("running", "paused"):
            raise exception.InstanceNotRunning(instance_id=instance.uuid)
        disk = self._local_disk(instance)
        if disk is None:
            raise exception.ImageUnacceptable(
                image_id=image_id, reason="the instance boots the configured kernel alone: it has no disk to snapshot"
            )
        disk_format = disk[1]
        metadata = self._snapshot_metadata(instance, disk_format, self._image_api.get(context, image_id)["name"])
        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        os.makedirs(self._instance_dir(instance), exist_ok=True)
        fd, copy = tempfile.mkstemp(prefix="snapshot-", dir=self._instance_dir(instance))
        try:
            try:
                with self._running_instance(instance):
                    self.client.snapshot_drive(
                        self._name(instance), ROOT_DRIVE, fd, disk_format, CONF.vmspawnd.copy_timeout
                    )
            finally:
                os.close(fd)
            update_task_state(task_state=task_states.IMAGE_UPLOADING, expected_state=task_states.IMAGE_PENDING_UPLOAD)
            with open(copy, "rb") as image_file, compute_utils.disk_ops_semaphore:
                self._image_api.update(context, image_id, metadata, image_file)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy)

    # -- rescue -----------------------------------------------------------

    def _rescue_source(self, context: Any, instance: Any, image_meta: Any) -> dict[str, Any]:
        """How the rescue machine boots, by spawn's rules: the configured
        kernel (and rescue_image under a copy-on-write layer), else the Glance
        rescue image (the instance's own without one, as libvirt picks),
        fetched afresh into the instance's directory."""
        vconf_ = CONF.vmspawnd
        rescue_disk = os.path.join(self._instance_dir(instance), "disk" + RESCUE_FILES)
        if vconf_.kernel or vconf_.image:
            source = self._configured_kernel()
            if vconf_.rescue_image:
                os.makedirs(self._instance_dir(instance), exist_ok=True)
                # The rescue never writes to the configured image itself.
                backing = os.path.abspath(vconf_.rescue_image)
                fmt = vconf_.rescue_image_format
                processutils.execute("qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", backing, rescue_disk)
                source |= {"image": rescue_disk, "image_format": "qcow2"}
            elif not source:
                raise exception.InstanceNotRescuable(
                    instance_id=instance.uuid,
                    reason="it boots [vmspawnd] image, its own disk: set [vmspawnd] rescue_image to rescue it",
                )
            return source
        meta = image_meta if "id" in image_meta else instance.image_meta
        disk_format = self._glance_format(meta)
        self._fetch(context, instance, meta.id, rescue_disk)
        return {"image": rescue_disk, "image_format": disk_format}

    def _remove_rescue_files(self, instance: Any) -> None:
        for path in glob.glob(os.path.join(glob.escape(self._instance_dir(instance)), "*" + RESCUE_FILES)):
            os.unlink(path)

    def rescue(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        image_meta: Any,
        rescue_password: Any,
        block_device_info: Any,
        share_info: Any = None,
    ) -> None:
        """libvirt's (legacy) rescue: the instance is stopped (kept, with its
        volumes), and a machine of its own, "<uuid>.rescue", boots the rescue
        source with the instance's disk as its next drive (serial
        RESCUED_DISK_SERIAL), volumes not attached. No password is set (no agent)."""
        rescue = mapping.rescue_name(instance.uuid)
        if self._state_of(rescue) is not None:
            raise exception.InstanceNotRescuable(instance_id=instance.uuid, reason="it is in rescue already")
        # At once, as libvirt destroys the domain (Nova has shut it down cleanly before, if asked).
        self.power_off(instance)
        try:
            options = self._rescue_source(context, instance, image_meta) | self._sized(instance, 0)
            # Its consoles are the instance's while it runs.
            options["graphics"] = self._graphics()
            disk = self._local_disk(instance)
            if disk is not None:
                options["drives"] = [{"path": disk[0], "format": disk[1], "serial": RESCUED_DISK_SERIAL}]
            self.client.create(rescue, options)
        except vclient.VmspawndError as e:
            self._remove_rescue_files(instance)
            raise exception.InstanceNotRescuable(instance_id=instance.uuid, reason=str(e)) from e
        except Exception:
            self._remove_rescue_files(instance)
            raise

    def unrescue(self, context: Any, instance: Any) -> None:
        """The rescue machine and its files go; the instance boots from its own
        disk, with its volumes. One not in rescue is left as it is (running)."""
        self._terminate_if_there(mapping.rescue_name(instance.uuid))
        self._remove_rescue_files(instance)
        if self._state(instance) is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        if self._state(instance) in ("stopped", "failed"):
            self.client.start(self._name(instance))

    # -- cold migration and resize ------------------------------------------

    def _announce_instances_path(self) -> None:
        """Tell the computes sharing instances_path that this one (by its my_ip,
        the address Nova names a destination by) writes there too."""
        seeing = os.path.join(CONF.instances_path, COMPUTES_SEEING)
        try:
            os.makedirs(seeing, exist_ok=True)
            with open(os.path.join(seeing, self.get_host_ip_addr()), "w") as f:
                f.write(self._host + "\n")
        except OSError as e:
            LOG.warning("cannot note this compute in %s (resizes to other hosts are refused): %s", seeing, e)

    def _sees_instances_path(self, dest: str) -> bool:
        """Does the compute at `dest` see this host's instance directories (libvirt's shared storage)?"""
        marker = os.path.join(CONF.instances_path, COMPUTES_SEEING, os.path.basename(dest))
        return dest == self.get_host_ip_addr() or os.path.exists(marker)

    def _resize_stash(self, instance: Any) -> str:
        return self._instance_dir(instance) + RESIZE_STASH

    def _disk_info(self, instance: Any) -> list[dict[str, Any]]:
        """The instance's local disk (not its volumes) with libvirt's keys."""
        disk = self._local_disk(instance)
        if disk is None:
            return []
        path, fmt = disk
        if fmt == "qcow2":
            info = images.qemu_img_info(path, format="qcow2")
            virtual, used, backing = int(info.virtual_size), int(info.disk_size), info.backing_file or ""
        else:
            virtual, used, backing = os.path.getsize(path), os.stat(path).st_blocks * 512, ""
        return [
            {
                "type": fmt,
                "path": path,
                "virt_disk_size": virtual,
                "backing_file": backing,
                "disk_size": used,
                "over_committed_disk_size": max(0, virtual - used),
            }
        ]

    def _stash_disks(self, instance: Any, disks: list[dict[str, Any]]) -> None:
        """As libvirt: the instance's directory becomes <uuid>_resize (what a
        revert goes back to) and its disks are copied into a fresh one."""
        base, stash = self._instance_dir(instance), self._resize_stash(instance)
        if not os.path.isdir(base):
            return
        # A failed earlier resize's stash is not what the instance has now.
        shutil.rmtree(stash, ignore_errors=True)
        os.rename(base, stash)
        try:
            os.makedirs(base)
            for path in [d["path"] for d in disks if not mapping.outside([d["path"]], base)]:
                processutils.execute("cp", "--sparse=always", os.path.join(stash, os.path.relpath(path, base)), path)
        except Exception:
            shutil.rmtree(base, ignore_errors=True)
            os.rename(stash, base)
            raise

    def migrate_disk_and_power_off(
        self,
        context: Any,
        instance: Any,
        dest: str,
        flavor: Any,
        network_info: Any,
        block_device_info: Any = None,
        timeout: int = 0,
        retry_interval: int = 0,
    ) -> str:
        """Resize on this host, or a move to a host that sees this host's
        instances_path (shared storage, as libvirt's): the instance is
        stopped, its disks are copied beside the old ones (kept for a revert),
        and finish_migration makes its machine anew with the new flavor."""
        disks = self._disk_info(instance)
        paths = [d["path"] for d in disks]
        if dest != self.get_host_ip_addr():
            if staying := mapping.outside(paths, self._instance_dir(instance)):
                reason = f"its disk {staying[0]} is not in instances_path: it cannot move to {dest}"
                raise exception.InstanceFaultRollback(exception.MigrationPreCheckError(reason=reason))
            if paths and not self._sees_instances_path(dest):
                reason = (
                    f"its disks are local files in {CONF.instances_path}, which {dest} does not see: vmspawnd "
                    "moves an instance only over shared storage (no compute with that my_ip noted itself in "
                    f"{os.path.join(CONF.instances_path, COMPUTES_SEEING)})"
                )
                raise exception.InstanceFaultRollback(exception.MigrationPreCheckError(reason=reason))
        self.power_off(instance, timeout, retry_interval)
        self._stash_disks(instance, disks)
        return str(jsonutils.dumps(disks))

    def finish_migration(
        self,
        context: Any,
        migration: Any,
        instance: Any,
        disk_info: str,
        network_info: Any,
        image_meta: Any,
        resize_instance: bool,
        allocations: Any,
        block_device_info: Any = None,
        power_on: bool = True,
        share_info: Any = None,
    ) -> None:
        """The machine made anew (instance.flavor is the new one now) over the migrated disks and volumes."""
        missing = [d["path"] for d in jsonutils.loads(disk_info) if not os.path.exists(d["path"])]
        if missing:
            raise exception.ResizeError(reason=f"{missing[0]} is not there on {self._host}: is instances_path shared?")
        # On the same host the stopped machine of the old flavor is still there.
        self._terminate_if_there(self._name(instance))
        self._make(context, instance, image_meta, allocations, block_device_info, power_on)

    def confirm_migration(self, context: Any, migration: Any, instance: Any, network_info: Any) -> None:
        shutil.rmtree(self._resize_stash(instance), ignore_errors=True)
        if instance.host != self._host:
            # Moved away: this host's stopped machine of it goes (its disks are the new host's now).
            self._terminate_if_there(self._name(instance))

    def finish_revert_migration(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        migration: Any,
        block_device_info: Any = None,
        power_on: bool = True,
        share_info: Any = None,
    ) -> None:
        """Back to the disks as they were and the old flavor (Nova has put it back)."""
        base, stash = self._instance_dir(instance), self._resize_stash(instance)
        if os.path.exists(stash):
            shutil.rmtree(base, ignore_errors=True)
            os.rename(stash, base)
        self._terminate_if_there(self._name(instance))
        self._make(context, instance, instance.image_meta, None, block_device_info, power_on)

    # -- live migration ---------------------------------------------------
    # Over shared storage only (the destination opens the same disks), the
    # guest's state over one TCP connection between the two nova-computes
    # (transport.py): the destination listens from pre_live_migration on,
    # the source connects in live_migration, each daemon gets its end.

    def _migration_timeout(self, instance: Any) -> float:
        return mapping.migration_timeout(instance.flavor.memory_mb, CONF.vmspawnd.live_migration_completion_timeout)

    def check_can_live_migrate_destination(
        self,
        context: Any,
        instance: Any,
        src_compute_info: Any,
        dst_compute_info: Any,
        block_migration: bool | None = False,
        disk_over_commit: bool | None = False,
    ) -> Any:
        """On the destination. No block migration (None, Nova's "auto", is
        shared storage here); a disk outside instances_path must be here too;
        one inside is checked by the source (check_can_live_migrate_source)."""
        if block_migration:
            raise exception.MigrationPreCheckError(
                reason="vmspawnd moves a running instance over shared storage only: no block migration"
            )
        disk = self._local_disk(instance)
        if disk is not None and mapping.outside([disk[0]], CONF.instances_path) and not os.path.exists(disk[0]):
            raise exception.MigrationPreCheckError(reason=f"its disk {disk[0]} is not on {self._host}")
        os.makedirs(CONF.instances_path, exist_ok=True)
        fd, marker = tempfile.mkstemp(prefix=SHARED_CHECK, dir=CONF.instances_path)
        os.close(fd)
        # Nova's conductor knows libvirt's migrate data (it would not know one of ours).
        return objects.LibvirtLiveMigrateData(
            filename=os.path.basename(marker),
            block_migration=False,
            disk_over_commit=bool(disk_over_commit),
            # The disks are the same files on both hosts: nothing of them is copied or removed.
            is_shared_block_storage=True,
        )

    def cleanup_live_migration_destination_check(self, context: Any, dest_check_data: Any) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(CONF.instances_path, dest_check_data.filename))

    def check_can_live_migrate_source(
        self, context: Any, instance: Any, dest_check_data: Any, block_device_info: Any = None
    ) -> Any:
        """On the source: the machine runs (or is paused); a disk in
        instances_path needs the destination to share it; the destination is
        told the machine's spare ports and the volume on each, so that it
        makes the same machine."""
        props = self._properties(instance)
        if props["State"] not in ("running", "paused"):
            raise exception.MigrationPreCheckError(
                reason=f"it is {props['State']} on {self._host}: only a running or paused instance moves live"
            )
        shared = os.path.exists(os.path.join(CONF.instances_path, dest_check_data.filename))
        disk = self._local_disk(instance)
        if disk is not None and not shared and not mapping.outside([disk[0]], CONF.instances_path):
            raise exception.MigrationPreCheckError(
                reason=f"its disk {disk[0]} is in {CONF.instances_path}, which the destination does not share"
            )
        dest_check_data.is_shared_instance_path = shared
        # libvirt's bdms (per volume: where the destination's guest has it), one
        # per spare port here: `dev` the port, `serial` the volume drive on it or "".
        dest_check_data.bdms = [
            objects.LibvirtLiveMigrateBDMInfo(serial=drive, dev=port)
            for port, drive in mapping.spare_ports(props["Ports"], props["Drives"])
        ]
        return dest_check_data

    def pre_live_migration(
        self,
        context: Any,
        instance: Any,
        block_device_info: Any,
        network_info: Any,
        disk_info: Any,
        migrate_data: Any,
    ) -> Any:
        """On the destination: the machine made as the source has it (its
        volumes on the same ports), waiting for its state; a listener for the
        stream, whose address goes to the source in target_connect_addr."""
        name = self._name(instance)
        disk = self._local_disk(instance)
        if disk is not None and not os.path.exists(disk[0]):
            raise exception.MigrationPreCheckError(reason=f"its disk {disk[0]} is not on {self._host}")
        if "bdms" not in migrate_data:
            raise exception.MigrationPreCheckError(reason="the source did not say what its machine has")
        ports = {bdm.serial: bdm.dev for bdm in migrate_data.bdms if bdm.serial}
        volumes = {}
        # By the drives attach made: one a swap moved onto another volume keeps the old
        # volume's id and serial, which the source does not pass on (such an instance is refused).
        for drive, bdm in self._wanted_volumes(block_device_info, []).items():
            path, fmt = self._volume_path(bdm["connection_info"])
            volumes[drive] = (path, fmt, mapping.serial(self._volume_of(bdm)))
        try:
            plugged = mapping.plugged(volumes, ports)
        except ValueError as e:
            raise exception.MigrationPreCheckError(reason=str(e)) from e
        spares = len(migrate_data.bdms)
        options = self._options(context, instance, instance.image_meta, spares) | {"incoming": True, "plugged": plugged}
        try:
            self.client.create(name, options)
        except vclient.VmspawndError as e:
            raise exception.MigrationError(reason=f"vmspawnd on {self._host} cannot make the machine: {e}") from e
        timeout = self._migration_timeout(instance)
        try:
            listener = transport.Listener(
                str(CONF.vmspawnd.live_migration_inbound_addr or CONF.my_ip),
                CONF.vmspawnd.live_migration_accept_timeout,
                lambda stream: self.client.incoming(name, stream, timeout),
            )
        except transport.TransportError as e:
            self._terminate_if_there(name)
            raise exception.MigrationError(reason=str(e)) from e
        self._incoming[instance.uuid] = listener
        migrate_data.target_connect_addr = mapping.stream_address(listener.host, listener.port)
        return migrate_data

    def live_migration(
        self,
        context: Any,
        instance: Any,
        dest: str,
        post_method: Any,
        recover_method: Any,
        block_migration: bool = False,
        migrate_data: Any = None,
    ) -> None:
        """On the source: the stream to the destination's listener, Migrate
        into it; post_method once the guest runs there, recover_method (the
        guest runs on here) when it failed or was aborted, as libvirt's."""
        name = self._name(instance)
        self.active_migrations[instance.uuid] = deque()
        try:
            address = migrate_data.target_connect_addr if migrate_data and "target_connect_addr" in migrate_data else ""
            host, port = mapping.parse_stream_address(address or "")
            stream = transport.connect(host, port, CONF.vmspawnd.call_timeout)
            bandwidth = CONF.vmspawnd.live_migration_bandwidth * units.Mi
            self.client.migrate(name, stream, bandwidth, self._migration_timeout(instance))
        except (ValueError, transport.TransportError, vclient.VmspawndError) as e:
            if "abort" in self.active_migrations[instance.uuid]:
                LOG.warning("live migration of %s to %s aborted: %s", instance.uuid, dest, e)
                recover_method(context, instance, dest, migrate_data, migration_status="cancelled")
            else:
                LOG.error("live migration of %s to %s failed: %s", instance.uuid, dest, e)
                recover_method(context, instance, dest, migrate_data)
            return
        finally:
            del self.active_migrations[instance.uuid]
        post_method(context, instance, dest, block_migration, migrate_data)

    def live_migration_abort(self, instance: Any) -> None:
        """CancelMigration: the guest runs on here (live_migration calls recover_method)."""
        # Noted first: live_migration may hear of the cancel before this call returns.
        if (asked := self.active_migrations.get(instance.uuid)) is not None:
            asked.append("abort")
        try:
            self.client.cancel_migration(self._name(instance))
        except vclient.VmspawndError as e:
            self._not_migrating(instance, "abort", e)

    def live_migration_force_complete(self, instance: Any) -> None:
        """ForceCompleteMigration: the guest is paused so that the migration converges
        (post_live_migration_at_destination runs it on there)."""
        try:
            self.client.force_complete_migration(self._name(instance))
        except vclient.VmspawndError as e:
            self._not_migrating(instance, "force-complete", e)

    @staticmethod
    def _not_migrating(instance: Any, what: str, e: vclient.VmspawndError) -> None:
        """A migration that ended before the request came (Nova checked that it
        ran): nothing to do, as libvirt drops a request its migration outlived."""
        if e.name == "NoSuchMachine":
            raise exception.InstanceNotFound(instance_id=instance.uuid) from e
        if e.name != "NotMigrating":
            raise exception.MigrationError(reason=f"cannot {what} the migration of {instance.uuid}: {e}") from e
        LOG.info("no live migration of %s to %s: it has ended (%s)", instance.uuid, what, e.message)

    def post_live_migration_at_source(self, context: Any, instance: Any, network_info: Any) -> None:
        """The machine left with its migration; nothing is left of it here."""
        self._terminate_if_there(self._name(instance))

    def post_live_migration_at_destination(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        block_migration: bool = False,
        block_device_info: Any = None,
    ) -> None:
        """The incoming stream's end; a guest that a force-complete paused
        runs on here (one Nova had paused stays paused)."""
        listener = self._incoming.pop(instance.uuid, None)
        if listener is not None:
            try:
                listener.wait(CONF.vmspawnd.call_timeout)
            except (transport.TransportError, vclient.VmspawndError) as e:
                listener.close()
                raise exception.MigrationError(
                    reason=f"instance {instance.uuid} did not come in on {self._host}: {e}"
                ) from e
        if self._state(instance) == "paused" and instance.vm_state != vm_states.PAUSED:
            self.client.resume(self._name(instance))

    def rollback_live_migration_at_destination(
        self,
        context: Any,
        instance: Any,
        network_info: Any,
        block_device_info: Any,
        destroy_disks: bool = True,
        migrate_data: Any = None,
    ) -> None:
        """The waiting machine and listener go; never the disks (the source's too)."""
        listener = self._incoming.pop(instance.uuid, None)
        if listener is not None:
            listener.close()
        self._terminate_if_there(self._name(instance))
        if listener is not None:
            try:
                listener.wait(CONF.vmspawnd.call_timeout)
            except (transport.TransportError, vclient.VmspawndError) as e:
                LOG.info("incoming migration of %s called off: %s", instance.uuid, e)

    # -- consoles and diagnostics -----------------------------------------

    def get_console_output(self, context: Any, instance: Any) -> str:
        log = self._properties(instance).get("ConsoleLog", "")
        if not log:
            return ""
        try:
            with open(log, "rb") as f:
                f.seek(max(0, os.path.getsize(log) - MAX_CONSOLE_BYTES))
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _running_machine(self, instance: Any) -> tuple[str, dict[str, Any]]:
        """(name, properties) of the machine that runs the instance: its own,
        or in rescue its rescue machine (as libvirt's domain is the rescue one then)."""
        props = self._properties(instance)
        rescue = mapping.rescue_name(instance.uuid)
        if props["State"] == "stopped" and (rescued := self._properties_of(rescue)) is not None:
            return rescue, rescued
        return self._name(instance), props

    def _console(self, instance: Any, kind: str, graphics: str = "") -> tuple[str, int]:
        """(host, port) of a TCP port of ours in front of the instance's `kind`
        console: each connection there gets a stream of its own from vmspawnd
        (OpenGraphics for a display of type `graphics`, else OpenConsole)."""
        _, props = self._running_machine(instance)
        if graphics and props.get("Graphics") != graphics:
            raise exception.ConsoleTypeUnavailable(console_type=kind)
        if props["State"] not in ("running", "paused"):
            raise exception.InstanceNotReady(instance_id=instance.uuid)
        address = (
            CONF.vmspawnd.console_address
            or {
                "vnc": CONF.vnc.server_proxyclient_address,
                "spice": CONF.spice.server_proxyclient_address,
                "serial": CONF.serial_console.proxyclient_address,
            }[kind]
        )
        idle = CONF.vmspawnd.console_idle_timeout or CONF.consoleauth.token_ttl

        def open_stream() -> Any:
            # Looked up per connection: a rescue may have begun or ended since the port was handed out.
            name, _ = self._running_machine(instance)
            return self.client.open_graphics(name) if graphics else self.client.open_console(name)

        try:
            ports = consoleproxy.parse_range(CONF.vmspawnd.console_port_range)
            port = self._consoles.port(instance.uuid, kind, address, ports, idle, open_stream)
        except (ValueError, OSError, consoleproxy.NoFreePort) as e:
            raise exception.ConsoleTypeUnavailable(console_type=f"{kind} ({e})") from e
        return str(address), port

    def get_vnc_console(self, context: Any, instance: Any) -> ctype.ConsoleVNC:
        host, port = self._console(instance, "vnc", graphics="vnc")
        return ctype.ConsoleVNC(host=host, port=port)

    def get_spice_console(self, context: Any, instance: Any) -> ctype.ConsoleSpice:
        host, port = self._console(instance, "spice", graphics="spice")
        return ctype.ConsoleSpice(host=host, port=port, tlsPort=None)

    def get_serial_console(self, context: Any, instance: Any) -> ctype.ConsoleSerial:
        """The guest's serial console (vmspawnd's OpenConsole): every machine has one (the compute
        manager asks only with [serial_console] enabled). One writer at a time: a second connection
        is closed at once."""
        host, port = self._console(instance, "serial")
        return ctype.ConsoleSerial(host=host, port=port)

    def get_diagnostics(self, instance: Any) -> dict[str, Any]:
        props = self._properties(instance)
        return {
            "state": props["State"],
            "leader_pid": props.get("Leader", 0),
            "free_spare_ports": props.get("FreeSparePorts", 0),
            **{f"drive_{d['id']}": d["path"] for d in props.get("Drives", [])},
        }

    def get_instance_diagnostics(self, instance: Any) -> diagnostics_obj.Diagnostics:
        props = self._properties(instance)
        diags = diagnostics_obj.Diagnostics(
            state=mapping.power_state_name(props["State"]).lower(),
            hypervisor=HYPERVISOR_TYPE,
            hypervisor_os="linux",
            config_drive=False,
            num_cpus=instance.flavor.vcpus,
            memory_details=diagnostics_obj.MemoryDiagnostics(maximum=instance.flavor.memory_mb),
        )
        for _drive in props.get("Drives", []):
            diags.add_disk()
        return diags

    def get_instance_disk_info(self, instance: Any, block_device_info: Any = None) -> str:
        """The instance's local disks (not its volumes), as JSON."""
        volumes = {
            bdm["connection_info"].get("data", {}).get("device_path")
            for bdm in driver.block_device_info_get_mapping(block_device_info)
        }
        drives = self._properties(instance).get("Drives", [])
        return str(
            jsonutils.dumps([{"path": d["path"], "type": d["disk_type"]} for d in drives if d["path"] not in volumes])
        )

    def block_stats(self, instance: Any, disk_id: str) -> tuple[int, int, int, int, int] | None:
        """(rd_req, rd_bytes, wr_req, wr_bytes, errors) of the volume `disk_id`
        names (a device name, as the compute manager passes it, or a volume
        id): its drive's DriveStats. None, as with libvirt, when the volume is
        not (or no longer) attached or the instance does not run."""
        bdms = objects.BlockDeviceMappingList.get_by_instance_uuid(nova_context.get_admin_context(), instance.uuid)
        connections = {self._bdm_volume(bdm): self._bdm_connection(bdm) for bdm in bdms if bdm.is_volume}
        volume_id = mapping.volume_for_disk(
            disk_id, [(bdm.device_name, self._bdm_volume(bdm)) for bdm in bdms if bdm.is_volume]
        )
        if volume_id is None:
            LOG.info("no volume %s on instance %s: no block stats", disk_id, instance.uuid)
            return None
        name = self._name(instance)
        try:
            drive = self._volume_drive(self._drives(name), {"serial": volume_id} | connections[volume_id])
            counters = self.client.drive_stats(name, drive)
        except vclient.VmspawndError as e:
            if e.name not in ("NoSuchDrive", "NoSuchMachine", "NotRunning"):
                raise
            LOG.info("no block stats of %s on instance %s: %s", disk_id, instance.uuid, e)
            return None
        return mapping.block_stats(counters)

    @staticmethod
    def _bdm_connection(bdm: Any) -> dict[str, Any]:
        return dict(jsonutils.loads(bdm.connection_info)) if bdm.connection_info else {}

    def _bdm_volume(self, bdm: Any) -> str:
        """What attach_volume made the drive id of: the connection's serial, else the volume id."""
        return self._volume_id(self._bdm_connection(bdm)) or str(bdm.volume_id)

    # -- volumes ----------------------------------------------------------

    def _volume_path(self, connection_info: dict[str, Any]) -> tuple[str, str]:
        kind = connection_info.get("driver_volume_type")
        if kind not in self.volume_types:
            raise exception.VolumeDriverNotFound(driver_type=kind)
        return self.volume_types[kind](connection_info.get("data", {}))

    @staticmethod
    def _volume_id(connection_info: dict[str, Any]) -> str:
        data = connection_info.get("data", {})
        return str(connection_info.get("serial") or data.get("volume_id") or data.get("device_path", ""))

    def _volume_of(self, bdm: Any) -> str:
        return self._volume_id(bdm["connection_info"]) or str(getattr(bdm, "volume_id", "") or "")

    def _plug(self, name: str, connection_info: dict[str, Any], volume_id: str) -> None:
        path, fmt = self._volume_path(connection_info)
        options = {"id": mapping.drive_id(volume_id), "format": fmt, "serial": mapping.serial(volume_id)}
        try:
            self.client.add_drive(name, path, options)
        except vclient.VmspawndError as e:
            raise exception.VolumeAttachFailed(volume_id=volume_id, reason=str(e)) from e

    def _drives(self, name: str) -> list[tuple[str, str]]:
        """(id, path) of the machine's drives."""
        return [(d["id"], d["path"]) for d in self.client.properties(name).get("Drives", [])]

    def _local_path(self, connection_info: dict[str, Any]) -> str | None:
        """The volume's file on this host; None for a kind this driver does not attach."""
        if connection_info.get("driver_volume_type") not in self.volume_types:
            return None
        return self._volume_path(connection_info)[0]

    def _volume_drive(self, drives: list[tuple[str, str]], connection_info: dict[str, Any]) -> str:
        """The drive holding the volume: the one attach_volume made, or the one
        a swap_volume moved onto it (mapping.volume_drive); else the one attach_volume would make."""
        volume_id = self._volume_id(connection_info)
        found = mapping.volume_drive(drives, volume_id, self._local_path(connection_info))
        return found or mapping.drive_id(volume_id)

    def _wanted_volumes(self, block_device_info: Any, drives: list[tuple[str, str]]) -> dict[str, Any]:
        """Nova's volumes of the instance by the drive that holds (or is to hold) each, of `drives`."""
        return {
            self._volume_drive(drives, {"serial": self._volume_of(bdm)} | dict(bdm["connection_info"])): bdm
            for bdm in driver.block_device_info_get_mapping(block_device_info)
        }

    def _plug_missing(self, name: str, block_device_info: Any) -> None:
        drives = self._drives(name)
        to_plug, _ = mapping.volumes_to_change([d for d, _ in drives], self._wanted_volumes(block_device_info, drives))
        for bdm in to_plug:
            self._plug(name, bdm["connection_info"], self._volume_of(bdm))

    def attach_volume(
        self,
        context: Any,
        connection_info: dict[str, Any],
        instance: Any,
        mountpoint: str,
        disk_bus: Any = None,
        device_type: Any = None,
        encryption: Any = None,
    ) -> None:
        if encryption:
            raise exception.VolumeEncryptionNotSupported(
                volume_type="encrypted", volume_id=self._volume_id(connection_info)
            )
        volume_id = self._volume_id(connection_info)
        if self._state(instance) == "stopped":
            # Plugged when it is powered on (power_on gets the volume in block_device_info).
            self._volume_path(connection_info)
            LOG.info("volume %s is plugged into %s at its next power on", volume_id, instance.uuid)
            return
        self._plug(self._name(instance), connection_info, volume_id)

    def detach_volume(
        self,
        context: Any,
        connection_info: dict[str, Any],
        instance: Any,
        mountpoint: str,
        encryption: Any = None,
    ) -> None:
        volume_id = self._volume_id(connection_info)
        if self._state(instance) == "stopped":
            # Unplugged when it is powered on (power_on no longer gets the volume).
            LOG.info("volume %s leaves %s at its next power on", volume_id, instance.uuid)
            return
        name = self._name(instance)
        try:
            drive = self._volume_drive(self._drives(name), connection_info)
            self.client.remove_drive(name, drive, CONF.vmspawnd.unplug_timeout)
        except vclient.VmspawndError as e:
            if e.name == "NoSuchDrive":
                # Not there (any more): what Nova asked for holds.
                LOG.info("volume %s was not attached to %s", volume_id, instance.uuid)
                return
            if e.name == "NoSuchMachine":
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            raise exception.DeviceDetachFailed(device=mountpoint, reason=str(e)) from e

    def swap_volume(
        self,
        context: Any,
        old_connection_info: dict[str, Any],
        new_connection_info: dict[str, Any],
        instance: Any,
        mountpoint: str,
        resize_to: int,
    ) -> None:
        """The old volume's drive moves onto the new volume (SwapDrive, a block
        mirror): the guest keeps its disk, serial and all. The drive keeps its
        id, the old volume's: from then on it is found by the new volume's file."""
        name = self._name(instance)
        path, fmt = self._volume_path(new_connection_info)
        try:
            drive = self._volume_drive(self._drives(name), old_connection_info)
            self.client.swap_drive(name, drive, path, fmt, CONF.vmspawnd.copy_timeout)
        except vclient.VmspawndError as e:
            if e.name == "NoSuchMachine":
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            raise exception.VolumeRebaseFailed(reason=str(e)) from e
        if resize_to:
            LOG.warning(
                "vmspawnd cannot resize a drive: the guest sees volume %s at its old size, not %d GiB",
                self._volume_id(new_connection_info), resize_to, instance=instance,
            )  # fmt: skip

    def get_device_name_for_instance(self, instance: Any, bdms: Any, block_device_obj: Any) -> str:
        """The next free name: the guest names a hotplugged disk itself (by its
        serial it is found), so a requested name is not honoured, as with libvirt."""
        used = [bdm.device_name for bdm in bdms if bdm.device_name]
        return str(compute_utils.get_next_device_name(instance, used))

    # -- networking: user mode only, nothing to plug ----------------------

    def plug_vifs(self, instance: Any, network_info: Any) -> None:
        """QEMU's user-mode network needs nothing on the host."""

    def unplug_vifs(self, instance: Any, network_info: Any) -> None:
        """QEMU's user-mode network needs nothing on the host."""

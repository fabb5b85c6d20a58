"""A Nova compute driver that runs instances as vmspawnd machines.

Every call goes to the host's vmspawnd over D-Bus (client.py); the driver
itself keeps no state: what runs, with which drives, is the daemon's.
Instances are created with `keep`, so a powered-off instance stays defined
with its volumes, and power_on starts it again.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import nova.conf
import os_resource_classes as orc
from nova.compute import power_state
from nova.compute import utils as compute_utils
from nova.objects import diagnostics as diagnostics_obj
from nova.objects import fields
from oslo_log import log as logging
from oslo_serialization import jsonutils
from oslo_utils import units, versionutils

from nova import context as nova_context
from nova import exception, objects
from nova.virt import driver, hardware, images
from nova.virt.vmspawnd import client as vclient
from nova.virt.vmspawnd import conf as vconf
from nova.virt.vmspawnd import mapping

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF
vconf.register(CONF)

# What libvirt returns at most for the console log (nova.virt.libvirt.driver).
MAX_CONSOLE_BYTES = 100 * units.Ki
HYPERVISOR_TYPE = fields.HVType.QEMU
FORCED_OFF = 1e-6  # s
# The reason recorded on this host's nova-compute service when set_host_enabled disables it.
HOST_DISABLED_REASON = "disabled by set_host_enabled (os-hosts)"


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
        # Nova's compute manager reads this for live migrations in flight: none here.
        self.active_migrations: dict[str, Any] = {}
        # This host's name, as init_host gets it (several computes may share one process in tests).
        self._host = str(CONF.host)

    # -- the host ---------------------------------------------------------

    def init_host(self, host: str) -> None:
        self._host = host
        try:
            self.client.list_machines()
        except vclient.VmspawndError as e:
            raise exception.HypervisorUnavailable(host=f"{host} (vmspawnd: {e})") from e

    def cleanup_host(self, host: str) -> None:
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
        return hardware.InstanceInfo(state=getattr(power_state, mapping.power_state_name(state)))

    # -- spawn and destroy ------------------------------------------------

    def _instance_dir(self, instance: Any) -> str:
        return os.path.join(CONF.instances_path, instance.uuid)

    def _boot_source(self, context: Any, instance: Any, image_meta: Any) -> dict[str, Any]:
        """The configured kernel or image if there is one, else the Glance
        image fetched into the instance's directory (raw or qcow2 only)."""
        vconf_ = CONF.vmspawnd
        if vconf_.kernel or vconf_.image:
            source: dict[str, Any] = {}
            if vconf_.kernel:
                source |= {"kernel": vconf_.kernel, "cmdline": vconf_.cmdline}
                if vconf_.initrd:
                    source["initrd"] = vconf_.initrd
            if vconf_.image:
                source |= {"image": vconf_.image, "image_format": vconf_.image_format}
            return source
        disk_format = image_meta.disk_format if "disk_format" in image_meta else None
        if disk_format not in ("raw", "qcow2"):
            raise exception.ImageUnacceptable(
                image_id=image_meta.id if "id" in image_meta else "",
                reason=f"vmspawnd boots raw or qcow2 images, not {disk_format!r}",
            )
        os.makedirs(self._instance_dir(instance), exist_ok=True)
        disk = os.path.join(self._instance_dir(instance), "disk")
        images.fetch(context, image_meta.id, disk, trusted_certs=instance.trusted_certs)
        return {"image": disk, "image_format": disk_format}

    def _create(self, context: Any, instance: Any, image_meta: Any, allocations: Any, block_device_info: Any) -> None:
        volumes = driver.block_device_info_get_mapping(block_device_info)
        spares = mapping.hotplug_spares(
            mapping.requested_ports(allocations),
            CONF.vmspawnd.hotplug_spares,
            len(volumes),
            CONF.vmspawnd.max_hotplug_spares,
        )
        options = self._boot_source(context, instance, image_meta) | {
            "memory": instance.flavor.memory_mb * units.Mi,
            "cpus": instance.flavor.vcpus,
            "hotplug_spares": spares,
            "network": "user",
            "accel": CONF.vmspawnd.accel,
            "keep": True,
        }
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
        try:
            self.client.terminate(self._name(instance))
        except vclient.VmspawndError as e:
            if e.name != "NoSuchMachine":
                raise
        self.cleanup(context, instance, network_info, block_device_info, destroy_disks)

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
            present = [d["id"] for d in self.client.properties(name).get("Drives", [])]
            if mapping.volumes_to_change(present, self._wanted_volumes(block_device_info))[1]:
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

    def trigger_crash_dump(self, instance: Any) -> None:
        """An NMI to every vCPU (InjectNMI): a guest with kdump set up writes a crash dump."""
        try:
            self.client.inject_nmi(self._name(instance))
        except vclient.VmspawndError as e:
            if e.name == "NotRunning":
                raise exception.InstanceNotRunning(instance_id=instance.uuid) from e
            if e.name == "NoSuchMachine":
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            raise

    def snapshot(self, context: Any, instance: Any, image_id: str, update_task_state: Any) -> None:
        if self._state(instance) != "running":
            raise exception.InstanceNotRunning(instance_id=instance.uuid)
        raise NotImplementedError("vmspawnd cannot snapshot a machine yet")

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
        volumes = [(bdm.device_name, self._bdm_volume(bdm)) for bdm in bdms if bdm.is_volume]
        volume_id = mapping.volume_for_disk(disk_id, volumes)
        if volume_id is None:
            LOG.info("no volume %s on instance %s: no block stats", disk_id, instance.uuid)
            return None
        try:
            counters = self.client.drive_stats(self._name(instance), mapping.drive_id(volume_id))
        except vclient.VmspawndError as e:
            if e.name not in ("NoSuchDrive", "NoSuchMachine", "NotRunning"):
                raise
            LOG.info("no block stats of %s on instance %s: %s", disk_id, instance.uuid, e)
            return None
        return mapping.block_stats(counters)

    def _bdm_volume(self, bdm: Any) -> str:
        """What attach_volume made the drive id of: the connection's serial, else the volume id."""
        connection_info = jsonutils.loads(bdm.connection_info) if bdm.connection_info else {}
        return self._volume_id(connection_info) or str(bdm.volume_id)

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

    def _wanted_volumes(self, block_device_info: Any) -> dict[str, Any]:
        """Nova's volumes of the instance by the drive id each gets."""
        return {
            mapping.drive_id(self._volume_of(bdm)): bdm
            for bdm in driver.block_device_info_get_mapping(block_device_info)
        }

    def _plug_missing(self, name: str, block_device_info: Any) -> None:
        present = [d["id"] for d in self.client.properties(name).get("Drives", [])]
        to_plug, _ = mapping.volumes_to_change(present, self._wanted_volumes(block_device_info))
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
        try:
            self.client.remove_drive(self._name(instance), mapping.drive_id(volume_id), CONF.vmspawnd.unplug_timeout)
        except vclient.VmspawndError as e:
            if e.name == "NoSuchDrive":
                # Not there (any more): what Nova asked for holds.
                LOG.info("volume %s was not attached to %s", volume_id, instance.uuid)
                return
            if e.name == "NoSuchMachine":
                raise exception.InstanceNotFound(instance_id=instance.uuid) from e
            raise exception.DeviceDetachFailed(device=mountpoint, reason=str(e)) from e

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

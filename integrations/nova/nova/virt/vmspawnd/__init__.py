"""vmspawnd as a Nova compute driver: `compute_driver = vmspawnd.VmspawndDriver`."""

from nova.virt.vmspawnd.driver import VmspawndDriver

__all__ = ["VmspawndDriver"]

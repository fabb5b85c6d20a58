"""vmspawnd: run QEMU virtual machines on a packed PCIe layout, served on D-Bus."""

__version__ = "0.1.0"

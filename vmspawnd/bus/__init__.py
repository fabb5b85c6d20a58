"""D-Bus adapters: translate and validate, no logic of their own."""

BUS_NAME = "org.vmspawnd1"
MANAGER_PATH = "/org/vmspawnd1"
MANAGER_IFACE = "org.vmspawnd1.Manager"
MACHINE_IFACE = "org.vmspawnd1.Machine"
ERROR_PREFIX = "org.vmspawnd1.Error."

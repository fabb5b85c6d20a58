"""The daemon's error hierarchy: one class per D-Bus error name.

Every message says what went wrong and what to do about it; the bus layer
turns a class into `org.vmspawnd1.Error.<ClassName>`.
"""


class VmspawndError(Exception):
    """Base of every error a caller may see."""

    @classmethod
    def error_name(cls) -> str:
        return cls.__name__


class InvalidArgument(VmspawndError):
    pass


class NoSuchMachine(VmspawndError):
    pass


class MachineExists(VmspawndError):
    pass


class TooManyPorts(VmspawndError):
    pass


class PcieSlotsExhausted(VmspawndError):
    pass


class NoFreePort(VmspawndError):
    pass


class NoSuchDrive(VmspawndError):
    pass


class NoSuchNetwork(VmspawndError):
    """No network interface of that id on the machine."""


class NoSuchShare(VmspawndError):
    """No virtiofs share of that id on the machine."""


class UnplugInProgress(VmspawndError):
    pass


class UnplugTimeout(VmspawndError):
    pass


class QemuFailed(VmspawndError):
    pass


class NotRunning(VmspawndError):
    pass


class AlreadyRunning(VmspawndError):
    """Start() of a machine that runs (or is starting) already."""


class AccessDenied(VmspawndError):
    pass


class Unsupported(VmspawndError):
    """The machine cannot do this as it is (Suspend of a machine not kept); the message says what to change."""


class QuotaExceeded(VmspawndError):
    pass


class QemuUnresponsive(VmspawndError):
    pass


class NoSpace(VmspawndError):
    pass


class OpenTimeout(VmspawndError):
    """Opening a file the caller named did not finish (a hung file system)."""


class ConsoleBusy(VmspawndError):
    """The console has its one writer already, or as many followers as it takes."""


class MigrationFailed(VmspawndError):
    """A live migration did not complete (QEMU's reason, a cancel, or its bound)."""


class MigrationInProgress(VmspawndError):
    """The machine is migrating: the request waits for the migration's end."""


class NotMigrating(VmspawndError):
    """CancelMigration or ForceCompleteMigration of a machine with no migration running."""


class AgentUnavailable(VmspawndError):
    """No guest agent answers: the machine has no agent port, or nothing in the guest answers on it."""


class AgentFailed(VmspawndError):
    """The guest agent answered, with an error (in its own words) or with what is not a reply."""


class NoGraphics(VmspawndError):
    """OpenGraphics of a machine created without graphics (it has no display)."""


class JobInProgress(VmspawndError):
    """A block job (SnapshotDrive, SwapDrive) runs on the drive already: one at a time per drive."""


class JobTimeout(VmspawndError):
    """A block job did not end within its timeout; it was cancelled and nothing of it is left."""


class JobFailed(VmspawndError):
    """QEMU ended a block job with an error (its words in the message); nothing of it is left."""


ALL_ERRORS: tuple[type[VmspawndError], ...] = (
    InvalidArgument,
    NoSuchMachine,
    MachineExists,
    TooManyPorts,
    PcieSlotsExhausted,
    NoFreePort,
    NoSuchDrive,
    NoSuchNetwork,
    NoSuchShare,
    UnplugInProgress,
    UnplugTimeout,
    QemuFailed,
    NotRunning,
    AlreadyRunning,
    AccessDenied,
    Unsupported,
    QuotaExceeded,
    QemuUnresponsive,
    NoSpace,
    OpenTimeout,
    ConsoleBusy,
    MigrationFailed,
    MigrationInProgress,
    NotMigrating,
    AgentUnavailable,
    AgentFailed,
    NoGraphics,
    JobInProgress,
    JobTimeout,
    JobFailed,
)

"""Errors every front end shows the same way.

`NSTError` and its subclasses carry a message meant for a person (it names the file or field and
the problem) and the exit code the `nst` command uses for it. Anything else is a bug (exit 1).
The job service's own errors are here too; their `kind` is what a client reads (docs/PROTOCOL.md).
"""

from __future__ import annotations


class NSTError(Exception):
    """A problem the user can fix; `exit_code` is what `nst` exits with."""

    exit_code = 2
    kind = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_mapping(self) -> dict:
        """A structured form for the job service and the daemon's journal."""
        return {"kind": self.kind, "message": self.message}


class ParamError(NSTError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""

    kind = "param"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field

    def to_mapping(self) -> dict:
        return {**super().to_mapping(), "field": self.field}


class ImageError(NSTError):
    """An input image is missing, unreadable, truncated, too large, or not an image."""

    kind = "image"

    def __init__(self, path, message: str):
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = None if path is None else str(path)

    def to_mapping(self) -> dict:
        return {**super().to_mapping(), "path": self.path}


class WeightsError(NSTError):
    """Network weights cannot be found, fetched, or verified."""

    kind = "weights"


class DeviceError(NSTError):
    """The requested device is not available, or ran out of memory."""

    kind = "device"


class OutOfMemory(DeviceError):
    kind = "out_of_memory"


class Cancelled(NSTError):
    """The job's cancel flag was set; nothing was written."""

    kind = "cancelled"
    exit_code = 130


# ---- the job service ------------------------------------------------------------------------------

class ProtocolError(NSTError):
    """A request that does not follow docs/PROTOCOL.md."""

    kind = "protocol"

    def __init__(self, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field

    def to_mapping(self) -> dict:
        m = super().to_mapping()
        if self.field:
            m["field"] = self.field
        return m


class Busy(NSTError):
    """The service cannot take this request now (its memory budget or its connections are used up)."""

    kind = "busy"


class QueueFull(Busy):
    """The bounded job queue is full."""


class ServiceStopping(NSTError):
    """The service is shutting down; the job did not run (or was stopped)."""

    kind = "unavailable"


class ServiceSetupError(NSTError):
    """The service cannot listen where, or as, it was asked to."""

    kind = "service"


class ClusterError(NSTError):
    """The Ray cluster named by `cluster` cannot be used (not installed, unreachable, refused)."""

    kind = "cluster"


class WorkerLost(NSTError):
    """The cluster worker running the job went away (its node died or left) before the result came
    back; the job may run again elsewhere."""

    kind = "worker_lost"


class InternalError(NSTError):
    """A bug in the service or the engine, reported to the client instead of a dead service."""

    kind = "internal"
    exit_code = 1

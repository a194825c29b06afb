"""Domain errors of the cloud service, one class per gRPC status code they become.

The pure modules (sessions, sampling, scheduler) raise these; only ``service.py`` knows gRPC and
maps ``error.status`` to ``grpc.StatusCode``. Every message a client can meet says how to fix it.
"""

from __future__ import annotations


class CloudError(Exception):
    """Base: ``status`` is the name of the grpc.StatusCode member the service answers with."""

    status = "INTERNAL"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidArgument(CloudError):
    status = "INVALID_ARGUMENT"


class FailedPrecondition(CloudError):
    status = "FAILED_PRECONDITION"


class NotFound(CloudError):
    status = "NOT_FOUND"


class ResourceExhausted(CloudError):
    status = "RESOURCE_EXHAUSTED"


class Unauthenticated(CloudError):
    status = "UNAUTHENTICATED"


class PermissionDenied(CloudError):
    status = "PERMISSION_DENIED"


class IdleStream(CloudError):
    status = "DEADLINE_EXCEEDED"


class Unavailable(CloudError):
    status = "UNAVAILABLE"

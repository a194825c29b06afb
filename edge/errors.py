"""Errors of the edge agent. Link errors drive replay and fallback; the rest reach the caller.

``http_status`` is what the local API answers with; every message says how to fix the problem.
"""

from __future__ import annotations


class EdgeError(Exception):
    http_status = 500
    kind = "internal_error"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class BadRequest(EdgeError):
    """A request the agent cannot serve as asked (HTTP 400)."""

    http_status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PayloadTooLarge(EdgeError):
    """A request body or prompt over one of the agent's limits (HTTP 413); ``param`` names the setting."""

    http_status = 413
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# -- the cloud link: raised by CloudLink, handled by the generation loop -------------------------------

class LinkError(EdgeError):
    """Something went wrong between the edge and one cloud endpoint."""

    http_status = 502
    kind = "cloud_error"


class SessionLost(LinkError):
    """NOT_FOUND or a position mismatch: the cloud lost (part of) the session; replay the history."""


class LinkBroken(LinkError):
    """The stream broke, the endpoint died or did not answer in time: reconnect and replay."""


class CloudRejected(LinkError):
    """The cloud refused the request for a reason a retry will not fix (bad tensor, auth, model)."""


class CloudRefusedRequest(CloudRejected):
    """INVALID_ARGUMENT: the cloud refused what the caller asked for (e.g. a sampling value out of range).
    The caller's mistake, not an outage: no fallback, the caller gets HTTP 400 with the cloud's reason."""

    http_status = 400
    kind = "invalid_request_error"


class CloudUnavailable(EdgeError):
    """No cloud endpoint could serve the generation within the reconnect window (or the deadline)."""

    http_status = 503
    kind = "service_unavailable"


class NoRoute(EdgeError):
    """The cloud is unreachable and the bundle cannot run the whole model locally (HTTP 503)."""

    http_status = 503
    kind = "service_unavailable"


class Draining(EdgeError):
    http_status = 503
    kind = "service_unavailable"

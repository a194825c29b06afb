"""Structured fields of a gRPC error status, shared by the cloud (writes) and the edge (reads).

A field a client acts on travels as trailing metadata of the failed call, never inside the status
message (which is for people and may change wording):

- ``seamline-server-position``: on FAILED_PRECONDITION for a chunk that does not start at the
  session's position, the position the session holds (decimal); the client resends from there.
"""

from __future__ import annotations

from collections.abc import Iterable

SERVER_POSITION = "seamline-server-position"


def server_position_metadata(position: int) -> tuple[tuple[str, str], ...]:
    return ((SERVER_POSITION, str(position)),)


def server_position(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The ``seamline-server-position`` of trailing metadata; None when absent or not a number."""
    for key, value in metadata or ():
        if key.lower() == SERVER_POSITION:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return int(text) if text.isdigit() else None
    return None

"""Process memory that returns: glibc's malloc arenas capped, freed heap handed back to the OS, and the
start-up heap moved out of the garbage collector's sight. Used by both daemons (the cloud server and the edge
agent), so it lives beside the other shared modules.

glibc gives each thread that allocates its own arena (up to 8 per core) and keeps freed memory in
them for reuse: a server whose gRPC, asyncio and torch threads allocate and free per message sees its
RSS climb and stay. ``cap_arenas`` (at start-up, before the server's threads exist) limits the arenas;
``trim`` (after bursts of sessions ending) returns the free top of every arena and whole free pages
inside them (``malloc_trim``). Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

M_ARENA_MAX = -8
DEFAULT_ARENAS = 2


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def cap_arenas(arenas: int | None = None, default: int = DEFAULT_ARENAS) -> bool:
    """Limit glibc malloc to ``arenas`` arenas (``MALLOC_ARENA_MAX`` when set, else ``default``); True when
    applied."""
    if _LIBC is None:
        return False
    if arenas is None:
        arenas = int(os.environ.get("MALLOC_ARENA_MAX", default))
    os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas))  # child processes start capped too
    return bool(_LIBC.mallopt(M_ARENA_MAX, int(arenas)))


def trim() -> bool:
    """Hand free heap memory back to the OS (``malloc_trim(0)``); True when some was released."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


def settle_heap() -> None:
    """Move everything loaded so far (the model, the libraries) out of the garbage collector's sight.

    A full collection walks every tracked object: after start-up the cloud holds ~390,000 of them and a full
    collection took 235-274 ms on the build machine (one core), stalling every session's step and, through
    the GIL, the torch thread; on a device held to a fraction of a core the same stall was seen as a 400x
    decode step. Called once by a long-lived process after start-up, never from a library path."""
    gc.collect()
    gc.freeze()

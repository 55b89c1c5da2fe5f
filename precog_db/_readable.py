"""Is anything waiting on a socket right now? A zero-timeout ``poll(2)`` that keeps the GIL.

The pool's liveness check (`precog_db._pool_base.connection_is_usable`) asks
this of every connection it lends. `select.poll` releases the GIL around the
system call, even with a zero timeout; when other threads are waiting for the
GIL that release hands it to one of them, and the lending thread queues for
it again in the middle of its checkout. Under contention each such hand-off
costs two context switches and leaves the GIL idle while the next thread
wakes up: one extra release per read cut the throughput of eight threads by
more than half in the profile of docs/PERFORMANCE.md ("Under contention",
"Where the time goes"). A zero-timeout poll never blocks, so holding the GIL
through it costs only the system call.

`poller_for` calls libc's ``poll`` through `ctypes.PyDLL`, which keeps the
GIL during the call, on a ``struct pollfd`` built once per socket. Where
ctypes or ``poll`` is missing (Windows, a stripped interpreter) it falls back to
`select.poll`, or `select.select`: the same answer, with the release.
"""

from __future__ import annotations

import functools
import select
from collections.abc import Callable
from typing import Any

__all__ = ["READABLE_MASK", "poller_for"]

_HAS_POLL = hasattr(select, "poll")
#: Data, end of file or an error: anything at all on an idle PostgreSQL connection.
READABLE_MASK = (select.POLLIN | select.POLLERR | select.POLLHUP) if _HAS_POLL else 0


def _libc_poll() -> tuple[Any, type[Any], Any, Any, Callable[[Any], Any]] | None:
    """libc's ``poll``, called with the GIL held, its argument types and ``ctypes.byref``; None where unavailable."""
    if not _HAS_POLL:
        return None
    try:
        import ctypes

        poll = ctypes.PyDLL(None).poll  # PyDLL: the GIL stays held during the call
    except (ImportError, OSError, AttributeError):
        return None

    class PollFd(ctypes.Structure):
        _fields_ = (("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short))

    poll.restype = ctypes.c_int
    # The count and the timeout built once, as C values of the right width (nfds_t is unsigned long).
    return poll, PollFd, ctypes.c_ulong(1), ctypes.c_int(0), ctypes.byref


_LIBC = _libc_poll()


def poller_for(fd: int) -> Callable[[], object]:
    """A check, without blocking, of whether ``fd`` has data, end of file or an error waiting (a true result).

    Build it once per socket and keep it: the check itself is one C call, with
    no Python frame (a `functools.partial` of the C function). A ``poll`` that
    fails (-1, e.g. a file descriptor closed under it) is true too: the caller
    treats the connection as unusable.
    """
    if _LIBC is not None:
        poll, pollfd_type, one, zero, byref = _LIBC
        # byref keeps the struct alive as long as the check exists.
        return functools.partial(poll, byref(pollfd_type(fd, READABLE_MASK, 0)), one, zero)
    if _HAS_POLL:
        poller = select.poll()
        poller.register(fd, READABLE_MASK)
        return functools.partial(poller.poll, 0)
    return functools.partial(_select_readable, fd)


def _select_readable(fd: int) -> list[Any]:
    readable: list[Any] = select.select([fd], [], [], 0)[0]
    return readable

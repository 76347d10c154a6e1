"""Keep memory freed by one forward in the process for the next one.

A forward allocates and frees feature maps of tens of MB. glibc returns blocks that large to the kernel
(``mmap``/``munmap``, heap trimming), so every forward page-faults its memory in again. On the 2-core VM
this cost the width-24 network a third of its time (context 16: 145-220 ms against 115-125 ms with the
memory kept; ``python -m mvseg.bench --widths 24``). Peak memory is unchanged; the process just keeps its
peak after the forward instead of handing it back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Sequence

logger = logging.getLogger(__name__)

# Narrow networks spend a third of a CPU forward page-faulting freshly allocated memory; wide ones gain less
# and fragment more: width 256 at context 64 peaked at 3.9 GB with the memory kept against 2.7 GB without.
RETAIN_MAX_WIDTH = 64

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_retained = False
SERVER_ARENAS = 2


def retain_freed_memory() -> bool:
    """Tell glibc to serve large blocks from its heap and never trim it. Process-wide and idempotent;
    ``False`` where the C library is not glibc (nothing changes there)."""
    global _retained
    if _retained:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _retained = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    logger.debug("freed memory kept in the process: %s", _retained)
    return _retained


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None


def limit_arenas(arenas: int = SERVER_ARENAS) -> bool:
    """Let glibc keep at most ``arenas`` heaps, for a server whose many worker threads each run forwards.

    glibc gives threads up to 8 heaps per core, and each keeps the high-water mark of the forwards that ran
    on it: under 60 clients a 2-core server grew from 0.7 to 2.1 GB, four fifths of it freed memory, and
    more as more threads took turns. With 2 heaps it levelled off at 1.25 GB at the same clicks per second.
    Affects heaps made after the call: call it before the server's threads start. ``False`` off glibc."""
    mallopt = _mallopt()
    return bool(mallopt and mallopt(_M_ARENA_MAX, int(arenas)))


def retain_for_network(device_type: str, widths: Sequence[int]) -> bool:
    """:func:`retain_freed_memory` where it pays: a network on the CPU no wider than ``RETAIN_MAX_WIDTH``."""
    return device_type == "cpu" and max(widths) <= RETAIN_MAX_WIDTH and retain_freed_memory()

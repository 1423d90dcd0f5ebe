"""Large CPU buffers reused from the heap during a generation, given back to the system after it.

glibc's malloc serves a large allocation with fresh pages from the kernel (mmap), which are zeroed on
first touch, and unmaps them again on free. A UNet step allocates and frees hundreds of activations
of several MiB each (SD 1.5 at 32x32 latents: the GEGLU projections alone are 21 MiB), so a packed
fp32 step spent about 8% of its time faulting pages in (1.45 s against 1.33 s on a Xeon's 2 cores;
64x64 latents: 5.9 s against 5.3 s). With malloc's mmap off and a high trim threshold, a freed
buffer stays in the heap for the next one; the peak resident memory did not change (measured), and
:func:`give_back_free_heap` returns what a finished generation left free.

These are process-wide malloc settings: they are made once, on Linux with glibc, when a CPU pipeline
is built, and ``LDM_KEEP_MALLOC=1`` in the environment leaves malloc as it was.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30  # a generation's free heap stays up to this size until give_back_free_heap

_libc: ctypes.CDLL | None = None
_tried = False


def _glibc() -> ctypes.CDLL | None:
    global _libc, _tried
    if not _tried:
        _tried = True
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not os.environ.get("LDM_KEEP_MALLOC"):
            try:
                _libc = ctypes.CDLL("libc.so.6")
            except OSError:
                _libc = None
    return _libc


def reuse_freed_buffers() -> bool:
    """Makes malloc keep large freed buffers in the heap; whether it could (glibc only)."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def give_back_free_heap() -> None:
    """Returns the heap's free pages to the system (after a generation), where the settings were made."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

"""Large CPU buffers reused from the heap during a generation, given back to the system after it.

glibc's malloc serves a large allocation with fresh pages from the kernel (mmap), which are zeroed on
first touch, and unmaps them again on free. A UNet step allocates and frees hundreds of activations
of several MiB each (SD 1.5 at 32x32 latents: the GEGLU projections alone are 21 MiB), so a packed
fp32 step spent about 8% of its time faulting pages in (1.45 s against 1.33 s on a Xeon's 2 cores;
64x64 latents: 5.9 s against 5.3 s). With malloc's mmap off and a high trim threshold, a freed
buffer stays in the heap for the next one, and :func:`give_back_free_heap` returns what a finished
generation left free. Long-lived buffers (packed weights) are made inside :func:`own_pages`, with
pages of their own as before: packed among a step's activations, the holes they left between them
raised the peak of bf16 mode's first 256 px image by 0.2 GiB (measured).

These are process-wide malloc settings: they are made once, on Linux with glibc, when a CPU pipeline
is built, and ``LDM_KEEP_MALLOC=1`` in the environment leaves malloc as it was.
"""
from __future__ import annotations

import ctypes
import os
import platform
from contextlib import contextmanager
from typing import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_MMAP_MAX_DEFAULT = 65536  # glibc's own
_TRIM_THRESHOLD = 1 << 30  # a generation's free heap stays up to this size until give_back_free_heap

_libc: ctypes.CDLL | None = None
_tried = False
_reusing = False


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
    global _reusing
    libc = _glibc()
    _reusing = bool(libc and libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _reusing


@contextmanager
def own_pages() -> Iterator[None]:
    """Large allocations inside get pages of their own (malloc's default), for buffers that outlive
    a generation. Not for threads allocating at the same time: the setting is the process's."""
    if not _reusing:
        yield
        return
    _libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
    try:
        yield
    finally:
        _libc.mallopt(_M_MMAP_MAX, 0)


def give_back_free_heap() -> None:
    """Returns the heap's free pages to the system (after a generation); nothing where malloc keeps
    its defaults, which give large buffers back on free already."""
    if _reusing:
        _libc.malloc_trim(0)

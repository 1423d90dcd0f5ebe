"""nn/cpu_heap.py: a generation's large CPU buffers stay in the heap, and go back after it."""
from __future__ import annotations

import os

import pytest
import torch

from latent_diffusion.nn import cpu_heap


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_freed_large_buffer_stays_resident_until_the_heap_is_given_back():
    if not cpu_heap.reuse_freed_buffers():
        pytest.skip("malloc here is not glibc's (or LDM_KEEP_MALLOC is set)")
    size = 64 << 20
    cpu_heap.give_back_free_heap()  # start from a heap without resident free pages
    before = _resident_bytes()
    buffer = torch.ones(size, dtype=torch.uint8)  # every page touched
    assert _resident_bytes() - before >= size * 0.9
    del buffer
    assert _resident_bytes() - before >= size * 0.9  # kept for the next buffer: no page faults then
    cpu_heap.give_back_free_heap()
    assert _resident_bytes() - before <= size * 0.25

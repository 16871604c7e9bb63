"""A steady C heap for the processes that compute (``glinthawk.heap``).

Torch takes a CPU tensor's memory from the C library's ``malloc``.  glibc serves blocks
above its mmap threshold with fresh ``mmap`` pages and hands them back on ``free``, and
it adapts that threshold, and the heap trim threshold with it, to the sizes it has seen
freed.  A decode step allocates activations of a few hundred KiB to a few MiB, with
sizes that change between decode and prefill steps; they straddle the moving
thresholds, so memory goes back to the kernel and comes again as zero-filled pages,
each taken with a page fault.  The in-process engine on the 2-core VM took 13,000 to
38,000 minor faults per run of 32 sequences x 32 tokens (about 4 s), every run; with
the thresholds pinned it took a few hundred at most from its third run, and was 3.5%
faster (three alternating pairs: 242 against 251 tok/s on average; ``benchmarks/LOG.md``).
glibc's adaptive thresholds never exceed 32 and 64 MiB, and where a process's history
has left them lower, every step that frees more than the trim threshold pays again.

:func:`steady_heap` pins them: blocks up to :data:`MMAP_THRESHOLD` come from the heap,
and the heap keeps up to :data:`TRIM_THRESHOLD` of free memory at its top rather than
give it back: more than a step of a 7B model frees (FFN activations of 512 tokens are
22 MiB each in float32), where glibc's ceiling of 64 MiB would trim after every one.
A process holds at most that much more memory than it uses, and blocks larger than the
threshold (weights, KV caches, a long prefill's activations) still come and go as
their own mappings.  Tier workers pin their heap when their service
starts, and an in-process :class:`~glinthawk_dask.api.LLM` when it loads its weights.
It is a no-op off glibc, with ``glinthawk.heap: glibc`` (glibc's own adaptive
thresholds), and where the environment sets the C library's malloc tunables itself
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or
``glibc.malloc`` in ``GLIBC_TUNABLES``): the user's choice stands.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import threading

from . import config

logger = logging.getLogger(__name__)

__all__ = ["steady_heap", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "HEAP_MODES"]

HEAP_MODES = ("steady", "glibc")
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20  # above glibc's adaptive ceiling (twice the mmap one): a big model's step

# mallopt(3) parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_ENV_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_lock = threading.Lock()
_pinned: bool | None = None  # what the first call did (None: not called yet)


def _user_tunes_malloc() -> bool:
    return any(name in os.environ for name in _ENV_TUNABLES) or "glibc.malloc" in os.environ.get(
        "GLIBC_TUNABLES", "")


def _mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def steady_heap() -> bool:
    """Pin glibc's mmap and trim thresholds for this process, once (later calls return
    what the first did), as ``glinthawk.heap`` says; whether they are pinned.  See the
    module's docstring for why and for when it leaves them alone."""
    global _pinned
    with _lock:
        if _pinned is not None:
            return _pinned
        mode = config.get("heap")
        if mode not in HEAP_MODES:
            raise ValueError(f"glinthawk.heap must be one of {', '.join(HEAP_MODES)}, not {mode!r}")
        mallopt = _mallopt() if mode == "steady" and not _user_tunes_malloc() else None
        _pinned = bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                       and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        if _pinned:
            logger.debug("heap pinned: mmap threshold %d, trim threshold %d", MMAP_THRESHOLD, TRIM_THRESHOLD)
        return _pinned

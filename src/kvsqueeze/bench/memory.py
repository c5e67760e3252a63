"""Peak memory added by a block of code: CUDA's allocator peak on a GPU, else the process's resident set size."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import threading
from types import TracebackType

import torch


def rss_bytes() -> int:
    """Current resident set size (from /proc on Linux; elsewhere the lifetime peak, the best the OS tells)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS reports bytes, Linux KiB


def release_free_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc's malloc_trim), so that memory freed by
    earlier work is not silently reused inside a measured block (which would make its RSS growth look like 0)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: measure without trimming
        pass


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_bytes`: the most memory the block added over its start.

    CUDA: torch.cuda.max_memory_allocated minus the allocation at entry. CPU: RSS polled every `interval` seconds
    by a background thread (torch kernels release the GIL, so the poller runs during long ops), after freed heap
    memory was returned to the OS; still an estimate (the allocator may keep or reuse pages).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self._base = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        release_free_memory()
        self._base = self._peak = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.peak_bytes = max(0, self._peak - self._base)

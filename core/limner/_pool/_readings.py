"""Memory readings and time, behind small interfaces so tests can inject their own."""

from __future__ import annotations

import sys
import time
from typing import Protocol

import psutil

__all__ = ["Clock", "MemoryProbe", "MonotonicClock", "SystemMemory"]

_MB = 1024 * 1024


class MemoryProbe(Protocol):
    """Total and used memory of a device, in MB. ``"cpu"`` means system RAM."""

    def total_mb(self, device: str) -> float: ...

    def used_mb(self, device: str) -> float: ...


class Clock(Protocol):
    """Seconds from an arbitrary start; only differences matter."""

    def now(self) -> float: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


class SystemMemory:
    """System RAM through psutil; CUDA memory through torch, for GPU devices only.

    torch is never imported here: a CUDA device is only named by a plugin that has already
    imported it to resolve its device.
    """

    def total_mb(self, device: str) -> float:
        if device.startswith("cuda"):
            return self._cuda(device)[1]
        return float(psutil.virtual_memory().total) / _MB

    def used_mb(self, device: str) -> float:
        if device.startswith("cuda"):
            free, total = self._cuda(device)
            return total - free
        memory = psutil.virtual_memory()
        return float(memory.total - memory.available) / _MB

    @staticmethod
    def _cuda(device: str) -> tuple[float, float]:
        torch = sys.modules.get("torch")
        if torch is None:
            raise RuntimeError(f"device {device} named before torch was imported")
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return free / _MB, total / _MB

"""Reading GPUs: NVML where it is present, the GPUs declared in settings where it is not.

``reader()`` answers one object with ``read() -> list[Reading]``, whichever source it is, so nothing above
this module knows which. NVML's figures are per device, in MiB: total, used and free from the v2 memory
call (``nvmlDeviceGetMemoryInfo(handle, version=nvmlMemory_v2)``, whose ``used`` excludes the driver's
reserved memory that v1 counted as used), and the utilisation over NVML's last sample period. A declared
GPU (``SCHEDULER_DECLARED_GPUS``: name and memory) has a total and no live figures: the queue's ledger
alone then decides, never "zero free".

``sample()`` stores each reading in ``GpuReading`` (one row per GPU, by its key); the dispatcher compares
the ledger with the last reading that is fresh enough (``SCHEDULER_READING_MAX_AGE_SECONDS``).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.utils import timezone

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class Reading:
    gpu: str  # nvml:<uuid> or declared:<name>
    name: str
    source: str  # nvml | declared
    total_mb: int
    used_mb: int | None
    free_mb: int | None
    utilization: int | None
    read_at: datetime


class DeclaredReader:
    """The GPUs declared in settings: a total each, no live figures."""

    source = "declared"

    def __init__(self, declared: list[dict]):
        self.declared = [(str(d["name"]), int(d["memory_mb"])) for d in declared]

    def read(self) -> list[Reading]:
        now = timezone.now()
        return [Reading(gpu=f"declared:{name}", name=name, source=self.source, total_mb=memory, used_mb=None,
                        free_mb=None, utilization=None, read_at=now) for name, memory in self.declared]


class NvmlReader:
    """Every GPU NVML sees, read through ``pynvml`` (nvidia-ml-py). NVML is initialised once per process."""

    source = "nvml"

    def __init__(self, pynvml):
        self.nvml = pynvml
        self._handles: list | None = None
        self._lock = threading.Lock()

    def handles(self) -> list:
        with self._lock:
            if self._handles is None:
                n = self.nvml.nvmlDeviceGetCount()
                self._handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
            return self._handles

    def _text(self, value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def read(self) -> list[Reading]:
        nvml, out = self.nvml, []
        for handle in self.handles():
            memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            try:
                utilization = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nvml.NVMLError:  # not supported on every device (MIG instances)
                utilization = None
            out.append(Reading(
                gpu=f"nvml:{self._text(nvml.nvmlDeviceGetUUID(handle))}", name=self._text(nvml.nvmlDeviceGetName(handle)),
                source=self.source, total_mb=memory.total // MIB, used_mb=memory.used // MIB,
                free_mb=memory.free // MIB, utilization=utilization, read_at=timezone.now()))
        return out


_reader = None
_reader_lock = threading.Lock()


def nvml_reader() -> NvmlReader | None:
    """An NVML reader when NVML loads and sees at least one GPU; None otherwise (no driver, no GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
    except Exception as exc:  # noqa: BLE001 - pynvml raises NVMLError_* or OSError where there is no driver
        logger.info("NVML unavailable (%s): using the GPUs declared in settings", exc)
        return None
    return NvmlReader(pynvml)


def reader():
    """The process's reader: NVML (``SCHEDULER_GPUS`` = auto or nvml, and NVML present), else declared."""
    global _reader
    with _reader_lock:
        if _reader is None:
            found = nvml_reader() if settings.SCHEDULER_GPUS in ("auto", "nvml") else None
            if found is None and settings.SCHEDULER_GPUS == "nvml":
                raise RuntimeError("SCHEDULER_GPUS=nvml, and NVML is not available here.")
            _reader = found or DeclaredReader(settings.SCHEDULER_DECLARED_GPUS)
        return _reader


def sample() -> list[Reading]:
    """Read every GPU and store the readings (one row per GPU, replaced)."""
    from .models import GpuReading

    readings = reader().read()
    for r in readings:
        GpuReading.objects.update_or_create(gpu=r.gpu, defaults={
            "name": r.name, "source": r.source, "total_mb": r.total_mb, "used_mb": r.used_mb, "free_mb": r.free_mb,
            "utilization": r.utilization, "read_at": r.read_at})
    return readings

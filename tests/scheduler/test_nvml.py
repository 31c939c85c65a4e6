"""The NVML path, on a machine with a GPU (skipped where NVML finds none: this machine, CI).

Needs no database, so that it also runs on a bare GPU machine with only Django beside NVML
(``DJANGO_SETTINGS_MODULE=tests.scheduler.nvml_settings python -m pytest --noconftest -s`` this file): each
GPU is read through the v2 memory call, agrees with ``nvidia-smi``, and memory another process takes on
the GPU is memory admission no longer gives, though the queue's ledger is empty (the smaller of ledger and
live reading decides). The figures it prints are the closing note's."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from apps.scheduler import gpus
from apps.scheduler.admission import DeviceView, Waiting, plan

NVML = gpus.nvml_reader()
pytestmark = pytest.mark.skipif(NVML is None, reason="NVML finds no GPU here")


def _smi() -> list[dict]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=uuid,memory.total,memory.used,memory.free",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(", ") for line in out.strip().splitlines()]
    return [{"gpu": f"nvml:{u}", "total": int(t), "used": int(us), "free": int(f)} for u, t, us, f in rows]


def test_nvml_reads_every_gpu_with_the_v2_memory_call():
    readings = NVML.read()
    assert readings
    started = time.perf_counter()
    for _ in range(100):
        NVML.read()
    per_read_ms = (time.perf_counter() - started) * 10
    for r in readings:
        assert r.gpu.startswith("nvml:GPU-") and r.source == "nvml"
        assert r.total_mb > 0 and 0 <= r.free_mb <= r.total_mb and 0 <= r.used_mb <= r.total_mb
        assert r.used_mb + r.free_mb <= r.total_mb  # v2: total = reserved + used + free
        assert r.utilization is None or 0 <= r.utilization <= 100
    if shutil.which("nvidia-smi"):
        smi = {row["gpu"]: row for row in _smi()}
        for r in readings:
            assert smi[r.gpu]["total"] == r.total_mb
            assert abs(smi[r.gpu]["free"] - r.free_mb) <= 64, (smi[r.gpu], r)
    print("NVML", json.dumps({"readings": [vars(r) | {"read_at": r.read_at.isoformat()} for r in readings],
                              "read_all_gpus_ms": round(per_read_ms, 3)}))


HOLD_MB = 40 * 1024
TASK_MB = 10 * 1024


def _admitted(reading: gpus.Reading, margin_mb: int = 256) -> int:
    """How many 10 GiB tasks a device on this GPU (its whole memory, 512 MiB headroom, empty ledger) admits."""
    now = datetime.now(UTC)
    device = DeviceView(usable_mb=reading.total_mb - 512, held_tasks_mb=0, loaded={},
                        live_free_mb=reading.free_mb - margin_mb)
    waiting = [Waiting(id=i, backend_id=1, model="m", memory_mb=TASK_MB, priority=0, queued_at=now) for i in range(20)]
    from apps.scheduler.admission import BackendView, Loaded

    device.loaded[(1, "m")] = Loaded(1, "m", 0, "loaded", now, busy=False)
    out = plan(device, {1: BackendView(id=1, model_memory={"m": {"load_mb": 0, "request_mb": TASK_MB}},
                                       concurrency=100, active=0)}, waiting, now, aging_seconds=60,
               starvation_seconds=30)
    return len(out.admit)


def test_memory_another_process_takes_is_memory_admission_no_longer_gives():
    torch_ok = subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
                              capture_output=True).returncode == 0
    if not torch_ok:
        pytest.skip("no PyTorch with CUDA to take GPU memory from another process")
    before = NVML.read()[0]
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, torch; x = torch.empty({HOLD_MB} * 2**20, dtype=torch.uint8, "
                               "device='cuda:0'); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        during = NVML.read()[0]
        taken = before.free_mb - during.free_mb
        assert taken >= HOLD_MB, (before, during)
        admitted_before, admitted_during = _admitted(before), _admitted(during)
        assert admitted_during <= admitted_before - HOLD_MB // TASK_MB
        assert admitted_during * TASK_MB <= during.free_mb - 256  # never more than the live reading offers
    finally:
        holder.stdin.close()
        holder.wait(30)
    after = NVML.read()[0]
    print("NVML-ADMISSION", json.dumps({
        "gpu": before.name, "total_mb": before.total_mb, "free_before_mb": before.free_mb,
        "free_while_another_process_holds_40GiB_mb": during.free_mb, "free_after_mb": after.free_mb,
        "ten_GiB_tasks_admitted_before": admitted_before, "ten_GiB_tasks_admitted_during": admitted_during}))
    assert after.free_mb >= during.free_mb + HOLD_MB - 64  # freed once the process let go, measured

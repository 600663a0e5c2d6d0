"""scripts/trace_gaps.py: the GPU's idle stretches, the host work during them and the host's waits, read
from a torch profiler Chrome trace."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import trace_gaps  # noqa: E402


def _trace(tmp_path: Path, events: list[dict], name: str = "t.json.gz") -> Path:
    path = tmp_path / name
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": [{"ph": "X", **e} for e in events] + [{"ph": "M", "name": "meta"}]}, f)
    return path


# Two kernels with a 3 ms hole, during which the host ran a long index_put_; then a read that waited
# 2 ms for the second kernel inside aten::item; a third kernel that overlaps the second.
EVENTS = [
    {"cat": "kernel", "name": "gemm", "ts": 1000, "dur": 2000},
    {"cat": "cpu_op", "name": "aten::index_put_", "ts": 2500, "dur": 3000},
    {"cat": "kernel", "name": "softmax", "ts": 6000, "dur": 4000},
    {"cat": "kernel", "name": "gemm", "ts": 9000, "dur": 2000},
    {"cat": "cpu_op", "name": "aten::item", "ts": 7900, "dur": 2200},
    {"cat": "cpu_op", "name": "aten::_local_scalar_dense", "ts": 7950, "dur": 2100},
    {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 8000, "dur": 2000},
    {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 8100, "dur": 10},
]


def test_idle_gaps_busy_time_and_waits(tmp_path):
    events = trace_gaps.load_events(_trace(tmp_path, EVENTS))
    gpu = trace_gaps.gpu_events(events)
    span, busy, gaps = trace_gaps.idle_gaps(gpu)
    assert (span, busy) == (10_000, 7_000)  # the overlapping kernel counts once
    assert gaps == [trace_gaps.Gap(start=2000, length=3000, next_event="softmax")]
    assert trace_gaps.host_ops_during(events, 1000, gaps[0]) == [("aten::index_put_", 2500)]
    waits = trace_gaps.host_waits(events, 1000)
    assert waits == [(7000, "cudaStreamSynchronize", 2000, "aten::_local_scalar_dense < aten::item")]
    assert trace_gaps.idle_per_window(gaps, window_us=1000) == {2: 3000}


def test_command_line_report_and_comparison(tmp_path):
    a = _trace(tmp_path, EVENTS, "a.json.gz")
    b = _trace(tmp_path, [{"cat": "kernel", "name": "gemm", "ts": 0, "dur": 1000}], "b.json.gz")
    script = str(ROOT / "scripts/trace_gaps.py")
    out = subprocess.run([sys.executable, script, str(a), "--against", str(b)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "span 10.0 ms, GPU busy 7.0 ms, idle 3.0 ms" in out.stdout
    assert "aten::index_put_ 2.50" in out.stdout
    assert "cudaStreamSynchronize 2.00 ms in aten::_local_scalar_dense < aten::item" in out.stdout
    assert "+3.00     4.00 (2) vs    1.00 (1)  gemm" in out.stdout

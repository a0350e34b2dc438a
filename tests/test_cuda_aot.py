"""The CUDA backend's new small-M kernels compile for Hopper (sm_90) on a machine without a GPU.

`tools/aot_cuda.py` runs the real launchers on meta tensors with Triton's driver replaced by one that names the
target, so each kernel is specialised as on the device and compiled to a cubin by the ptxas shipped with Triton.
It runs in its own process: this suite's other CUDA tests import the kernels under the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "aot_cuda.py"


def test_the_tensor_core_small_m_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a real compile, not a hit from an earlier run
    env["PYTHONPATH"] = str(TOOL.parents[1])
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--shapes", "256x1024", "--ms", "16",
                           "--kinds", "dot_xsplit,dot_t", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    # per encoding: both kernels at the two (column tile, split) pairs the rule picks for 256 columns
    assert sorted((r["label"].split()[1], r["kernel"]) for r in rows) == sorted(
        [(enc, kernel) for enc in ("bits1", "bits2") for kernel in ("packed_dot_kernel", "packed_dot_t_kernel")
         for _ in range(2)])
    assert all(r["fits_shared_memory"] and 0 < r["shared_bytes"] <= 232448 for r in rows)
    assert "8 kernels compiled for sm_90, 0 failed or too large" in proc.stdout

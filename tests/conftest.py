"""Shared fixtures: tiny FLUX.2 checkpoints written by the project itself."""

from __future__ import annotations

import os

# Triton decides at import whether @triton.jit functions run in its interpreter, and torch or diffusers may import
# triton while other test modules are collected: the CUDA backend's kernels run on the CPU only if this is set first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bonsai_quant import mlx_cpu  # noqa: E402

# Before any test module imports mlx.core, so the suite runs MLX as bonsai-quant's own modules do (on Linux: its
# matmuls through numpy's OpenBLAS).
mlx_cpu.enable()

from bonsai_quant.flux2 import preset_config  # noqa: E402
from bonsai_quant.synthetic import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return preset_config("tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_config):
    """The tiny preset in bf16, sharded (4 MB shards) with an index, like a real diffusers checkpoint."""
    return write_checkpoint(tiny_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0,
                            max_shard_bytes=4_000_000)


@pytest.fixture(scope="session")
def tiny_ckpt_fp32(tmp_path_factory, tiny_config):
    """Single-file fp32 checkpoint of the same architecture."""
    return write_checkpoint(tiny_config, tmp_path_factory.mktemp("ckpt") / "tiny32", seed=1, dtype=torch.float32)

"""Random-weight FLUX.2 checkpoints that look trained, for tests, benchmarks and the built-in default model.

Linear weights have the ~1/sqrt(in_features) spread of trained layers plus a few heavy-tailed outliers per row
(trained transformers have them, and they are what stresses a per-group scale). Norm weights sit near 1.
Each tensor is drawn from its own seeded generator and written before the next is made, so memory follows
the largest tensor and the bytes depend only on (config, seed, dtype).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .checkpoint import Entry, write_weights
from .flux2 import TensorSpec, inventory
from .output import atomic_output

OUTLIERS_PER_ROW = 2
DEFAULT_SHARD_BYTES = 2 * 10**9


def random_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{spec.name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    if len(spec.shape) == 1:
        return 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
    rows, cols = spec.shape
    w = torch.randn(rows, cols, generator=gen)
    # Student-t with 2 degrees of freedom, times 4 and capped at 25: a few weights per row land 5-25 sigma out,
    # as in trained layers.
    z = torch.randn(rows, OUTLIERS_PER_ROW, generator=gen)
    chi2 = torch.randn(rows, OUTLIERS_PER_ROW, 2, generator=gen).square().sum(-1)
    where = torch.randint(0, cols, (rows, OUTLIERS_PER_ROW), generator=gen)
    w.scatter_(1, where, (4 * z / (chi2 / 2).sqrt()).clamp_(-25, 25))
    return w.mul_(cols**-0.5)


def write_checkpoint(config: dict, out: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False, progress=None) -> Path:
    """Write a diffusers-layout checkpoint (config.json + safetensors shards + index) for `config`."""
    specs = list(inventory(config).values())
    entries = [Entry(s.name, dtype, s.shape) for s in specs]
    with atomic_output(Path(out), force=force) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        by_name = {s.name: s for s in specs}

        def tensor_for(name: str) -> torch.Tensor:
            t = random_tensor(by_name[name], seed).to(dtype)
            if progress is not None:
                progress(by_name[name])
            return t

        write_weights(tmp, entries, tensor_for, max_shard_bytes)
    return Path(out)

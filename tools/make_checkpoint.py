#!/usr/bin/env python3
"""Write a random-weight FLUX.2 checkpoint in the diffusers layout (tests and benchmarks use these).

    python tools/make_checkpoint.py --preset klein-4b --out /tmp/klein-4b --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from bonsai_quant.errors import BonsaiError
from bonsai_quant.flux2 import PRESETS, inventory, preset_config
from bonsai_quant.synthetic import DEFAULT_SHARD_BYTES, write_checkpoint

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
                        help="largest shard in bytes (default 2e9: klein-4b in bf16 becomes 4 shards)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)

    import torch

    config = preset_config(args.preset)
    dtype = getattr(torch, args.dtype)
    total = sum(s.numel for s in inventory(config).values()) * dtype.itemsize
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{args.preset} seed {args.seed}") as bar:
            write_checkpoint(config, args.out, seed=args.seed, dtype=dtype, max_shard_bytes=args.shard_bytes,
                             force=args.force, progress=lambda spec: bar.update(spec.numel * dtype.itemsize))
    except BonsaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({total / 1e9:.3f} GB of {args.dtype} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

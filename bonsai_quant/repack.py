"""`repack`: a compact "bonsai" pack into a runtime pack (MLX or gemlite), losslessly.

The compact pack carries the whole quantization_config of the conversion, so the runtime pack written here is
byte-identical to the one `convert` writes for that target from the same checkpoint and recipe.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from .describe import CONFIG_NAME
from .errors import PackError
from .output import atomic_output
from .pack_check import open_pack
from .packing import bonsai
from .packset import PackSet, slots_from_qconfig
from .runtime.loader import PackReader, resolve_pack

RUNTIME_TARGETS = ("mlx", "gemlite")


def _check_copied_fields(path: Path, qconfig: dict) -> None:
    """What the new pack takes from the compact one beyond its structure (check_pack covers that)."""
    recipe, shard_bytes = qconfig.get("recipe"), qconfig.get("shard_bytes")
    if not (isinstance(recipe, dict) and isinstance(recipe.get("name"), str) and isinstance(recipe.get("mode"), str)):
        raise PackError(f"{path}: recipe {recipe!r:.200}; valid: the recipe object convert records, with a name and "
                        "a mode")
    if type(shard_bytes) is not int or shard_bytes <= 0:
        raise PackError(f"{path}: shard_bytes {shard_bytes!r:.200}; valid: a whole number of bytes > 0")


def repack(src: Path, target: str, out: Path, force: bool = False, verbose: bool = False) -> dict:
    if target not in RUNTIME_TARGETS:
        raise PackError(f"repack target {target!r}; valid: {', '.join(RUNTIME_TARGETS)}")
    start = time.perf_counter()
    folder = resolve_pack(Path(src), "bonsai")
    pack = open_pack(folder)
    qconfig = pack.qconfig
    _check_copied_fields(folder / CONFIG_NAME, qconfig)
    slots = slots_from_qconfig(qconfig, pack.specs)
    reader = PackReader(folder, pack.headers)
    with atomic_output(Path(out), force=force) as tmp:
        packs = PackSet({target: tmp}, folder / "config.json", qconfig, slots)
        try:
            for slot in tqdm(slots, desc=f"repack -> {target}", unit="tensor", file=sys.stderr,
                             disable=not (verbose and sys.stderr.isatty())):
                if slot.action == "keep":
                    packs.kept(slot, reader.get(slot.name))
                    continue
                tensors = {s: reader.get(f"{slot.module}.{s}") for s in bonsai.SUFFIXES}
                try:
                    codes, scales = bonsai.unpack(tensors, slot.mode, qconfig["group_size"])
                except PackError as e:
                    raise PackError(f"{folder}: {slot.module}: {e}") from None
                packs.quantized(slot, codes, scales)
            packs.close()
        except BaseException:
            packs.abort()
            raise
        files_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    return {"source": str(folder), "target": target, "out": str(out), "tensors": len(slots),
            "files_bytes": files_bytes, "seconds": round(time.perf_counter() - start, 3)}

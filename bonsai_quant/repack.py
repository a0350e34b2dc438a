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
from .output import atomic_output, check_free_space
from .pack_check import check_layout_fields, open_pack
from .packing import bonsai
from .packset import PackSet, pack_entries, slots_from_qconfig
from .runtime.loader import PackReader, resolve_pack

RUNTIME_TARGETS = ("mlx", "gemlite", "mflux")


def repack(src: Path, target: str, out: Path, force: bool = False, verbose: bool = False) -> dict:
    if target not in RUNTIME_TARGETS:
        raise PackError(f"repack target {target!r}; valid: {', '.join(RUNTIME_TARGETS)}")
    start = time.perf_counter()
    folder = resolve_pack(Path(src), "bonsai")
    pack = open_pack(folder)
    qconfig = pack.qconfig
    check_layout_fields(folder / CONFIG_NAME, qconfig)
    slots = slots_from_qconfig(qconfig, pack.specs)
    reader = PackReader(folder, pack.headers)
    check_free_space(Path(out).parent, sum(e.nbytes for e in pack_entries(target, qconfig, slots)),
                     f"repacking to {target}")
    with atomic_output(Path(out), force=force, sources=(src,)) as tmp:
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

"""Writing one quantized model into several pack folders at once, in one fixed, reproducible layout.

`convert` feeds it from a checkpoint and the quantizers; `repack` from a compact pack; `distill` from a trained
student. All describe the model the same way (slots in architecture order, one PackConfig whose only per-target
fields are "format" and "weights"), so the same model gives byte-identical packs whichever way it arrives.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Entry, Shard, ShardedWriter, shard_layout
from ..manifest import write_manifest
from .bits import shared_slots
from .config import PackConfig
from .targets import target as registered

# Our own keys in every file's `__metadata__` carry this prefix: MLX tools read unprefixed keys such as `mode`
# (mlx-vlm: MLX's quantization mode, "affine") and `bits` with their own meaning.
METADATA_PREFIX = "bonsai_"


@dataclass(frozen=True)
class Slot:
    """One source tensor's place in every pack."""
    name: str
    shape: tuple[int, ...]
    action: str                          # "quantize" | "keep"
    mode: str | None = None              # quantized only
    kept_dtype: torch.dtype | None = None

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


def slot_entries(slot: Slot, target: str, group_size: int, scale_dtype: torch.dtype) -> list[Entry]:
    if slot.action == "keep":
        return [Entry(registered(target).stored_name(slot.name), slot.kept_dtype, slot.shape)]
    found = registered(target)
    layout = found.layout(*slot.shape, slot.mode, group_size, scale_dtype)
    return [Entry(found.stored_name(f"{slot.module}.{suffix}"), dtype, tuple(shape))
            for suffix, (dtype, shape) in layout.items()]


def slots_from_config(qconfig: PackConfig, specs) -> list[Slot]:
    """Slots of a pack described by its quantization_config, in architecture (inventory) order."""
    slots = []
    for name, spec in specs.items():
        module = name.removesuffix(".weight")
        if module in qconfig.quantized and name.endswith(".weight"):
            slots.append(Slot(name, spec.shape, "quantize", mode=qconfig.quantized[module].mode))
        else:
            slots.append(Slot(name, spec.shape, "keep", kept_dtype=qconfig.kept[name]))
    return slots


def safetensors_metadata(target: str, qconfig: PackConfig) -> dict[str, str]:
    """The `__metadata__` of every safetensors file of a pack: loaders read `format`, and a target may add what
    its consumers read (mflux: `quantization_level` / `mflux_version`). Nothing else a consumer reads is set."""
    found = registered(target)
    meta = {"format": found.safetensors_format,
            METADATA_PREFIX + "producer": f"bonsai-quant {qconfig.tool_version}",
            METADATA_PREFIX + "recipe": qconfig.recipe_name, METADATA_PREFIX + "mode": qconfig.recipe_mode}
    meta.update(found.extra_metadata(q.mode for q in qconfig.quantized.values()))
    return meta


def pack_entries(target: str, qconfig: PackConfig, slots: list[Slot]) -> list[Entry]:
    return [e for s in slots for e in slot_entries(s, target, qconfig.group_size, qconfig.scale_dtype)]


def pack_layout(target: str, qconfig: PackConfig, slots: list[Slot]) -> list[Shard]:
    """The safetensors files a pack of `target` holds, header bytes included (verify rebuilds and compares)."""
    return shard_layout(pack_entries(target, qconfig, slots), registered(target).weights_stem, qconfig.shard_bytes,
                        safetensors_metadata(target, qconfig))


class PackSet:
    """Use as a context manager: the packs are closed (manifests written) when the block ends, aborted (their
    writers' temporaries removed) when it raises."""

    def __init__(self, folders: dict[str, Path], config_json: Path | bytes, qconfig: PackConfig, slots: list[Slot]):
        """folders: target -> pack folder to fill (made if missing); config_json: a file to copy, or its bytes."""
        self.folders = {t: Path(f) for t, f in folders.items()}
        self.group_size = qconfig.group_size
        self.writers: dict[str, ShardedWriter] = {}
        try:
            for target, folder in self.folders.items():
                folder.mkdir(exist_ok=True)
                if isinstance(config_json, bytes):
                    (folder / "config.json").write_bytes(config_json)
                else:
                    shutil.copyfile(config_json, folder / "config.json")
                qconfig.for_target(target).write(folder)
                self.writers[target] = ShardedWriter(folder, pack_entries(target, qconfig, slots),
                                                     registered(target).weights_stem, qconfig.shard_bytes,
                                                     safetensors_metadata(target, qconfig))
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> PackSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

    def kept(self, slot: Slot, tensor: torch.Tensor) -> None:
        for target, writer in self.writers.items():
            writer.write(registered(target).stored_name(slot.name), tensor)

    def quantized(self, slot: Slot, codes: torch.Tensor, scales: torch.Tensor) -> None:
        with shared_slots():
            for target, writer in self.writers.items():
                found = registered(target)
                for suffix, packed in found.pack(codes, scales, slot.mode, self.group_size).items():
                    writer.write(found.stored_name(f"{slot.module}.{suffix}"), packed)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        # The packs' digests side by side: each is a sequential read of its files, one core apiece.
        with ThreadPoolExecutor(max_workers=max(1, min(len(self.folders), os.cpu_count() or 1))) as pool:
            list(pool.map(write_manifest, self.folders.values()))

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()

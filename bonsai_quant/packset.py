"""Writing one quantized model into several pack folders at once, in one fixed, reproducible layout.

`convert` feeds it from a checkpoint and the quantizers; `repack` from a compact pack. Both describe the
model the same way (slots in architecture order, one quantization_config whose only per-target field is
"format"), so the same model gives byte-identical packs whichever way it arrives.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Entry, Shard, ShardedWriter, shard_layout
from .describe import CONFIG_NAME
from .manifest import write_manifest
from .plan import KEPT_DTYPES, SCALE_DTYPES, packer

SAFETENSORS_FORMAT = {"mlx": "mlx", "mflux": "mlx", "gemlite": "pt", "bonsai": "pt"}
# Our own keys in every file's `__metadata__` carry this prefix: MLX tools read unprefixed keys such as `mode`
# (mlx-vlm: MLX's quantization mode, "affine") and `bits` with their own meaning.
METADATA_PREFIX = "bonsai_"


def weights_stem(target: str) -> str:
    """`<stem>.safetensors` (or its shards + `<stem>.safetensors.index.json`) holds a pack's tensors."""
    return packer(target).WEIGHTS_STEM


def weights_name(target: str) -> str:
    return f"{weights_stem(target)}.safetensors"


def index_name(target: str) -> str:
    return f"{weights_name(target)}.index.json"


def stored_name(target: str, name: str) -> str:
    """The name a target's files give the tensor diffusers calls `name` (only mflux renames)."""
    rename = getattr(packer(target), "stored_name", None)
    return rename(name) if rename is not None else name


def source_name(target: str, stored: str) -> str:
    rename = getattr(packer(target), "source_name", None)
    return rename(stored) if rename is not None else stored


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
        return [Entry(stored_name(target, slot.name), slot.kept_dtype, slot.shape)]
    layout = packer(target).layout(*slot.shape, slot.mode, group_size, scale_dtype)
    return [Entry(stored_name(target, f"{slot.module}.{suffix}"), dtype, tuple(shape))
            for suffix, (dtype, shape) in layout.items()]


def slots_from_qconfig(qconfig: dict, specs) -> list[Slot]:
    """Slots of a pack described by its quantization_config, in architecture (inventory) order."""
    slots = []
    for name, spec in specs.items():
        module = name.removesuffix(".weight")
        if module in qconfig["quantized"] and name.endswith(".weight"):
            slots.append(Slot(name, spec.shape, "quantize", mode=qconfig["quantized"][module]["mode"]))
        else:
            slots.append(Slot(name, spec.shape, "keep", kept_dtype=KEPT_DTYPES[qconfig["kept"][name]["dtype"]]))
    return slots


def safetensors_metadata(target: str, qconfig: dict) -> dict[str, str]:
    """The `__metadata__` of every safetensors file of a pack: loaders read `format`; mflux takes a file as its
    own saved format by `quantization_level` / `mflux_version`. Nothing else a consumer reads is set."""
    recipe = qconfig["recipe"]
    meta = {"format": SAFETENSORS_FORMAT[target], METADATA_PREFIX + "producer": f"bonsai-quant {qconfig['tool']['version']}",
            METADATA_PREFIX + "recipe": recipe["name"], METADATA_PREFIX + "mode": recipe["mode"]}
    if target == "mflux":
        from .packing import mflux

        modes = [entry["mode"] for entry in qconfig["quantized"].values()]
        meta.update(quantization_level=mflux.quantization_level(modes), mflux_version=mflux.MFLUX_VERSION)
    return meta


def pack_entries(target: str, qconfig: dict, slots: list[Slot]) -> list[Entry]:
    scale_dtype = SCALE_DTYPES[qconfig["scale_dtype"]]
    return [e for s in slots for e in slot_entries(s, target, qconfig["group_size"], scale_dtype)]


def pack_layout(target: str, qconfig: dict, slots: list[Slot]) -> list[Shard]:
    """The safetensors files a pack of `target` holds, header bytes included (verify rebuilds and compares)."""
    return shard_layout(pack_entries(target, qconfig, slots), weights_stem(target), qconfig["shard_bytes"],
                        safetensors_metadata(target, qconfig))


def qconfig_text(target: str, qconfig: dict) -> str:
    """quantization_config.json of one target's pack, as written."""
    return json.dumps({**qconfig, "format": target, "weights": weights_name(target)}, indent=2) + "\n"


class PackSet:
    def __init__(self, folders: dict[str, Path], config_json: Path, qconfig: dict, slots: list[Slot]):
        """folders: target -> pack folder to fill (made if missing)."""
        self.folders = {t: Path(f) for t, f in folders.items()}
        self.group_size = qconfig["group_size"]
        self.writers: dict[str, ShardedWriter] = {}
        try:
            for target, folder in self.folders.items():
                folder.mkdir(exist_ok=True)
                shutil.copyfile(config_json, folder / "config.json")
                (folder / CONFIG_NAME).write_text(qconfig_text(target, qconfig))
                self.writers[target] = ShardedWriter(folder, pack_entries(target, qconfig, slots), weights_stem(target),
                                                     qconfig["shard_bytes"], safetensors_metadata(target, qconfig))
        except BaseException:
            self.abort()
            raise

    def kept(self, slot: Slot, tensor: torch.Tensor) -> None:
        for target, writer in self.writers.items():
            writer.write(stored_name(target, slot.name), tensor)

    def quantized(self, slot: Slot, codes: torch.Tensor, scales: torch.Tensor) -> None:
        for target, writer in self.writers.items():
            for suffix, packed in packer(target).pack(codes, scales, slot.mode, self.group_size).items():
                writer.write(stored_name(target, f"{slot.module}.{suffix}"), packed)

    def close(self) -> None:
        for target, writer in self.writers.items():
            writer.close()
            write_manifest(self.folders[target])

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()

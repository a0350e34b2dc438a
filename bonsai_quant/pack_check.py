"""Is a folder a well-formed pack? Decided from quantization_config.json, config.json and the safetensors headers
alone (no weight is read), before anything is built from it.

`check_pack` is the one structural check: load_transformer, eval and repack run it through `open_pack`, which
first looks at the files' sizes against manifest.json; verify's integrity step runs it after comparing every
sha256. Every failure is a `PackError` naming the file and the key or tensor, and saying what would be valid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import TensorInfo, read_folder_headers
from .errors import PackError
from .flux2 import TensorSpec, check_size, inventory, read_config
from .manifest import MANIFEST_NAME, check_manifest
from .packing.config import PackConfig
from .packing.folders import CONFIG_NAME
from .packing.targets import target as registered

# The fewest bits a pack stores per weight (bonsai binary codes; kept tensors take 16 or more): a config.json
# describing more parameters than the files could hold at this rate is refused before it is built.
MIN_BITS_PER_WEIGHT = 1


@dataclass(frozen=True)
class Pack:
    folder: Path
    qconfig: PackConfig  # quantization_config.json, every field used to build a model checked
    config: dict        # config.json
    specs: dict[str, TensorSpec]
    headers: dict[str, TensorInfo]

    @property
    def format(self) -> str:
        return self.qconfig.format

    @property
    def group_size(self) -> int:
        return self.qconfig.group_size

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.qconfig.scale_dtype


def pack_headers(folder: Path, fmt: str) -> dict[str, TensorInfo]:
    """The headers of a `fmt` pack's safetensors, keyed by diffusers tensor name; each `TensorInfo.name` is the
    name as stored (mflux packs rename a few tensors)."""
    target = registered(fmt, lambda what: PackError(f"{Path(folder) / CONFIG_NAME}: {what}"), "format")
    headers = read_folder_headers(Path(folder), target.weights_name, target.index_name, PackError)
    return {target.source_name(name): info for name, info in headers.items()}


def check_pack(folder: Path) -> Pack:
    """The pack's structure: quantization_config.json against config.json's architecture, and every tensor of
    the safetensors against the layout that implies (names, dtypes, shapes; nothing missing, nothing extra)."""
    folder = Path(folder)
    q = PackConfig.load(folder)
    path = folder / CONFIG_NAME

    def bad(what: str) -> PackError:
        return PackError(f"{path}: {what}")

    config = read_config(folder / "config.json")
    single, index = registered(q.format).weights_name, registered(q.format).index_name
    headers = pack_headers(folder, q.format)
    used = {info.file.name for info in headers.values()}
    if not (folder / index).exists():
        used.add(single)
    for stray in sorted(p.name for p in folder.glob("*.safetensors") if p.name not in used):
        raise PackError(f"{folder / stray}: a safetensors file the pack does not use (neither {single} nor a "
                        f"shard listed in {index}); valid: remove it")
    source = str(folder / "config.json")
    check_size(config, sum(info.nbytes for info in headers.values()), MIN_BITS_PER_WEIGHT, source)
    specs = inventory(config, source)

    for module in q.quantized:
        if f"{module}.weight" in q.kept:
            raise bad(f"quantized[{module!r}] and kept['{module}.weight'] both name '{module}.weight'")
    listed = {f"{m}.weight" for m in q.quantized} | set(q.kept)
    for name in specs:
        if name not in listed:
            raise bad(f"tensor {name!r} of the config.json architecture is neither quantized nor kept")
    for name in sorted(listed - set(specs)):
        raise bad(f"lists {name!r}, which config.json's architecture does not have")

    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    target = registered(q.format)
    for module, info in q.quantized.items():
        spec = specs[f"{module}.weight"]
        if not spec.is_linear_weight:
            raise bad(f"quantized[{module!r}]: '{module}.weight' is no Linear weight of config.json's architecture; "
                      "valid: list it under kept")
        if spec.shape != info.shape:
            raise bad(f"quantized[{module!r}]: shape {list(info.shape)}, but config.json's architecture has "
                      f"{list(spec.shape)}")
        try:
            layout = target.layout(*spec.shape, info.mode, q.group_size, q.scale_dtype)
        except PackError as e:
            raise bad(f"quantized[{module!r}]: {e}") from None
        for suffix, (dtype, shape) in layout.items():
            expected[f"{module}.{suffix}"] = (dtype, tuple(shape))
    for name, dtype in q.kept.items():
        expected[name] = (dtype, specs[name].shape)

    for name, (dtype, shape) in expected.items():
        got = headers.get(name)
        if got is None:
            raise PackError(f"{folder}: tensor {name!r} is missing from the pack's safetensors")
        if got.dtype != dtype or got.shape != shape:
            raise PackError(f"{folder}: tensor {name!r} is {got.dtype}{list(got.shape)}, expected {dtype}{list(shape)}")
    for name in sorted(set(headers) - set(expected)):
        raise PackError(f"{folder}: tensor {name!r} in {headers[name].file.name} is not described by {CONFIG_NAME}")
    return Pack(folder, q, config, specs, headers)


def check_unchanged(folder: Path) -> None:
    """The cheap half of the manifest check: every listed file is there with its listed size. The sha256 are
    verify's to compare; a pack without a manifest loads, with a warning that its bytes went unchecked."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).exists():
        warnings.warn(f"{folder}: no {MANIFEST_NAME}, so its files cannot be checked against their sha256; its "
                      "structure was checked, its bytes were not", stacklevel=4)
        return
    problems = check_manifest(folder, hashes=False)
    if problems:
        raise PackError(f"{problems[0]}; the pack changed since it was written: bonsai-quant verify names what "
                        "differs")


def open_pack(folder: Path) -> Pack:
    """What a reader checks before building anything from a pack: the manifest's sizes, then the structure."""
    check_unchanged(folder)
    return check_pack(folder)

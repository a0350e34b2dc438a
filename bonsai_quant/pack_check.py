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
from .describe import CONFIG_NAME
from .errors import PackError
from .flux2 import TensorSpec, check_size, inventory, read_config
from .manifest import MANIFEST_NAME, check_manifest
from .packset import index_name, source_name, weights_name
from .plan import BITS, KEPT_DTYPES, SCALE_DTYPES, TARGETS, packer
from .recipe import GROUP_SIZES, MODES
from .shards import read_json

# The fewest bits a pack stores per weight (bonsai binary codes; kept tensors take 16 or more): a config.json
# describing more parameters than the files could hold at this rate is refused before it is built.
MIN_BITS_PER_WEIGHT = 1


@dataclass(frozen=True)
class Pack:
    folder: Path
    qconfig: dict       # quantization_config.json, every field used to build a model checked
    config: dict        # config.json
    specs: dict[str, TensorSpec]
    headers: dict[str, TensorInfo]

    @property
    def format(self) -> str:
        return self.qconfig["format"]

    @property
    def group_size(self) -> int:
        return self.qconfig["group_size"]

    @property
    def scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.qconfig["scale_dtype"]]


def dtype_named(name, allowed: dict[str, torch.dtype], where: str) -> torch.dtype:
    """The dtype a pack names, looked up in `allowed` only (never getattr(torch, name))."""
    if isinstance(name, str) and name in allowed:
        return allowed[name]
    raise PackError(f"{where}: dtype {name!r}; valid: {', '.join(allowed)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _is_positive(value) -> bool:
    return type(value) is int and value > 0


def read_qconfig(folder: Path) -> dict:
    """quantization_config.json with every field a model is built from checked for type and range."""
    path = Path(folder) / CONFIG_NAME
    q = read_json(path, PackError)

    def bad(what: str) -> PackError:
        return PackError(f"{path}: {what}")

    if not isinstance(q, dict):
        raise bad("expected a JSON object")
    for key in ("format", "group_size", "scale_dtype", "quantized", "kept"):
        if key not in q:
            raise bad(f"missing key {key!r}")
    if not isinstance(q["format"], str) or q["format"] not in TARGETS:
        raise bad(f"format {_short(q['format'])}; valid: {', '.join(TARGETS)}")
    if type(q["group_size"]) is not int or q["group_size"] not in GROUP_SIZES:
        raise bad(f"group_size {_short(q['group_size'])}; valid: {', '.join(map(str, GROUP_SIZES))}")
    if not isinstance(q["scale_dtype"], str) or q["scale_dtype"] not in SCALE_DTYPES:
        raise bad(f"scale_dtype {_short(q['scale_dtype'])}; valid: {', '.join(SCALE_DTYPES)}")
    if not isinstance(q["quantized"], dict):
        raise bad("quantized: expected an object of module name -> {mode, bits, shape}")
    for module, entry in q["quantized"].items():
        where = f"quantized[{module!r}]"
        if not isinstance(entry, dict) or not {"mode", "bits", "shape"} <= set(entry):
            raise bad(f"{where}: expected an object with mode, bits and shape, got {_short(entry)}")
        mode, bits, shape = entry["mode"], entry["bits"], entry["shape"]
        if not isinstance(mode, str) or mode not in MODES:
            raise bad(f"{where}: mode {_short(mode)}; valid: {', '.join(MODES)}")
        if type(bits) is not int or bits != BITS[mode]:
            raise bad(f"{where}: bits {_short(bits)} for mode {mode!r}; valid: {BITS[mode]}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(map(_is_positive, shape))):
            raise bad(f"{where}: shape {_short(shape)}; valid: [out_features, in_features], whole numbers > 0")
    if not isinstance(q["kept"], dict):
        raise bad("kept: expected an object of tensor name -> {dtype}")
    for name, entry in q["kept"].items():
        if not isinstance(entry, dict):
            raise bad(f"kept[{name!r}]: expected an object with a dtype, got {_short(entry)}")
        dtype_named(entry.get("dtype"), KEPT_DTYPES, f"{path}: kept[{name!r}]")
    return q


def check_layout_fields(path: Path, qconfig: dict) -> None:
    """The fields beyond the structure that a pack's file layout is made from (safetensors metadata, shard
    size): verify rebuilds the layout from them, repack copies them into the new pack."""
    recipe, tool, shard_bytes = qconfig.get("recipe"), qconfig.get("tool"), qconfig.get("shard_bytes")
    if not (isinstance(recipe, dict) and isinstance(recipe.get("name"), str) and isinstance(recipe.get("mode"), str)):
        raise PackError(f"{path}: recipe {_short(recipe)}; valid: the recipe object convert records, with a name "
                        "and a mode")
    if not (isinstance(tool, dict) and isinstance(tool.get("version"), str)):
        raise PackError(f"{path}: tool {_short(tool)}; valid: the tool record convert writes, with a version")
    if not _is_positive(shard_bytes):
        raise PackError(f"{path}: shard_bytes {_short(shard_bytes)}; valid: a whole number of bytes > 0")


def pack_headers(folder: Path, fmt: str) -> dict[str, TensorInfo]:
    """The headers of a `fmt` pack's safetensors, keyed by diffusers tensor name; each `TensorInfo.name` is the
    name as stored (mflux packs rename a few tensors)."""
    if fmt not in TARGETS:
        raise PackError(f"{Path(folder) / CONFIG_NAME}: format {_short(fmt)}; valid: {', '.join(TARGETS)}")
    headers = read_folder_headers(Path(folder), weights_name(fmt), index_name(fmt), PackError)
    return {source_name(fmt, name): info for name, info in headers.items()}


def check_pack(folder: Path) -> Pack:
    """The pack's structure: quantization_config.json against config.json's architecture, and every tensor of
    the safetensors against the layout that implies (names, dtypes, shapes; nothing missing, nothing extra)."""
    folder = Path(folder)
    q = read_qconfig(folder)
    path = folder / CONFIG_NAME

    def bad(what: str) -> PackError:
        return PackError(f"{path}: {what}")

    config = read_config(folder / "config.json")
    single, index = weights_name(q["format"]), index_name(q["format"])
    headers = pack_headers(folder, q["format"])
    used = {info.file.name for info in headers.values()}
    if not (folder / index).exists():
        used.add(single)
    for stray in sorted(p.name for p in folder.glob("*.safetensors") if p.name not in used):
        raise PackError(f"{folder / stray}: a safetensors file the pack does not use (neither {single} nor a "
                        f"shard listed in {index}); valid: remove it")
    source = str(folder / "config.json")
    check_size(config, sum(info.nbytes for info in headers.values()), MIN_BITS_PER_WEIGHT, source)
    specs = inventory(config, source)

    for module in q["quantized"]:
        if f"{module}.weight" in q["kept"]:
            raise bad(f"quantized[{module!r}] and kept['{module}.weight'] both name '{module}.weight'")
    listed = {f"{m}.weight" for m in q["quantized"]} | set(q["kept"])
    for name in specs:
        if name not in listed:
            raise bad(f"tensor {name!r} of the config.json architecture is neither quantized nor kept")
    for name in sorted(listed - set(specs)):
        raise bad(f"lists {name!r}, which config.json's architecture does not have")

    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    target, scale_dtype = packer(q["format"]), SCALE_DTYPES[q["scale_dtype"]]
    for module, info in q["quantized"].items():
        spec = specs[f"{module}.weight"]
        if not spec.is_linear_weight:
            raise bad(f"quantized[{module!r}]: '{module}.weight' is no Linear weight of config.json's architecture; "
                      "valid: list it under kept")
        if list(spec.shape) != info["shape"]:
            raise bad(f"quantized[{module!r}]: shape {info['shape']}, but config.json's architecture has "
                      f"{list(spec.shape)}")
        try:
            layout = target.layout(*spec.shape, info["mode"], q["group_size"], scale_dtype)
        except PackError as e:
            raise bad(f"quantized[{module!r}]: {e}") from None
        for suffix, (dtype, shape) in layout.items():
            expected[f"{module}.{suffix}"] = (dtype, tuple(shape))
    for name, info in q["kept"].items():
        expected[name] = (KEPT_DTYPES[info["dtype"]], specs[name].shape)

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

"""`quantization_config.json`, typed: the description every pack carries of its tensors and how it was made.

`PackConfig.from_dict` validates every field a model or a file layout is built from (type and range, with the
file and key named) and gives them typed; `data` keeps the whole JSON object in written order, so that
`text()` rewrites it byte for byte. convert builds one per conversion (its "format" left None), PackSet writes
`for_target(name)` of it into each pack, and every reader loads it through `PackConfig.load`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PackError
from ..shards import read_json
from .folders import CONFIG_NAME
from .formats import GROUP_SIZES, KEPT_DTYPES, MODE_BITS, MODES, SCALE_DTYPES
from .targets import NAMES
from .targets import target as registered

FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantizedLinear:
    mode: str
    bits: int
    shape: tuple[int, int]   # (out_features, in_features)


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


@dataclass(frozen=True)
class PackConfig:
    data: dict = field(repr=False)        # the JSON object, in written order
    format: str | None                     # the target; None only before PackSet writes it
    group_size: int
    scale_dtype: torch.dtype
    quantized: dict[str, QuantizedLinear]  # module name -> its quantized linear
    kept: dict[str, torch.dtype]           # tensor name -> stored dtype
    where: str = ""                        # the file it came from, for error messages

    # -- reading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path) -> PackConfig:
        """quantization_config.json of a pack folder, every structural field checked."""
        path = Path(folder) / CONFIG_NAME
        return cls.from_dict(read_json(path, PackError), str(path))

    @classmethod
    def from_dict(cls, q, where: str = CONFIG_NAME, require_format: bool = True) -> PackConfig:
        def bad(what: str) -> PackError:
            return PackError(f"{where}: {what}")

        if not isinstance(q, dict):
            raise bad("expected a JSON object")
        for key in ("format", "group_size", "scale_dtype", "quantized", "kept"):
            if key not in q:
                raise bad(f"missing key {key!r}")
        version = q.get("format_version", FORMAT_VERSION)
        if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
            raise bad(f"format_version {_short(version)}; valid: 1 to {FORMAT_VERSION} (a newer version was written "
                      "by a newer bonsai-quant)")
        if not (q["format"] is None and not require_format) and (
                not isinstance(q["format"], str) or q["format"] not in NAMES):
            raise bad(f"format {_short(q['format'])}; valid: {', '.join(NAMES)}")
        if type(q["group_size"]) is not int or q["group_size"] not in GROUP_SIZES:
            raise bad(f"group_size {_short(q['group_size'])}; valid: {', '.join(map(str, GROUP_SIZES))}")
        if not isinstance(q["scale_dtype"], str) or q["scale_dtype"] not in SCALE_DTYPES:
            raise bad(f"scale_dtype {_short(q['scale_dtype'])}; valid: {', '.join(SCALE_DTYPES)}")
        if not isinstance(q["quantized"], dict):
            raise bad("quantized: expected an object of module name -> {mode, bits, shape}")
        quantized = {}
        for module, entry in q["quantized"].items():
            at = f"quantized[{module!r}]"
            if not isinstance(entry, dict) or not {"mode", "bits", "shape"} <= set(entry):
                raise bad(f"{at}: expected an object with mode, bits and shape, got {_short(entry)}")
            mode, bits, shape = entry["mode"], entry["bits"], entry["shape"]
            if not isinstance(mode, str) or mode not in MODES:
                raise bad(f"{at}: mode {_short(mode)}; valid: {', '.join(MODES)}")
            if type(bits) is not int or bits != MODE_BITS[mode]:
                raise bad(f"{at}: bits {_short(bits)} for mode {mode!r}; valid: {MODE_BITS[mode]}")
            if not (isinstance(shape, list) and len(shape) == 2 and all(map(_is_positive, shape))):
                raise bad(f"{at}: shape {_short(shape)}; valid: [out_features, in_features], whole numbers > 0")
            quantized[module] = QuantizedLinear(mode, bits, tuple(shape))
        if not isinstance(q["kept"], dict):
            raise bad("kept: expected an object of tensor name -> {dtype}")
        kept = {}
        for name, entry in q["kept"].items():
            if not isinstance(entry, dict):
                raise bad(f"kept[{name!r}]: expected an object with a dtype, got {_short(entry)}")
            kept[name] = dtype_named(entry.get("dtype"), KEPT_DTYPES, f"{where}: kept[{name!r}]")
        return cls(q, q["format"], q["group_size"], SCALE_DTYPES[q["scale_dtype"]], quantized, kept, where)

    def check_layout_fields(self) -> None:
        """The fields beyond the structure that a pack's file layout is made from (safetensors metadata, shard
        size): verify rebuilds the layout from them, repack copies them into the new pack."""
        recipe, tool, shard_bytes = self.data.get("recipe"), self.data.get("tool"), self.data.get("shard_bytes")
        if not (isinstance(recipe, dict) and isinstance(recipe.get("name"), str)
                and isinstance(recipe.get("mode"), str)):
            raise PackError(f"{self.where}: recipe {_short(recipe)}; valid: the recipe object convert records, with "
                            "a name and a mode")
        if not (isinstance(tool, dict) and isinstance(tool.get("version"), str)):
            raise PackError(f"{self.where}: tool {_short(tool)}; valid: the tool record convert writes, with a "
                            "version")
        if not _is_positive(shard_bytes):
            raise PackError(f"{self.where}: shard_bytes {_short(shard_bytes)}; valid: a whole number of bytes > 0")

    # -- the fields of the file layout (checked by check_layout_fields) -------------------------------------
    @property
    def shard_bytes(self) -> int:
        return self.data["shard_bytes"]

    @property
    def mode(self) -> str | None:
        return self.data.get("mode")

    @property
    def recipe_name(self) -> str | None:
        recipe = self.data.get("recipe")
        return recipe.get("name") if isinstance(recipe, dict) else None

    @property
    def recipe_mode(self) -> str | None:
        recipe = self.data.get("recipe")
        return recipe.get("mode") if isinstance(recipe, dict) else None

    @property
    def tool_version(self) -> str:
        return self.data["tool"]["version"]

    def get(self, key: str, default=None):
        """Any other recorded field (calibration, distill's training record, ...), as written."""
        return self.data.get(key, default)

    # -- writing -------------------------------------------------------------------------------------------
    def for_target(self, name: str) -> PackConfig:
        """The config of `name`'s pack: its "format" and its "weights" file, the only per-target fields."""
        return PackConfig.from_dict({**self.data, "format": name, "weights": registered(name).weights_name},
                                    self.where)

    def text(self) -> str:
        """The file as written: the object with its format, two-space indented."""
        return json.dumps(self.data, indent=2) + "\n"

    def write(self, folder: Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(self.text())
        return path

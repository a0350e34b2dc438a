"""The published Bonsai Image 4B packs, read as they were released.

Two layouts (REFERENCE: the release's snapshot folders):

- MLX repos: `transformer-packed-mflux/` with `diffusion_pytorch_model.safetensors` (per quantized linear
  `<m>.weight` uint32, `<m>.scales` and `<m>.biases` bf16, w = scales*q + biases; kept tensors bf16),
  `quantization_config.json` {bits, group_size, skip_patterns} and the diffusers `config.json`.
- CUDA repos: `transformer-gemlite-int{1,2}/` with `state_dict.pt`, a pickle of gemlite buffers (per quantized
  linear `W_q` uint8 [K*bits/8, N], `scales` and `zeros` fp32 [K/group, N], w = q*scales + zeros, `metadata`
  int32[12], `orig_shape`), `quantization_config.json` {format, bits, group_size, packing_bitwidth, ...},
  `config.json` and `gemlite_autotune.json`.

Their levels are symmetric only up to rounding: binary scales = 2s, biases (zeros) = -s held in bf16 (fp32) each
rounded on its own, so the two levels need not be exactly -l and +l. `decode` therefore reads a layer *loosely*:
codes from the slots, s = scales/2 (binary) or scales (ternary), and the offset of the pack's centre level
(scales/2 + biases binary, scales + biases ternary; 0 in an exact pack) must lie within TOLERANCE. The strict
unpack of bonsai-quant's own packs refuses such a layer instead; here it is measured, and a conversion says per
tensor where it is not lossless.

The pickle is read only by `torch.load(weights_only=True)`: no code runs, and anything but tensors in
containers is refused with the name of what was found.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import read_header
from ..errors import PackError
from ..flux2 import TensorSpec, inventory, read_config
from ..packing import bits as B
from ..packing import formats
from ..packing.formats import MODE_BITS
from ..shards import open_regular, read_json

MLX_DIR = "transformer-packed-mflux"
MLX_WEIGHTS = "diffusion_pytorch_model.safetensors"
GEMLITE_DIRS = ("transformer-gemlite-int1", "transformer-gemlite-int2")
PICKLE_NAME = "state_dict.pt"
QCONFIG_NAME = "quantization_config.json"
MODES = {bits: mode for mode, bits in MODE_BITS.items()}  # the published quantization_config names bits only
MLX_SUFFIXES = ("weight", "scales", "biases")
GEMLITE_SUFFIXES = ("W_q", "scales", "zeros", "metadata", "orig_shape")
SIDE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KEPT_DTYPES = tuple(formats.KEPT_DTYPES.values())
# gemlite's metadata slots the layout depends on (see packing/gemlite.py for all twelve).
_META = {"W_nbits": 1, "group_size": 2, "unpack_mask": 3, "elements_per_sample": 4, "channel_scale_mode": 9,
         "W_group_mode": 10}
_FMA_MODE = 4  # w = q * scales + zeros: what a zeros tensor selects

TOLERANCE = ("the centre level (binary scales/2 + biases, ternary scales + biases) within one bf16 unit in the "
             "last place of s: what scales and biases rounded to bf16 each on its own, from values that agree to "
             "bf16 precision, can differ by")


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (float32): 2^(exponent - 7), subnormals from 2^-133."""
    _, exponent = torch.frexp(x.float().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), (exponent - 1).clamp(min=-126) - 7)


def _is_ours(qconfig: Path) -> bool:
    """bonsai-quant's own quantization_config.json names its `format`; the published MLX one (bits, group_size,
    skip_patterns) does not. Our release writes its MLX pack into transformer-packed-mflux/ too, so the key, not
    the folder name, tells the two apart."""
    try:
        data = read_json(qconfig, PackError)
    except PackError:
        return False  # unreadable: open_published names the file and what is wrong with it
    return isinstance(data, dict) and "format" in data


def _is_layout(folder: Path) -> str | None:
    if (folder / PICKLE_NAME).exists():
        return "gemlite"
    if (folder / MLX_WEIGHTS).exists() and (folder / QCONFIG_NAME).exists() and not _is_ours(folder / QCONFIG_NAME):
        return "mlx"
    return None


def find_published(path) -> list[Path]:
    """Published pack folders at `path`: the folder itself, or the transformer-* folders of a snapshot."""
    path = Path(path)
    if not path.is_dir():
        return []
    if _is_layout(path):
        return [path]
    return [path / name for name in (MLX_DIR, *GEMLITE_DIRS) if (path / name).is_dir() and _is_layout(path / name)]


def published_folder(path, layout: str | None = None) -> Path:
    """The one published pack folder of `path` (of `layout` where given), or a PackError naming the choice."""
    found = [f for f in find_published(path) if layout is None or _is_layout(f) == layout]
    if len(found) == 1:
        return found[0]
    if not found:
        raise PackError(f"{path}: no published Bonsai pack here ({MLX_DIR}/ or {'/, '.join(GEMLITE_DIRS)}/)")
    raise PackError(f"{path}: holds several published packs ({', '.join(f.name for f in found)}); name one")


def _refused_global(message: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"[Uu]nsupported global:?\s*([\w.]+)", message)
    return found.group(1) if found else message.splitlines()[0][:200]


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """`state_dict.pt` as a dict of tensors, through torch.load(weights_only=True) (memory-mapped when the file
    is in torch's zip format). Anything else inside is refused by name."""
    open_regular(path, PackError, valid="a torch.save pickle of tensors").close()
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise PackError(f"{path}: holds {_refused_global(str(e))}, which is not a tensor; only tensors are read "
                        "from a pickle (torch.load weights_only=True), never other objects") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors for damaged files
        raise PackError(f"{path}: cannot be read as a torch.save pickle of tensors ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise PackError(f"{path}: holds a {type(data).__name__}; valid: a state dict (tensor name -> tensor)")
    for key, value in data.items():
        if not isinstance(key, str):
            raise PackError(f"{path}: key {key!r} is a {type(key).__name__}; valid: tensor names (strings)")
        if not isinstance(value, torch.Tensor):
            raise PackError(f"{path}: key {key!r} holds a {type(value).__name__}; valid: tensors only")
    return dict(data)


@dataclass
class Decoded:
    """One layer read loosely: codes and the symmetric scale, and how far the pack is from exactly that."""
    codes: torch.Tensor        # int8 [out, in]
    s: torch.Tensor            # float32 [out, groups]: binary scales/2, ternary scales
    offset: torch.Tensor       # float32 [out, groups]: the centre level, 0 in an exactly symmetric layer

    @property
    def symmetric(self) -> bool:
        return not bool(self.offset.any())

    def worst(self) -> tuple[float, float]:
        """(largest |offset|, largest |offset| / s) over the layer's groups."""
        a = self.offset.abs()
        rel = torch.where(self.s > 0, a / self.s.clamp(min=torch.finfo(torch.float32).tiny), a)
        return float(a.max()), float(rel.max())


@dataclass
class PublishedPack:
    folder: Path
    layout: str                          # "mlx" | "gemlite"
    mode: str
    bits: int
    group_size: int
    info: dict                           # the published quantization_config.json
    config: dict
    specs: dict[str, TensorSpec]
    quantized: dict[str, tuple[int, int]]  # module -> (out, in)
    kept: dict[str, torch.dtype]
    side_dtype: torch.dtype              # dtype of the stored scales (and biases / zeros)
    tensor_bytes: int
    skip_patterns: list[str] = field(default_factory=list)
    _tensors: dict | None = None

    @property
    def format(self) -> str:
        return f"published-{self.layout}"

    def get(self, name: str) -> torch.Tensor:
        if self.layout == "gemlite":
            if self._tensors is None:
                self._tensors = load_pickle(self.folder / PICKLE_NAME)
            return self._tensors[name]
        from safetensors import safe_open

        if self._tensors is None:
            self._tensors = {"handle": safe_open(str(self.folder / MLX_WEIGHTS), "pt", backend="pread")}
        try:
            return self._tensors["handle"].get_tensor(name)
        except Exception as e:  # safetensors' own error types are not stable across versions
            raise PackError(f"{self.folder / MLX_WEIGHTS}: cannot read tensor {name!r}: {e}") from None

    def buffers(self, module: str) -> dict[str, torch.Tensor]:
        suffixes = MLX_SUFFIXES if self.layout == "mlx" else GEMLITE_SUFFIXES
        return {s: self.get(f"{module}.{s}") for s in suffixes}

    def decode(self, module: str) -> Decoded:
        """Codes, symmetric s and centre offset of one layer; a PackError naming it where the slots hold no code
        of the mode, a side tensor is not finite, or the offset exceeds TOLERANCE."""
        t = self.buffers(module)
        if self.layout == "mlx":
            q = B.unpack_bytes(B.words_to_bytes(t["weight"]), self.bits)
            scales, base = t["scales"].float(), t["biases"].float()
        else:
            q = B.unpack_bytes(B.dense(t["W_q"].t()), self.bits)
            scales, base = B.dense(t["scales"].t()).float(), B.dense(t["zeros"].t()).float()
        where = f"{self.folder.name}: {module}"
        if not (bool(torch.isfinite(scales).all()) and bool(torch.isfinite(base).all())):
            raise PackError(f"{where}: scales or {'biases' if self.layout == 'mlx' else 'zeros'} hold inf or NaN")
        if bool((scales < 0).any()):
            at = (scales < 0).nonzero()[0].tolist()
            raise PackError(f"{where}: negative scale {scales[tuple(at)].item()} at [out, group] {at}")
        if self.mode == "ternary" and bool((q > 2).any()):
            at = (q > 2).nonzero()[0].tolist()
            raise PackError(f"{where}: slot value 3 at {at}, which is no ternary code (valid: 0, 1, 2)")
        s = scales / 2 if self.mode == "binary" else scales
        offset = s + base
        bad = offset.abs() > bf16_ulp(s)
        if bool(bad.any()):
            at = bad.nonzero()[0].tolist()
            raise PackError(f"{where}: not symmetric within the tolerance ({TOLERANCE}): at [out, group] {at} "
                            f"s = {s[tuple(at)].item():.6g}, centre level {offset[tuple(at)].item():.3g}")
        codes = (q.to(torch.int8) * 2 - 1) if self.mode == "binary" else (q.to(torch.int8) - 1)
        return Decoded(codes, s, offset)

    def levels(self, module: str) -> torch.Tensor:
        """The layer's dense float32 weights exactly as stored (w = q*scales + biases / zeros), [out, in]."""
        d = self.decode(module)
        out, inn = self.quantized[module]
        g = self.group_size
        w = d.codes.view(out, -1, g).float() * d.s.unsqueeze(-1) + d.offset.unsqueeze(-1)
        return w.view(out, inn)


def _check_info(info, path: Path) -> tuple[int, int, list[str]]:
    if not isinstance(info, dict):
        raise PackError(f"{path}: expected a JSON object")
    bits, group = info.get("bits"), info.get("group_size")
    if type(bits) is not int or bits not in MODES:
        raise PackError(f"{path}: bits {bits!r}; valid: 1 (binary) or 2 (ternary)")
    if type(group) is not int or group <= 0 or group & (group - 1):
        raise PackError(f"{path}: group_size {group!r}; valid: a power of two, 128 in the release")
    patterns = info.get("skip_patterns", [])
    if not (isinstance(patterns, list) and all(isinstance(p, str) and p for p in patterns)):
        raise PackError(f"{path}: skip_patterns {patterns!r}; valid: a list of module names")
    if "packing_bitwidth" in info and info["packing_bitwidth"] != 8:
        raise PackError(f"{path}: packing_bitwidth {info['packing_bitwidth']!r}; valid: 8 (uint8 W_q)")
    return bits, group, patterns


def _shape_dtype(layout: str, headers: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    if layout == "mlx":
        return {n: (i.dtype, i.shape) for n, i in headers.items()}
    return {n: (t.dtype, tuple(t.shape)) for n, t in headers.items()}


def open_published(folder: Path) -> PublishedPack:
    """Read and check a published pack folder's structure: every tensor of config.json's architecture present
    as a quantized layer of the stated bits or a kept tensor, with the layout's dtypes and shapes, nothing extra."""
    folder = Path(folder)
    layout = _is_layout(folder)
    if layout is None:
        raise PackError(f"{folder}: not a published Bonsai pack folder (needs {MLX_WEIGHTS} and {QCONFIG_NAME}, "
                        f"or {PICKLE_NAME})")
    qpath = folder / QCONFIG_NAME
    info = read_json(qpath, PackError, missing="missing; the published packs hold one beside the weights")
    bits, group, patterns = _check_info(info, qpath)
    mode = MODES[bits]
    config = read_config(folder / "config.json")
    specs = inventory(config, str(folder / "config.json"))
    source = folder / (MLX_WEIGHTS if layout == "mlx" else PICKLE_NAME)
    tensors = None
    if layout == "mlx":
        headers = _shape_dtype("mlx", read_header(source, PackError))
    else:
        tensors = load_pickle(source)
        headers = _shape_dtype("gemlite", tensors)
    suffixes = MLX_SUFFIXES if layout == "mlx" else GEMLITE_SUFFIXES
    quantized, kept, side = {}, {}, set()
    for name, spec in specs.items():
        module = name.removesuffix(".weight")
        keys = [f"{module}.{s}" for s in suffixes]
        has = [k for k in keys if k in headers]
        if f"{module}.scales" in headers:
            if len(has) != len(keys):
                raise PackError(f"{source}: {module} has {', '.join(has)} but lacks "
                                f"{', '.join(k for k in keys if k not in headers)}")
            if not spec.is_linear_weight:
                raise PackError(f"{source}: {module} is stored quantized but is no Linear of config.json's model")
            out, inn = spec.shape
            _check_layer(layout, module, headers, out, inn, bits, group, source, tensors)
            quantized[module] = (out, inn)
            side.add(headers[f"{module}.scales"][0])
            continue
        if name not in headers:
            raise PackError(f"{source}: tensor {name!r} of config.json's architecture is missing")
        dtype, shape = headers[name]
        if shape != spec.shape or dtype not in KEPT_DTYPES:
            raise PackError(f"{source}: tensor {name!r} is {dtype}{list(shape)}; expected a float tensor of shape "
                            f"{list(spec.shape)}")
        kept[name] = dtype
    listed = {f"{m}.{s}" for m in quantized for s in suffixes} | set(kept)
    for name in sorted(set(headers) - listed):
        raise PackError(f"{source}: tensor {name!r} is not part of config.json's architecture in this layout")
    if not quantized:
        raise PackError(f"{source}: no quantized layer found; valid: a published binary or ternary pack")
    if len(side) != 1 or next(iter(side)) not in SIDE_DTYPES:
        raise PackError(f"{source}: scales dtypes {sorted(map(str, side))}; valid: one of bfloat16, float16, float32")
    for module in quantized:
        hit = [p for p in patterns if p in module]
        if hit:
            raise PackError(f"{qpath}: skip_patterns {hit} name {module}, which the weights hold quantized")
    for key in ("quantized_count", "skipped_count"):
        want = len(quantized) if key == "quantized_count" else len({n.removesuffix('.weight') for n in kept
                                                                     if specs[n].is_linear_weight})
        if key in info and info[key] != want:
            raise PackError(f"{qpath}: {key} {info[key]!r}, but the weights hold {want}")
    size = sum(torch.Size(s).numel() * d.itemsize for d, s in headers.values())
    pack = PublishedPack(folder, layout, mode, bits, group, info, config, specs, quantized, kept,
                         next(iter(side)), size, patterns)
    pack._tensors = tensors
    return pack


def _check_layer(layout, module, headers, out, inn, bits, group, source, tensors) -> None:
    def want(key, dtypes, shape):
        dtype, got = headers[key]
        if dtype not in dtypes or got != shape:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise PackError(f"{source}: {key} is {str(dtype).removeprefix('torch.')}{list(got)}; expected "
                            f"{names} {list(shape)} for a {MODES[bits]} layer of [{out}, {inn}], group {group}")

    if inn % group or inn % (32 // bits):
        raise PackError(f"{source}: {module} in_features {inn} is not a whole number of groups of {group}")
    if layout == "mlx":
        want(f"{module}.weight", (torch.uint32,), (out, inn * bits // 32))
        want(f"{module}.scales", SIDE_DTYPES, (out, inn // group))
        want(f"{module}.biases", (headers[f"{module}.scales"][0],), (out, inn // group))
        return
    want(f"{module}.W_q", (torch.uint8,), (inn * bits // 8, out))
    want(f"{module}.scales", SIDE_DTYPES, (inn // group, out))
    want(f"{module}.zeros", (headers[f"{module}.scales"][0],), (inn // group, out))
    want(f"{module}.metadata", (torch.int32, torch.int64), (12,))
    want(f"{module}.orig_shape", (torch.int32, torch.int64), (2,))
    meta = tensors[f"{module}.metadata"].tolist()
    expect = {"W_nbits": bits, "group_size": group, "unpack_mask": (1 << bits) - 1, "elements_per_sample": 8 // bits,
              "channel_scale_mode": 0, "W_group_mode": _FMA_MODE}
    for slot, value in expect.items():
        if meta[_META[slot]] != value:
            raise PackError(f"{source}: {module}.metadata slot {_META[slot]} ({slot}) is {meta[_META[slot]]}, "
                            f"expected {value} for this layout")
    if tensors[f"{module}.orig_shape"].tolist() != [out, inn]:
        raise PackError(f"{source}: {module}.orig_shape is {tensors[f'{module}.orig_shape'].tolist()}, "
                        f"config.json's model has [{out}, {inn}]")


# ---------------------------------------------------------------------------------------------------- describe

def describe_published(folder: Path) -> dict:
    pack = open_published(folder)
    suffixes = MLX_SUFFIXES if pack.layout == "mlx" else GEMLITE_SUFFIXES
    quant_bytes = weights = 0
    shapes = _all_headers(pack)
    for module, (out, inn) in pack.quantized.items():
        weights += out * inn
        quant_bytes += sum(_nbytes(*shapes[f"{module}.{s}"]) for s in suffixes)
    kept_bytes = sum(_nbytes(*shapes[n]) for n in pack.kept)
    return {"folder": str(pack.folder), "format": pack.format, "mode": pack.mode, "bits": pack.bits,
            "group_size": pack.group_size, "scale_dtype": str(pack.side_dtype).removeprefix("torch."),
            "tool": {"name": "published Bonsai Image release", "layout": pack.layout,
                     "published_format": pack.info.get("format")},
            "quantized_tensors": len(pack.quantized), "kept_tensors": len(pack.kept), "quantized_weights": weights,
            "quantized_bytes": quant_bytes, "kept_bytes": kept_bytes,
            "bits_per_weight": 8 * quant_bytes / weights, "skip_patterns": pack.skip_patterns,
            "files_bytes": sum(p.stat().st_size for p in pack.folder.iterdir() if p.is_file())}


def _nbytes(dtype: torch.dtype, shape) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _all_headers(pack: PublishedPack) -> dict:
    if pack.layout == "mlx":
        return _shape_dtype("mlx", read_header(pack.folder / MLX_WEIGHTS, PackError))
    pack.get(next(iter(pack.kept)))  # loads the pickle once
    return _shape_dtype("gemlite", pack._tensors)


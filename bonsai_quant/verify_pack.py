"""`verify`'s steps for bonsai-quant's own packs (`PackVerifier`), and the gates and bounds every verifier shares.

The steps and what each checks are listed in `verify.py`. `verify_folders` checks several packs of one source
in one pass: the source is opened once, each of its tensors read and re-quantized once for every pack, and the
float32 reference forwards run once for packs that decode to the same weights (each pack's own decode is what
is compared, and each pack's own runtime forward is what is run)."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .dense import lazy_dense_model, load_dense
from .errors import BonsaiError
from .figures import figure, fixed_threads
from .flux2 import model_kwargs
from .manifest import check_manifest
from .pack_check import check_pack
from .packing.bits import shared_slots
from .packing.config import PackConfig, dtype_named
from .packing.folders import CONFIG_NAME
from .packing.formats import KEPT_DTYPES, MODE_BITS, SCALE_DTYPES
from .packing.packset import pack_layout, slots_from_config
from .packing.targets import TARGETS
from .plan import decide_all, make_plan
from .quantizers import QuantizedTensor, dequantize, quantize
from .readers.bfl import open_checkpoint
from .recipe import parse_recipe
from .runtime.loader import PackReader

# Float32 forward of the same weights, only the summation order differs (the reference runtime multiplies
# slices of output features; diffusers one matmul). Each output is a sum of <= 12288 products, so reordering
# moves it by ~sqrt(n) * 2^-24 relative (~7e-6 at klein's widest layer); through the layers errors don't
# grow by more than a small factor. 1e-4 leaves that margin yet is ~100x below what one wrong group does.
E2E_BOUND = 1e-4
# MLX vs torch: different kernels (attention, exp, rsqrt) as well as order; measured 1e-6 to 2e-6 on the tiny
# model. Same margin argument.
MLX_E2E_BOUND = 1e-4
# QuantizedLinear against x @ W^T with W exact in float32: order only (~4e-7 measured).
MLX_LAYER_BOUND = 1e-5
# Packs at least this large have the garbage collector run after each of their MLX steps (verify's lanes).
COLLECT_PACK_BYTES = 100_000_000
# Output features of a layer that go through QuantizedLinear when another layer of its shape ran in full.
MLX_LAYER_ROWS = 64
# gemlite with fp16 activations against float32: measured 2.9e-4 on an H100 on every klein-4b layer.
GEMLITE_LAYER_BOUND = 1e-2
# The CUDA backend (runtime/cuda) with bf16 activations against float32. Its codes are exact, so the error is
# the activations' rounding: bf16 (16-bit kernel, M = 16) ~3e-3; e4m3 with 1x128 power-of-two scales (fp8
# kernels, M = 256) 2.6e-2 measured on Gaussian inputs at klein shapes. Bounds leave 2-3x margin; one wrong
# code group moves a layer's output by far more.
CUDA_LAYER_BOUND_16BIT = 1e-2
CUDA_LAYER_BOUND_FP8 = 6e-2


@dataclass
class Step:
    name: str
    status: str = "pass"        # pass | fail | skip
    detail: str = ""
    data: dict = field(default_factory=dict)
    seconds: float = 0.0


class _Fail(Exception):
    pass


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Compare floats bit for bit (so -0.0 and NaN payloads count), as same-width integers."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def _same_tensor(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same dtype, shape and every bit."""
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(_bits(got), _bits(want))


def _fail(msg: str):
    raise _Fail(msg)


def _gate(err: float, bound: float, what: str) -> None:
    """Fail unless `err` is a finite number within `bound` (NaN compares false with everything)."""
    if not math.isfinite(err):
        _fail(f"{what}: error is {err} (the output holds NaN or Inf)")
    if err > bound:
        _fail(f"{what} by {err:.2e} (bound {bound})")


def _mlx_layer_error(layer, w: np.ndarray, rng, module: str) -> float:
    """A real mlx.nn.QuantizedLinear on 4 random rows against x @ W^T in float32, gated at MLX_LAYER_BOUND.
    `w`: the exact decoded weight of the output features the layer holds."""
    import mlx.core as mx

    x = rng.standard_normal((4, w.shape[1]), dtype=np.float32)
    ref = x @ w.T
    err = float(np.linalg.norm(np.array(layer(mx.array(x)).astype(mx.float32)) - ref) / np.linalg.norm(ref))
    _gate(err, MLX_LAYER_BOUND, f"{module}: mlx.nn.QuantizedLinear differs from x @ W^T")
    return err


def _scaled(codes: torch.Tensor, scales: torch.Tensor, g: int) -> torch.Tensor:
    """codes * s in the scale dtype: exact (codes are -1, 0, +1), and the dtype mx.dequantize returns."""
    out_f, in_f = codes.shape
    return (codes.view(out_f, -1, g).to(scales.dtype) * scales.unsqueeze(-1)).view(out_f, in_f)


def _from_mlx(array) -> torch.Tensor:
    """An MLX 16- or 32-bit float array as a torch tensor of the same dtype (numpy has no bfloat16: through its
    bits, no copy)."""
    import mlx.core as mx

    got = torch.from_numpy(np.asarray(array.view({2: mx.int16, 4: mx.int32}[array.dtype.size])))
    return got.view({mx.bfloat16: torch.bfloat16, mx.float16: torch.float16, mx.float32: torch.float32}
                    .get(array.dtype, got.dtype))


def _mlx_dequantize_equal(module: str, deq, w: torch.Tensor) -> None:
    """mx.dequantize's result against our decode of the same weights, bit for bit."""
    got = _from_mlx(deq)
    if got.dtype != w.dtype or not torch.equal(got, w):
        bad = ((got.float() != w.float()).nonzero()[0].tolist() if got.shape == w.shape else None)
        _fail(f"{module}: mlx.core.dequantize gives " + (
            f"{got[tuple(bad)].item()} at {bad}, the pack decodes to {w[tuple(bad)].item()}"
            if bad is not None else f"shape {list(got.shape)}, the pack decodes to {list(w.shape)}"))


def _mlx_dequantize_values_equal(module: str, mlx_tensors: list, codes: torch.Tensor, scales: torch.Tensor,
                                 mode: str, bits: int, g: int, pack) -> None:
    """Every value mx.dequantize computes for a layer, at a fraction of its size: one group per distinct
    (stored scale, stored bias, our decoded scale) of the layer, holding every code of the mode's alphabet,
    dequantized by MLX and compared with code * our scale. A difference counts where the layer holds that code
    in that group (a weight it really computes), and is reported there."""
    import mlx.core as mx

    _, mlx_scales, mlx_biases = mlx_tensors
    stored_s, stored_b = _from_mlx(mlx_scales), _from_mlx(mlx_biases)
    n_groups = scales.shape[1]
    key = ((stored_s.view(torch.int16).long() & 0xFFFF) << 32 | (stored_b.view(torch.int16).long() & 0xFFFF) << 16
           | (scales.view(torch.int16).long() & 0xFFFF))
    _, first = np.unique(key.flatten().numpy(), return_index=True)
    alphabet = torch.tensor([-1, 1] if mode == "binary" else [-1, 0, 1], dtype=torch.int8)
    pattern = alphabet.repeat(-(-g // len(alphabet)))[:g].expand(len(first), g).contiguous()
    ours = scales.flatten()[torch.from_numpy(first)].unsqueeze(1)
    # The codes' bits alone (the scales given to the packer are not used).
    weight = pack.pack(pattern, torch.ones(len(first), 1, dtype=scales.dtype), mode, g)["weight"]
    index = mx.array(first)
    got = _from_mlx(mx.dequantize(mx.array(weight.view(torch.int32).numpy()).view(mx.uint32),
                                  mlx_scales.flatten()[index][:, None], mlx_biases.flatten()[index][:, None],
                                  group_size=g, bits=bits))
    want = _scaled(pattern, ours, g)
    if got.dtype == want.dtype and torch.equal(got, want):
        return
    grouped = codes.view(codes.shape[0], n_groups, g)
    for r, c in (got.float() != want.float()).nonzero().tolist() if got.shape == want.shape else []:
        row, group = divmod(int(first[r]), n_groups)
        where = (grouped[row, group] == pattern[r, c]).nonzero()
        if len(where):
            column = group * g + int(where[0])
            _fail(f"{module}: mlx.core.dequantize gives {got[r, c].item()} at [{row}, {column}], the pack "
                  f"decodes to {want[r, c].item()}")
    if got.dtype != want.dtype or got.shape != want.shape:
        _fail(f"{module}: mlx.core.dequantize gives {got.dtype} {list(got.shape)} on the pack's tensors, the pack "
              f"decodes to {want.dtype} {list(want.shape)}")


def _gemlite_missing() -> str | None:
    """Why gemlite's kernels cannot run here, or None."""
    from .runtime.gemlite_backend import gemlite_available

    if gemlite_available():
        return None
    return ("gemlite needs a CUDA GPU and the gemlite package; " +
            ("no CUDA GPU here" if not torch.cuda.is_available() else "gemlite is not installed"))


# Files a pack folder holds besides its safetensors (whose names come from the layout).
PACK_FILES = ("config.json", CONFIG_NAME, "manifest.json")


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    """The first key path whose value differs between two JSON objects, for an error message."""
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key) != b.get(key):
            if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
                return _first_difference(a[key], b[key], f"{prefix}{key}.")
            return f"{prefix}{key}"
    return "(key order or formatting)"


def _recorded_recipe(q: PackConfig, source: str):
    """The recipe a pack was made with: its text, with the name and a --mode override the pack records."""
    import dataclasses

    recipe = parse_recipe(q.get("recipe_yaml"), source)
    recorded = q.get("recipe") if isinstance(q.get("recipe"), dict) else {}
    if recorded.get("mode") in MODE_BITS and recorded["mode"] != recipe.mode:
        recipe = recipe.with_mode(recorded["mode"])
    if isinstance(recorded.get("name"), str):
        recipe = dataclasses.replace(recipe, name=recorded["name"])
    return recipe


class PackVerifier:
    def __init__(self, folder: Path, source: Path | None, image_tokens: int, text_tokens: int, seed: int,
                 calib: Path | None = None, reproducible: bool = False, shared: SharedWork | None = None):
        self.folder, self.source, self.calib = folder, source, calib
        self.reproducible = reproducible
        self.image_tokens, self.text_tokens, self.seed = image_tokens, text_tokens, seed
        self.qconfig: PackConfig | None = None
        self.config: dict = {}
        self._reader: PackReader | None = None
        self.shared = shared if shared is not None else SharedWork(source)
        # The pack of this run whose reference forward is this pack's: itself, or one found in step 2 to decode
        # to the same weights, kept tensors and config.
        self.twin: PackVerifier = self
        self._decisions: dict = {}
        self._recipe = None
        self._stats = None
        # Quantized modules whose mx.dequantize of this pack's tensors equals our decode bit for bit (step 3).
        self.mlx_dequantize_exact: set[str] = set()

    @property
    def source_name(self) -> str:
        """The source as details name it: its path, or in a release folder (reproducible) its folder name."""
        return Path(self.source).name if self.reproducible else str(self.source)

    def decode(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) of one layer, read again each time so memory never holds the whole model."""
        q = self.qconfig
        pack = TARGETS[q.format]
        tensors = {s: self.reader.get(f"{module}.{s}") for s in pack.suffixes}
        try:
            return pack.unpack(tensors, q.quantized[module].mode, q.group_size)
        except BonsaiError as e:
            _fail(f"{module}: {e}")

    # -- step 1 -------------------------------------------------------------------------------------------
    def integrity(self, step: Step) -> None:
        problems = check_manifest(self.folder)
        if problems:
            _fail(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        pack = check_pack(self.folder)
        q = self.qconfig = pack.qconfig
        self.config = pack.config
        q.check_layout_fields()
        layout = pack_layout(q.format, q, slots_from_config(q, pack.specs))
        index = TARGETS[q.format].index_name
        files = {s.file for s in layout} | ({index} if len(layout) > 1 else set())
        strangers = sorted(p.name + ("/" if p.is_dir() else "") for p in self.folder.iterdir()
                           if p.name not in files and p.name not in PACK_FILES)
        if strangers:
            _fail(f"{self.folder}: {', '.join(strangers)} not part of a {q.format} pack (it holds "
                  f"{', '.join(sorted(files | set(PACK_FILES)))}); remove what does not belong")
        for shard in layout:  # metadata, order, offsets and padding: the header must be what convert writes
            file = self.folder / shard.file
            with open(file, "rb") as f:
                head = f.read(len(shard.header))
            if head != shard.header:
                try:
                    got = json.loads(head[8:])
                except ValueError:
                    got = None
                want = json.loads(shard.header[8:])
                where = _first_difference(want, got) if isinstance(got, dict) else "(not a JSON object)"
                _fail(f"{file}: safetensors header differs from the layout of this pack at {where!r}"
                      + (f": {got.get('__metadata__')} instead of {want['__metadata__']}"
                         if where.startswith("__metadata__") and isinstance(got, dict) else ""))
            if file.stat().st_size != len(shard.header) + shard.data_bytes:
                _fail(f"{file}: {file.stat().st_size} bytes, the layout needs {len(shard.header) + shard.data_bytes}")
        if len(layout) > 1:
            from .checkpoint import index_text

            if (self.folder / index).read_text(errors="replace") != index_text(layout):
                _fail(f"{self.folder / index}: differs from the index of this pack's layout")
        step.detail = f"{len(pack.headers)} tensors in {len(layout)} file(s) match"

    # -- step 2 -------------------------------------------------------------------------------------------
    def exactness(self, step: Step) -> None:
        """Step 2 for this pack alone; `check_exactness` runs it for several packs of one source at once."""
        check_exactness([(self, step)])
        if step.status == "fail":
            raise _Fail(step.detail)

    def _prepare_exactness(self, step: Step) -> None:
        """What step 2 checks of this pack before its layers: kept tensors finite; with a source, the recorded
        recipe, the config and quantization_config.json against it, and the decision for every tensor."""
        q, reader = self.qconfig, self.reader
        for name in q.kept:
            tensor = reader.get(name)
            if not bool(torch.isfinite(tensor).all()):
                idx = (~torch.isfinite(tensor)).nonzero()[0].tolist()
                _fail(f"kept tensor {name!r} holds {tensor[tuple(idx)].item()} at {idx}; valid: finite values")
        step.detail = f"{len(q.quantized)} layers decode to codes in their alphabet times 16-bit scales"
        if self.source is None:
            step.detail += "; no --source, so not compared with a re-quantization"
            return
        if not isinstance(q.get("recipe_yaml"), str):
            _fail(f"{self.folder / CONFIG_NAME}: no recipe_yaml; comparing with --source re-runs the recipe the "
                  "pack records there")
        recipe = self._recipe = _recorded_recipe(q, f"{self.folder / CONFIG_NAME}:recipe_yaml")
        ckpt, specs = self.shared.checkpoint()
        if model_kwargs(ckpt.config) != model_kwargs(self.config):
            _fail(f"--source {self.source}: config.json differs from the pack's")
        if (self.folder / "config.json").read_bytes() != ckpt.config_bytes:
            _fail(f"{self.folder / 'config.json'} is not a copy of the source's config.json ({ckpt.path})")
        decisions = decide_all(specs, {n: t.dtype for n, t in ckpt.tensors.items()}, recipe)
        self._stats = self._calibration_stats(ckpt, decisions)
        self._check_qconfig(ckpt, recipe, self._stats)
        self._decisions = {d.name: d for d in decisions}

    @property
    def reader(self) -> PackReader:
        if self._reader is None:
            self._reader = PackReader(self.folder)
        return self._reader

    def _requant_key(self, d) -> tuple:
        """What a re-quantization of one source tensor depends on: packs with equal keys share it."""
        stats = self._stats.get(d.name) if self._stats is not None else None
        return d.mode, self._recipe.group_size, self._recipe.scale_dtype, d.solver, None if stats is None else id(stats)

    def _requantize(self, d, weight: torch.Tensor):
        return quantize(weight, d.mode, self._recipe.group_size, SCALE_DTYPES[self._recipe.scale_dtype], d.solver,
                        name=d.name, stats=self._stats.get(d.name) if self._stats is not None else None)

    def _check_kept_source(self, d, weight: torch.Tensor) -> None:
        q = self.qconfig
        if d.name not in q.kept:
            _fail(f"{d.name}: the recorded recipe keeps it, but the pack does not")
        want = weight.to(q.kept[d.name])
        got = self.reader.get(d.name)
        if got.dtype != want.dtype or not torch.equal(_bits(got), _bits(want)):
            idx = (_bits(got) != _bits(want)).nonzero()[0].tolist()
            _fail(f"kept tensor {d.name!r} differs from the source at {idx}: {got[tuple(idx)].item()} "
                  f"in the pack, {want[tuple(idx)].item()} in the source")

    def _check_layer(self, module: str, requant=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One quantized layer, decoded once: codes in the alphabet (the decoder checks), scales finite and
        >= 0, and with a re-quantization, its codes, scales and every stored bit.

        With a re-quantization the stored tensors are first compared with packing it: when every bit is equal,
        the pack holds exactly what packing the re-quantization gives, whose decode is the re-quantization
        (the packers' round trip, tests/test_pack_contract.py), so the layer is not decoded again. Otherwise it
        is decoded, to say which code or scale differs."""
        if requant is not None:
            mode, g = self.qconfig.quantized[module].mode, self._recipe.group_size
            packed = TARGETS[self.qconfig.format].pack(requant.codes, requant.scales, mode, g)
            if all(_same_tensor(self.reader.get(f"{module}.{suffix}"), want) for suffix, want in packed.items()):
                if not bool(torch.isfinite(requant.scales).all()) or bool((requant.scales < 0).any()):
                    _fail(f"{module}: scales must be finite and >= 0")
                return requant.codes, requant.scales
        codes, scales = self.decode(module)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            _fail(f"{module}: scales must be finite and >= 0")
        if requant is None:
            return codes, scales
        if not torch.equal(codes, requant.codes):
            idx = (codes != requant.codes).nonzero()[0].tolist()
            _fail(f"{module}: code at {idx} is {int(codes[tuple(idx)])}, re-quantizing the source gives "
                  f"{int(requant.codes[tuple(idx)])}")
        if not torch.equal(_bits(scales), _bits(requant.scales)):
            idx = (_bits(scales) != _bits(requant.scales)).nonzero()[0].tolist()
            _fail(f"{module}: scale at [out, group] {idx} is {scales[tuple(idx)].item()}, re-quantizing "
                  f"the source gives {requant.scales[tuple(idx)].item()}")
        # Every stored bit, not only what decodes: padding, side tensors (gemlite metadata, MLX biases).
        mode, g = self.qconfig.quantized[module].mode, self._recipe.group_size
        for suffix, want in TARGETS[self.qconfig.format].pack(requant.codes, requant.scales, mode, g).items():
            if not _same_tensor(self.reader.get(f"{module}.{suffix}"), want):
                _fail(f"{module}.{suffix}: stored bytes differ from packing the re-quantized source "
                      "(bits outside the decoded codes and scales changed)")
        return codes, scales

    def _finish_exactness(self, step: Step) -> None:
        if self.source is not None:
            step.detail += f"; equal to re-quantizing {self.source_name} under the recorded recipe"
            if self._stats is not None:
                step.detail += f" with calibration set {Path(self.calib).name if self.reproducible else self.calib}"

    def _check_qconfig(self, ckpt: Checkpoint, recipe, stats) -> None:
        """quantization_config.json must be exactly what convert writes for this source and recorded recipe."""
        from .convert import quantization_config

        q = self.qconfig
        recorded = q.get("recipe_sha256")
        if recorded != hashlib.sha256(recipe.text.encode()).hexdigest():
            _fail(f"{CONFIG_NAME}: recipe_yaml does not hash to the recorded recipe_sha256 {str(recorded)[:12]}...")
        want = quantization_config(make_plan(ckpt, recipe), q.shard_bytes)
        if stats is not None:
            want["calibration"] = q.get("calibration")  # its fingerprint was checked against --calib
        want.update({k: v for k, v in q.data.items() if k not in want})  # distill's training record
        want_text = PackConfig.from_dict(want, CONFIG_NAME, require_format=False).for_target(q.format).text()
        if (self.folder / CONFIG_NAME).read_text() != want_text:
            where = _first_difference(json.loads(want_text), q.data)
            _fail(f"{CONFIG_NAME}: {where!r} differs from what converting {self.source} under the recorded "
                  "recipe writes")

    def _calibration_stats(self, ckpt: Checkpoint, decisions):
        """Statistics for re-running calibrated solvers, from the same set the pack records (or None)."""
        from .quantizers import statistics_needed

        wanted = statistics_needed(decisions)
        if not wanted:
            return None
        record = self.qconfig.get("calibration")
        record = record if isinstance(record, dict) else {}
        if self.calib is None:
            _fail(f"{len(wanted)} layers were quantized with calibrated solvers "
                  f"({', '.join(sorted({d.solver for d in decisions if d.name in wanted}))}); re-quantizing them "
                  f"needs the calibration set the pack records ({record.get('set', 'unknown')!r}, sha256 "
                  f"{str(record.get('fingerprint'))[:12]}...): --calib SET")
        from .calibration import load_calibration
        from .stats import BlockStats

        calib = load_calibration(self.calib)
        if calib.fingerprint() != record.get("fingerprint"):
            _fail(f"--calib {self.calib}: not the calibration set this pack was made with (sha256 "
                  f"{calib.fingerprint()[:12]}..., the pack records {str(record.get('fingerprint'))[:12]}...)")
        dtype = dtype_named(record.get("model_dtype", "float32"), KEPT_DTYPES,
                            f"{self.folder / CONFIG_NAME}: calibration.model_dtype")
        key = (calib.fingerprint(), dtype, tuple(sorted(wanted.items())))  # packs of one set share its statistics
        if key not in self.shared.stats:
            self.shared.stats[key] = BlockStats(load_dense(ckpt, dtype=dtype), calib, wanted)
        return self.shared.stats[key]

    # -- step 3 -------------------------------------------------------------------------------------------
    def real_runtime(self, step: Step) -> None:
        fmt = self.qconfig.format
        if fmt in ("mlx", "mflux"):  # mflux packs hold MLX's own tensors under mflux's names
            self._mlx_layers(step)
        elif fmt == "gemlite":
            self._gemlite_layers(step)
        else:
            step.status = "skip"
            step.detail = ("compact distribution format: no runtime reads it directly "
                           "(bonsai-quant repack turns it into one)")

    def _mlx_layers(self, step: Step) -> None:
        from . import mlx_cpu

        mlx_cpu.enable()  # before mlx.core is first imported
        import mlx.core as mx
        import mlx.nn as mnn

        arrays = {}
        for file in sorted(self.folder.glob("*.safetensors")):
            arrays.update(mx.load(str(file)))
        g, worst, shapes = self.qconfig.group_size, 0.0, set()
        rng = np.random.default_rng(self.seed)
        pack = TARGETS[self.qconfig.format]
        # MLX's CPU dequantize (~0.5 s per klein layer) and quantized_matmul are slow loops (mlx_cpu). Both run on
        # all output features of the first layer of each shape and bits. mx.dequantize computes each weight from
        # its position's bits and its group's scale and bias alone, so on every other layer it runs on the first
        # MLX_LAYER_ROWS rows (positions) and on every distinct (scale, bias) pair of the layer with every code
        # (values): together they cover every weight the layer holds. QuantizedLinear runs on those rows too
        # (each input feature, so every group of the layout, goes through it).
        for module, info in self.qconfig.quantized.items():
            out_f, in_f = info.shape
            bits, mode = info.bits, info.mode
            # Popped: a tensor MLX has read stays in memory as long as it is referenced (the whole pack otherwise).
            mlx_tensors = [arrays.pop(pack.stored_name(f"{module}.{s}")) for s in ("weight", "scales", "biases")]
            full = (bits, out_f, in_f) not in shapes
            shapes.add((bits, out_f, in_f))
            rows = out_f if full else min(out_f, MLX_LAYER_ROWS)
            codes, scales = self.decode(module)
            w = _scaled(codes[:rows], scales[:rows], g)
            _mlx_dequantize_equal(module, mx.dequantize(*(t[:rows] for t in mlx_tensors), group_size=g, bits=bits),
                                  w)
            if not full:
                _mlx_dequantize_values_equal(module, mlx_tensors, codes, scales, mode, bits, g, pack)
            layer = mnn.QuantizedLinear(in_f, rows, bias=False, group_size=g, bits=bits)
            layer.weight, layer.scales, layer.biases = (t[:rows] for t in mlx_tensors)
            worst = max(worst, _mlx_layer_error(layer, w.float().numpy(), rng, module))
            self.mlx_dequantize_exact.add(module)
        step.data["max_rel_error"] = worst
        step.detail = (f"mlx {mx.__version__}: dequantize exact and QuantizedLinear on all output features of one "
                       f"layer per shape ({len(shapes)} shapes) and on the first {MLX_LAYER_ROWS} of the others, "
                       f"dequantize exact on every (scale, bias, code) of those others too: "
                       f"{len(self.qconfig.quantized)} layers; max rel error {worst:.1e} (bound {MLX_LAYER_BOUND})")

    def _gemlite_layers(self, step: Step) -> None:
        missing = _gemlite_missing()
        if missing is not None:
            step.status, step.detail = "skip", missing
            return
        import gemlite
        from gemlite.core import DType, GemLiteLinearTriton

        gemlite.set_packing_bitwidth(8)
        reader, g, worst = PackReader(self.folder), self.qconfig.group_size, 0.0
        act = self.qconfig.scale_dtype
        dt = {torch.float16: DType.FP16, torch.bfloat16: DType.BF16}[act]
        gen = torch.Generator(device="cuda").manual_seed(self.seed)
        for module, info in self.qconfig.quantized.items():
            out_f, in_f = info.shape
            layer = GemLiteLinearTriton(info.bits, g, in_f, out_f, dt, dt)
            layer.load_state_dict({s: reader.get(f"{module}.{s}").cuda() for s in TARGETS["gemlite"].suffixes})
            x = torch.randn(16, in_f, generator=gen, device="cuda")
            codes, scales = self.decode(module)
            ref = x @ dequantize(codes.cuda(), scales.cuda(), g).t()
            err = float((layer(x.to(act)).float() - ref).norm() / ref.norm())
            _gate(err, GEMLITE_LAYER_BOUND, f"{module}: gemlite output differs from x @ W^T")
            worst = max(worst, err)
        step.data["max_rel_error"] = worst
        step.detail = (f"gemlite ran {len(self.qconfig.quantized)} layers; max rel error {worst:.1e} "
                       f"(bound {GEMLITE_LAYER_BOUND})")

    def cuda_runtime(self, step: Step) -> None:
        """Every quantized layer through the CUDA backend's kernels, read from this pack's own buffers."""
        from .runtime.cuda import cuda_unavailable_reason
        from .runtime.cuda.layout import codes_of, from_buffers
        from .runtime.cuda.linear import CudaPackedLinear

        reason = cuda_unavailable_reason("cuda")
        if reason is not None:
            step.status, step.detail = "skip", reason
            return
        reader, g = PackReader(self.folder), self.qconfig.group_size
        if g != 128:
            step.status, step.detail = "skip", f"the cuda backend runs group size 128, this pack has {g}"
            return
        gen = torch.Generator(device="cuda").manual_seed(self.seed)
        worst = {}
        kernels = set()
        for module, info in self.qconfig.quantized.items():
            out_f, in_f = info.shape
            buffers = {s: reader.get(f"{module}.{s}").cuda() for s in TARGETS[self.qconfig.format].buffers}
            w = from_buffers(self.qconfig.format, buffers, in_f, out_f, info.bits, g)
            codes, scales = self.decode(module)
            if not torch.equal(codes_of(w).cpu(), codes):
                bad = (codes_of(w).cpu() != codes).nonzero()[0].tolist()
                _fail(f"{module}: the cuda backend reads code {int(codes_of(w)[tuple(bad)])} at {bad}, the pack "
                      f"decodes to {int(codes[tuple(bad)])}")
            layer = CudaPackedLinear(w)
            dense = dequantize(codes.cuda(), scales.cuda(), g)
            for m, bound in ((16, CUDA_LAYER_BOUND_16BIT), (256, None)):
                x = torch.randn(m, in_f, generator=gen, device="cuda").to(torch.bfloat16)
                kernel = layer.kernel_for(m, x.dtype)
                kernels.add(kernel)
                limit = bound if kernel == "bf16" else CUDA_LAYER_BOUND_FP8
                ref = x.float() @ dense.t()
                err = float((layer(x).float() - ref).norm() / ref.norm())
                _gate(err, limit, f"{module}: cuda backend ({kernel} kernel, M = {m}) differs from x @ W^T")
                worst[kernel] = max(worst.get(kernel, 0.0), err)
        step.data.update({f"max_rel_error_{k}": v for k, v in worst.items()})
        step.detail = (f"cuda backend ran {len(self.qconfig.quantized)} layers at M = 16 and 256 (kernels "
                       f"{', '.join(sorted(kernels))}); codes read bit-exact; max rel error " +
                       ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())) +
                       f" (bounds: 16-bit {CUDA_LAYER_BOUND_16BIT}, fp8 {CUDA_LAYER_BOUND_FP8})")

    # -- steps 4 and 5 ------------------------------------------------------------------------------------
    def inputs(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        side = max(1, int(self.image_tokens**0.5))
        h, w = torch.meshgrid(torch.arange(side), torch.arange(self.image_tokens // side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(h), h, w, torch.zeros_like(h)], -1).reshape(-1, 4).float()
        txt_ids = torch.zeros(self.text_tokens, 4)
        txt_ids[:, 3] = torch.arange(self.text_tokens)
        n = img_ids.shape[0]
        return {"hidden_states": torch.randn(1, n, self.config["in_channels"], generator=gen),
                "encoder_hidden_states": torch.randn(1, self.text_tokens, self.config["joint_attention_dim"],
                                                     generator=gen),
                "timestep": torch.tensor([0.625]), "img_ids": img_ids, "txt_ids": txt_ids}

    @torch.no_grad()
    def reference_output(self, inputs: dict) -> torch.Tensor:
        """diffusers' own forward, float32, with every quantized weight set to its decoded value: computed once
        per run for the packs that step 2 found to decode to the same weights (`twin`)."""
        twin = self.twin
        return self.shared.output(("reference", twin.folder), inputs, lambda: twin._reference_forward(inputs))

    def _reference_forward(self, inputs: dict) -> torch.Tensor:
        reader, g, scratch = self.reader, self.qconfig.group_size, _Scratch()  # freed with the forward
        fetch = {module: (lambda m=module, shape=info.shape: dequantize(*self.decode(m), g, out=scratch.take(shape)))
                 for module, info in self.qconfig.quantized.items()}
        lazy = _lazy_kept(self.qconfig.kept, fetch)
        fetch.update({m: (lambda n=f"{m}.weight": scratch.take(reader.shape(n)).copy_(reader.get(n))) for m in lazy})
        kept = {name: reader.get(name).float() for name in self.qconfig.kept
                if name.removesuffix(".weight") not in lazy}
        return lazy_dense_model(self.config, kept, fetch)(**inputs, return_dict=False)[0]

    @torch.no_grad()
    def source_output(self, inputs: dict) -> torch.Tensor:
        """The unquantized source's float32 forward, its block linears read from disk as they are used: once
        per run (the source and the inputs are the same for every pack)."""
        return self.shared.output(("source",), inputs, lambda: self._source_forward(inputs))

    def _source_forward(self, inputs: dict) -> torch.Tensor:
        ckpt, _ = self.shared.checkpoint()
        scratch, modules = _Scratch(), set(self.qconfig.quantized)
        rest = [n for n in ckpt.tensors if n.removesuffix(".weight") not in modules]
        modules |= _lazy_kept(rest, modules)
        kept = {n: ckpt.load(n).float() for n in rest if n.removesuffix(".weight") not in modules}

        def weight(module: str) -> torch.Tensor:
            name = f"{module}.weight"
            return scratch.take(ckpt.tensors[name].shape).copy_(ckpt.load(name))

        fetch = {m: (lambda m=m: weight(m)) for m in modules}
        return lazy_dense_model(self.config, kept, fetch)(**inputs, return_dict=False)[0]

    @torch.no_grad()
    def end_to_end(self, step: Step, inputs: dict, reference: torch.Tensor) -> None:
        from .runtime import load_transformer

        out = load_transformer(self.folder, dtype=torch.float32)(**inputs, return_dict=False)[0]
        err = float((out - reference).norm() / reference.norm())
        step.data["rel_error"] = err
        step.data["bound"] = E2E_BOUND
        if self.source is not None:
            full = self.source_output(inputs)
            step.data["rel_error_vs_unquantized_source"] = float((out - full).norm() / full.norm())
        _gate(err, E2E_BOUND, "reference runtime forward differs from diffusers with the decoded weights")
        step.detail = (f"reference runtime vs diffusers (fp32, {inputs['hidden_states'].shape[1]} image + "
                       f"{self.text_tokens} text tokens): rel error {err:.1e} (bound {E2E_BOUND})")
        if "rel_error_vs_unquantized_source" in step.data:
            step.detail += f"; vs the unquantized source {step.data['rel_error_vs_unquantized_source']:.3f} (reported)"

    def mlx_end_to_end(self, step: Step, inputs: dict, reference: torch.Tensor) -> None:
        from .runtime.mlx_flux2 import pack_relative_error

        err = pack_relative_error(self.folder, {k: v.numpy() for k, v in inputs.items()}, reference)
        step.data.update(rel_error=err, bound=MLX_E2E_BOUND)
        _gate(err, MLX_E2E_BOUND, "MLX transformer forward differs from the torch reference")
        step.detail = f"MLX forward from the pack vs torch fp32 reference: rel error {err:.1e} (bound {MLX_E2E_BOUND})"

    def consumer(self, name: str, step: Step, cache: dict) -> None:
        from . import consumers

        spec = consumers.CONSUMERS[name]
        if consumers.installed(name) is None:
            step.status = "skip"
            step.detail = (f"{spec.distribution} is not installed (tested with {spec.tested}: pip install --no-deps "
                           f"{spec.distribution}=={spec.tested})")
            return
        files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        problem = consumers.layout_problems(self.qconfig, files)[name]
        if problem is not None:
            step.status, step.detail = "skip", f"{name} cannot load this pack: {problem}"
            return
        if name != "mlx-vlm-bonsai":
            cache.setdefault("inputs", self.inputs())
            cache.setdefault("reference", self.reference_output(cache["inputs"]))
            inputs = {k: v.numpy() for k, v in cache["inputs"].items()}
            step.detail, step.data = consumers.check_forward(name, self.folder, self.config, inputs,
                                                             cache["reference"].numpy())
            return
        import mlx.core as mx

        arrays, stored, g = {}, TARGETS[self.qconfig.format].stored_name, self.qconfig.group_size
        for file in files:
            arrays.update(mx.load(str(self.folder / file)))
        reader = PackReader(self.folder)

        def weight(module: str) -> np.ndarray:
            if module in self.qconfig.quantized:
                return dequantize(*self.decode(module), g).numpy()
            return reader.get(f"{module}.weight").float().numpy()

        step.detail, step.data = consumers.check_bonsai(self.folder, self.config, self.qconfig, weight,
                                                        lambda n: arrays.pop(stored(n)), self.seed,
                                                        frozenset(self.mlx_dequantize_exact))

    def run(self) -> list[Step]:
        return run_packs([self])[0]


# Kept linears read per call in the float32 reference forwards, as the quantized ones are: each is used once a
# forward, and klein's (modulations, context embedder, output norm) are ~0.7 GB in float32. diffusers calls
# them as plain bias-free nn.Linear: nothing reads their .weight.
_LAZY_KEPT = ("context_embedder", "norm_out.linear", "double_stream_modulation_img.linear",
              "double_stream_modulation_txt.linear", "single_stream_modulation.linear")


def _lazy_kept(names, taken) -> set[str]:
    """The modules of _LAZY_KEPT whose weight is among kept tensors `names` (and no bias), not in `taken`."""
    names = set(names)
    return {m for m in _LAZY_KEPT if f"{m}.weight" in names and f"{m}.bias" not in names and m not in taken}

class _Scratch:
    """One float32 block reused for every dense weight of one reference forward: a fresh ~340 MB tensor per
    layer costs more in page faults than decoding into it (measured 10x on klein's widest layer). It lives as
    long as the forward, so the runtime forward that follows does not hold it too."""

    def __init__(self):
        self._block = torch.empty(0)

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if self._block.numel() < n:
            self._block = torch.empty(0)  # drop the old block before the larger one is allocated
            self._block = torch.empty(n)
        return self._block[:n].view(shape)


def _inputs_digest(inputs: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(inputs):
        t = inputs[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class SharedWork:
    """What one verify call works out once for all the packs it checks: the opened and validated source,
    calibration statistics, and forward outputs (by what they are of and the digest of their inputs)."""

    def __init__(self, source: Path | None):
        self.source = source
        self._checkpoint = None
        self.stats: dict = {}
        self._outputs: dict = {}
        self._lock = threading.Lock()
        self._computing: dict = {}  # key -> the lock held while one lane computes it

    def checkpoint(self):
        """(the source, its validated tensor specs), opened once."""
        if self._checkpoint is None:
            ckpt = open_checkpoint(self.source)
            self._checkpoint = ckpt, ckpt.validate()
        return self._checkpoint

    def output(self, what: tuple, inputs: dict, compute) -> torch.Tensor:
        key = (*what, _inputs_digest(inputs))
        with self._lock:
            computing = self._computing.setdefault(key, threading.Lock())
        with computing:  # the other lane waits for it rather than computing it again
            if key not in self._outputs:
                self._outputs[key] = compute()
        return self._outputs[key]


@contextlib.contextmanager
def _step_of(step: Step):
    """Time what runs inside into `step.seconds` (added up: step 2 visits each pack once per tensor) and turn a
    check's failure into the step's status."""
    start = time.perf_counter()
    try:
        yield
    except (_Fail, BonsaiError) as e:
        step.status, step.detail = "fail", str(e)
    finally:
        step.seconds += time.perf_counter() - start


def _same_structure(a: PackVerifier, b: PackVerifier) -> bool:
    qa, qb = a.qconfig, b.qconfig
    return (model_kwargs(a.config) == model_kwargs(b.config) and qa.group_size == qb.group_size
            and dict(qa.kept) == dict(qb.kept)
            and {m: (i.shape, i.bits) for m, i in qa.quantized.items()}
            == {m: (i.shape, i.bits) for m, i in qb.quantized.items()})


def check_exactness(pairs: list[tuple[PackVerifier, Step]]) -> None:
    """Step 2 for the packs of one verify call, tensor by tensor: each layer of each pack decoded once, each
    source tensor read once and re-quantized once per distinct (mode, group size, scale dtype, solver,
    statistics), however many packs hold it. A pack that fails is marked and left out of what follows; the
    others go on. Along the way each pack's `twin` is set to an earlier pack whose decoded weights, kept tensors
    and config are identical, so that their reference forward is run once."""
    live = []
    for v, step in pairs:
        with _step_of(step):
            v._prepare_exactness(step)
            live.append((v, step))
    roots: list[PackVerifier] = []
    for v, _ in live:
        v.twin = next((r for r in roots if _same_structure(r, v)), v)
        if v.twin is v:
            roots.append(v)
    steps = dict((id(v), step) for v, step in live)

    def alive(v: PackVerifier) -> bool:
        return steps[id(v)].status != "fail"

    with_source = live and live[0][0].source is not None
    if with_source:
        ckpt, specs = live[0][0].shared.checkpoint()
        names = list(specs)
    else:
        names = list(dict.fromkeys(m for v, _ in live for m in v.qconfig.quantized))
    def source_work(name: str):
        """The source tensor and its re-quantizations, one per distinct key among the packs that quantize it;
        a failure is kept in place of its result, for the packs that need it to fail with."""
        try:
            weight = ckpt.load(name)
        except BonsaiError as e:
            return e, {}
        requants: dict = {}
        for v, _ in live:
            d = v._decisions[name]
            if d.action == "keep" or d.module not in v.qconfig.quantized:
                continue
            key = v._requant_key(d)
            if key not in requants:
                try:
                    requants[key] = v._requantize(d, weight)
                except (_Fail, BonsaiError) as e:
                    requants[key] = e
        return weight, requants

    from concurrent.futures import ThreadPoolExecutor

    # The next tensor is read and re-quantized on a second thread while the packs' layers of this one are
    # decoded and compared (the two halves take about as long on klein).
    with ThreadPoolExecutor(1, thread_name_prefix="verify-source") as pool:
        ahead = pool.submit(source_work, names[0]) if with_source and names else None
        for i, name in enumerate(names):
            weight, requants, decoded = None, {}, {}
            if ahead is not None:
                waited = time.perf_counter()
                weight, requants = ahead.result()
                waited = time.perf_counter() - waited
                for _, step in live:  # each pack's step waited for it
                    step.seconds += waited
                ahead = pool.submit(source_work, names[i + 1]) if i + 1 < len(names) else None
            with shared_slots():  # packs sharing a re-quantization derive its stored bytes once
                for v, step in live:
                    if not alive(v):
                        continue
                    with _step_of(step):
                        if not with_source:
                            if name in v.qconfig.quantized:
                                decoded[id(v)] = v._check_layer(name)
                            continue
                        if isinstance(weight, Exception):
                            raise weight
                        d = v._decisions[name]
                        if d.action == "keep":
                            v._check_kept_source(d, weight)
                            continue
                        if d.module not in v.qconfig.quantized:
                            _fail(f"{d.name}: the recorded recipe quantizes it, but the pack keeps it")
                        requant = requants[v._requant_key(d)]
                        if isinstance(requant, Exception):
                            raise requant
                        decoded[id(v)] = (requant, v._check_layer(d.module, requant))
            for v, _ in live:  # a pack whose twin differs here, or failed, has its own reference forward
                twin = v.twin
                if twin is v or not alive(v):
                    continue
                if not alive(twin) or id(v) in decoded and not _decoded_equal(decoded[id(v)], decoded[id(twin)]):
                    v.twin = v
    for v, step in live:
        if not alive(v):
            v.twin = v
            continue
        if not with_source and v.twin is not v and not _kept_equal(v, v.twin):
            v.twin = v
        v._finish_exactness(step)


def _decoded_equal(a, b) -> bool:
    """Whether two packs decoded one layer to the same codes and scales; with a source, both already equal
    their re-quantization, so one shared re-quantization settles it."""
    if isinstance(a[0], QuantizedTensor):
        return a[0] is b[0]
    return torch.equal(a[0], b[0]) and a[1].dtype == b[1].dtype and torch.equal(_bits(a[1]), _bits(b[1]))


def _kept_equal(a: PackVerifier, b: PackVerifier) -> bool:
    return all(torch.equal(_bits(a.reader.get(n)), _bits(b.reader.get(n))) for n in a.qconfig.kept)


def run_packs(verifiers: list[PackVerifier]) -> list[list[Step]]:
    """Every step on every pack: integrity of each, exactness of all together (`check_exactness`), then the
    rest in two lanes side by side, torch's forwards and MLX's steps, each in its packs' order. A pack that
    fails integrity or exactness stops there: later steps would only report the same damage less precisely."""
    from .consumers import CONSUMERS

    results: list[list[Step]] = [[] for _ in verifiers]

    def finish(step: Step) -> Step:
        step.data = {k: figure(v, 3) if isinstance(v, float) else v for k, v in step.data.items()}
        step.seconds = round(step.seconds, 2)
        return step

    for v, steps in zip(verifiers, results):
        step = Step("integrity")
        with _step_of(step):
            v.integrity(step)
        steps.append(finish(step))
    # Steps 1 and 2 are exact (bit comparisons, and a quantizer whose result does not depend on the thread
    # count), so they run on every thread even for a release folder.
    exact = [(i, Step("exactness")) for i, steps in enumerate(results) if steps[-1].status != "fail"]
    check_exactness([(verifiers[i], step) for i, step in exact])
    for i, step in exact:
        results[i].append(finish(step))
    lanes: dict[str, list] = {"torch": [], "mlx": []}
    for v, steps in zip(verifiers, results):
        if steps[-1].status == "fail":
            continue
        cache: dict = {}

        def prepared(v=v, cache=cache) -> tuple[dict, torch.Tensor]:
            cache.setdefault("inputs", v.inputs())
            if "reference" not in cache:
                cache["reference"] = v.reference_output(cache["inputs"])
            return cache["inputs"], cache["reference"]

        # Every closure binds its own pack's objects: they run after this loop has moved on.
        def e2e(step, v=v, prepared=prepared):
            v.end_to_end(step, *prepared())

        def mlx_e2e(step, v=v, prepared=prepared):
            if v.qconfig.format != "mlx":
                step.status, step.detail = "skip", "not an MLX pack"
                return
            v.mlx_end_to_end(step, *prepared())

        mlx_runtime = v.qconfig.format in ("mlx", "mflux")
        # A collection costs ~0.3 s with torch, diffusers and MLX loaded: worth it only where a model is large.
        large = sum(f.stat().st_size for f in v.folder.glob("*.safetensors")) >= COLLECT_PACK_BYTES
        for name, fn, lane, needs_reference in (
                ("runtime", v.real_runtime, "mlx" if mlx_runtime else "torch", False),
                ("cuda-runtime", v.cuda_runtime, "torch", False), ("end-to-end", e2e, "torch", True),
                ("mlx-end-to-end", mlx_e2e, "mlx", True),
                *((name, lambda step, n=name, v=v, cache=cache: v.consumer(n, step, cache), "mlx",
                   name != "mlx-vlm-bonsai") for name in CONSUMERS)):
            step = Step(name)
            steps.append(step)  # each pack's steps keep their order, whichever lane runs them
            lanes[lane].append((needs_reference, step, fn, lane == "mlx" and large))

    def run_lane(tasks: list) -> None:
        # The forwards against the reference last: the torch lane computes it meanwhile.
        for _, step, fn, collect in sorted(tasks, key=lambda t: t[0]):
            with _step_of(step):
                fn(step)
            finish(step)
            if collect:  # the consumers' MLX models hold reference cycles: a full-size one is GBs
                gc.collect()

    busy = [tasks for tasks in lanes.values() if tasks]
    # Two lanes, torch's and MLX's, one thread each, side by side: MLX's CPU work runs on one core, so the
    # torch forwards take the other. One torch thread also makes the forwards' summation order, and so the
    # reported errors, the same in every run and on every machine (a release folder must not depend on them).
    one_thread = len(busy) > 1 or any(v.reproducible for v in verifiers)
    from .mlx_cpu import blas_threads

    with (fixed_threads(1) if one_thread else contextlib.nullcontext(),
          blas_threads(1) if len(busy) > 1 else contextlib.nullcontext()):
        if len(busy) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(busy), thread_name_prefix="verify-lane") as pool:
                for future in [pool.submit(run_lane, tasks) for tasks in busy]:
                    future.result()
        else:
            for tasks in busy:
                run_lane(tasks)
    return results


def verify_folders(folders: list[Path], source: Path | None, image_tokens: int, text_tokens: int, seed: int,
                   calib: Path | None = None, reproducible: bool = False) -> list[list[Step]]:
    """`run_packs` on the packs in `folders`, sharing one source and its forwards."""
    shared = SharedWork(source)
    return run_packs([PackVerifier(f, source, image_tokens, text_tokens, seed, calib, reproducible, shared)
                      for f in folders])

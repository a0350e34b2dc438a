"""Black Forest Labs' single-file FLUX.2 checkpoints (`flux-2-klein-4b.safetensors`), read as diffusers tensors.

The file ComfyUI and stable-diffusion.cpp users hold names tensors the BFL way (`double_blocks.0.img_attn.qkv`)
and fuses q, k and v into one projection. The names and splits come from diffusers' own single-file conversion
for FLUX.2, never from a mapping of ours: that function is run once on *row probes*, small int64 tensors that hold
(source tensor, row) for every row of every tensor. Renames, `torch.chunk` of a fused projection and the
shift/scale swap of the final AdaLN all act on rows, so what comes out says, for each diffusers tensor, which
rows of which file tensor it is made of. Each diffusers tensor is then read as just those rows (a contiguous
byte range per run of rows) with safetensors' pread backend: memory follows the tensor in hand, not the file.

The file carries no config.json. The architecture is read off the tensor shapes (block counts, widths, heads
from the per-head norm size, MLP ratio, guidance embedder or not); what shapes cannot tell (RoPE axes, theta,
eps) is the value every FLUX.2 transformer uses at its head size: diffusers' defaults at 128, four equal axes
otherwise. The config is written as diffusers' own serialization of it, so a pack made from the file is
byte-identical to one made from the diffusers folder `save_pretrained` would write for the same weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, TensorInfo, read_header
from ..errors import CheckpointError
from ..flux2 import CLASS_NAME, model_kwargs

# ComfyUI saves the transformer under this prefix; diffusers' converter expects bare BFL names.
COMFY_PREFIX = "model.diffusion_model."
# The tensor diffusers itself uses to recognise a FLUX.2 single file (CHECKPOINT_KEY_NAMES["flux2"]).
MARKER = "single_stream_modulation.lin.weight"
# Rows per BFL tensor when tracing the inverse mapping: divisible by the 2- and 3-way splits diffusers makes.
UNIT = 6


def is_bfl_file(path: Path) -> bool:
    return Path(path).suffix == ".safetensors" and Path(path).is_file()


def open_checkpoint(path) -> Checkpoint:
    """A source model: a diffusers folder (or pipeline folder) or a BFL single `.safetensors` file."""
    return BflCheckpoint(path) if is_bfl_file(Path(path)) else Checkpoint(path)


@dataclass(frozen=True)
class Rows:
    """One diffusers tensor as runs of rows of one file tensor: ((start, stop), ...) in order."""
    source: str
    runs: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> int:
        return sum(b - a for a, b in self.runs)


def diffusers_converter():
    """diffusers' single-file key conversion for Flux2Transformer2DModel, from its own registry."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return SINGLE_FILE_LOADABLE_CLASSES[CLASS_NAME]["checkpoint_mapping_fn"]


def trace_mapping(shapes: dict[str, tuple[int, ...]], where: str = "checkpoint") -> dict[str, Rows]:
    """diffusers name -> the rows of a file tensor it is made of, by running diffusers' converter on probes."""
    names = sorted(shapes)
    probes = {}
    for i, name in enumerate(names):
        rows = shapes[name][0] if shapes[name] else 1
        probes[name] = torch.stack([torch.full((rows,), i, dtype=torch.int64), torch.arange(rows)], 1)
    try:
        converted = diffusers_converter()(probes)
    except Exception as e:  # diffusers' converter raises KeyError and friends on names it does not know
        raise CheckpointError(f"{where}: diffusers' FLUX.2 single-file conversion refuses it ({type(e).__name__}: "
                              f"{e}); valid: a BFL FLUX.2 transformer file") from None
    mapping = {}
    for new, probe in converted.items():
        if not (isinstance(probe, torch.Tensor) and probe.dim() == 2 and probe.shape[1] == 2
                and probe.dtype == torch.int64 and probe.shape[0] > 0 and bool((probe[:, 0] == probe[0, 0]).all())):
            raise CheckpointError(f"{where}: diffusers' conversion builds {new!r} from more than row selections of "
                                  "one tensor; this reader streams only row splits")
        rows = probe[:, 1].tolist()
        runs, start = [], 0
        for k in range(1, len(rows) + 1):
            if k == len(rows) or rows[k] != rows[k - 1] + 1:
                runs.append((rows[start], rows[k - 1] + 1))
                start = k
        mapping[new] = Rows(names[int(probe[0, 0])], tuple(runs))
    return mapping


def _count(names, pattern: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    if found != set(range(len(found))):
        raise CheckpointError(f"blocks {sorted(found)} matching {pattern!r} are not numbered 0..{len(found) - 1}")
    return len(found)


def infer_config(shapes: dict[str, tuple[int, ...]], where: str) -> dict:
    """Flux2Transformer2DModel arguments from the tensor shapes of a BFL file (names already bare)."""
    def shape(name):
        if name not in shapes:
            raise CheckpointError(f"{where}: no tensor {name!r}; valid: a BFL FLUX.2 transformer file")
        return shapes[name]

    hidden, in_channels = shape("img_in.weight")
    doubles = _count(shapes, r"double_blocks\.(\d+)\.")
    singles = _count(shapes, r"single_blocks\.(\d+)\.")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if doubles else "single_blocks.0.norm.query_norm.scale"
    (head_dim,) = shape(norm)
    if hidden % head_dim:
        raise CheckpointError(f"{where}: hidden size {hidden} is not a whole number of {head_dim}-wide heads")
    if doubles:
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0] // 2
    else:
        mlp_hidden = (shape("single_blocks.0.linear1.weight")[0] - 3 * hidden) // 2
    out_channels = shape("final_layer.linear.weight")[0]
    axes = [32, 32, 32, 32] if head_dim == 128 else [head_dim // 4] * 4
    if sum(axes) != head_dim:
        raise CheckpointError(f"{where}: head size {head_dim} splits into no four equal RoPE axes; give the "
                              "transformer as a diffusers folder with its config.json")
    return dict(patch_size=1, in_channels=in_channels,
                out_channels=None if out_channels == in_channels else out_channels,
                num_layers=doubles, num_single_layers=singles, attention_head_dim=head_dim,
                num_attention_heads=hidden // head_dim, joint_attention_dim=shape("txt_in.weight")[1],
                timestep_guidance_channels=shape("time_in.in_layer.weight")[1], mlp_ratio=mlp_hidden / hidden,
                axes_dims_rope=axes, rope_theta=2000, eps=1e-6, guidance_embeds="guidance_in.in_layer.weight" in shapes)


def diffusers_config(kwargs: dict) -> dict:
    """The config.json diffusers' `save_pretrained` writes for a Flux2Transformer2DModel with these arguments."""
    from diffusers import Flux2Transformer2DModel

    try:
        with torch.device("meta"):
            model = Flux2Transformer2DModel(**kwargs)
    except Exception as e:  # diffusers raises assorted types for a bad config
        raise CheckpointError(f"diffusers cannot build {CLASS_NAME} from {kwargs}: {e}") from None
    return json.loads(model.to_json_string())


def config_text(config: dict) -> str:
    """config.json as diffusers serializes it (sorted keys, two-space indent, final newline)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


class BflCheckpoint(Checkpoint):
    """A BFL single-file FLUX.2 transformer presented under diffusers' names, tensors split lazily on read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        where = str(self.path)
        header = read_header(self.path)
        names = list(header)
        prefixed = [n for n in names if n.startswith(COMFY_PREFIX)]
        self._strip = COMFY_PREFIX if prefixed and len(prefixed) == len(names) else ""
        bare = {n[len(self._strip):]: info for n, info in header.items()}
        if MARKER not in bare:
            raise CheckpointError(f"{where}: not a BFL FLUX.2 transformer file (no {MARKER!r}, the tensor diffusers "
                                  f"recognises FLUX.2 by); valid: a diffusers folder or a FLUX.2 single file")
        self.file_tensors = bare
        shapes = {n: i.shape for n, i in bare.items()}
        self.config = diffusers_config(infer_config(shapes, where))
        self.mapping = trace_mapping(shapes, where)
        self.tensors = {}
        for name, rows in self.mapping.items():
            src = bare[rows.source]
            shape = (rows.rows, *src.shape[1:]) if src.shape else ()
            self.tensors[name] = TensorInfo(name, src.dtype, shape, self.path)
        self._handles = {}

    @property
    def config_source(self) -> str:
        return f"{self.path} (config read off its tensor shapes)"

    @cached_property
    def config_bytes(self) -> bytes:
        return config_text(self.config).encode()

    def describe_source(self, name: str) -> str:
        rows = self.mapping[name]
        runs = ", ".join(f"{a}:{b}" for a, b in rows.runs)
        return f"{self._strip}{rows.source}[{runs}]"

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        rows = self.mapping[name]
        key = self._strip + rows.source
        handle = self._handles.get(self.path)
        if handle is None:
            handle = self._handles[self.path] = safe_open(str(self.path), "pt", backend="pread")
        try:
            if not self.file_tensors[rows.source].shape:
                return handle.get_tensor(key)
            view = handle.get_slice(key)
            parts = [view[a:b] for a, b in rows.runs]
        except Exception as e:  # safetensors' own error types are not stable across versions
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {e}") from None
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------------------------------- writing

def bfl_names(kwargs: dict) -> list[str]:
    """The tensor names of a BFL FLUX.2 file for these model arguments (no shapes: those come from inverting
    diffusers' conversion). Used to write test and benchmark files; `write_bfl_file` checks that diffusers'
    conversion of exactly these names gives exactly the diffusers inventory."""
    from ..flux2 import block_counts

    doubles, singles = block_counts(kwargs)
    names = ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "time_in.out_layer.weight",
             "double_stream_modulation_img.lin.weight", "double_stream_modulation_txt.lin.weight",
             "single_stream_modulation.lin.weight", "final_layer.adaLN_modulation.1.weight",
             "final_layer.linear.weight"]
    if kwargs.get("guidance_embeds", True):
        names += ["guidance_in.in_layer.weight", "guidance_in.out_layer.weight"]
    for i in range(doubles):
        for stream in ("img", "txt"):
            names += [f"double_blocks.{i}.{stream}_attn.qkv.weight", f"double_blocks.{i}.{stream}_attn.proj.weight",
                      f"double_blocks.{i}.{stream}_attn.norm.query_norm.scale",
                      f"double_blocks.{i}.{stream}_attn.norm.key_norm.scale",
                      f"double_blocks.{i}.{stream}_mlp.0.weight", f"double_blocks.{i}.{stream}_mlp.2.weight"]
    for i in range(singles):
        names += [f"single_blocks.{i}.linear1.weight", f"single_blocks.{i}.linear2.weight",
                  f"single_blocks.{i}.norm.query_norm.scale", f"single_blocks.{i}.norm.key_norm.scale"]
    return names


def inverse_layout(source: Checkpoint, prefix: str = "") -> tuple[dict[str, tuple[int, ...]], dict[str, list]]:
    """BFL name -> shape, and BFL name -> [(BFL row start, stop, diffusers name, its row start)], for `source`.

    diffusers' converter is traced on probes of `UNIT` rows per BFL tensor: it only selects, splits and reorders
    rows, so each diffusers tensor gets a fixed share of its BFL tensor's rows, and its real row count fixes the
    scale. The trace must account for every diffusers tensor of `source` exactly once."""
    names = bfl_names(model_kwargs(source.config))
    traced = trace_mapping({n: (UNIT,) for n in names}, "BFL layout")
    missing = sorted(set(source.tensors) - set(traced))
    extra = sorted(set(traced) - set(source.tensors))
    if missing or extra:
        raise CheckpointError(f"diffusers' conversion of the BFL names gives {extra[:3]} too many and lacks "
                              f"{missing[:3]} of {source.path}")
    shapes, parts, scale = {}, {}, {}
    for new, rows in traced.items():
        info = source.tensors[new]
        real = info.shape[0] if info.shape else 1
        total = real * UNIT // rows.rows  # rows of the BFL tensor
        if real * UNIT % rows.rows or any(a * total % UNIT for run in rows.runs for a in run):
            raise CheckpointError(f"internal: {new!r} ({real} rows) is no whole share of BFL {rows.source!r}")
        if scale.setdefault(rows.source, total) != total:
            raise CheckpointError(f"internal: the diffusers tensors of BFL {rows.source!r} disagree on its size")
        shapes[prefix + rows.source] = (total, *info.shape[1:]) if info.shape else ()
        offset = 0
        for a, b in rows.runs:
            a, b = a * total // UNIT, b * total // UNIT
            parts.setdefault(prefix + rows.source, []).append((a, b, new, offset))
            offset += b - a
    return shapes, parts


def write_bfl_file(source: Checkpoint, out: Path, prefix: str = "", force: bool = False) -> Path:
    """Write `source` (a diffusers checkpoint) as a BFL single file: diffusers' mapping inverted, one file tensor
    assembled at a time, so memory follows the largest fused tensor. For tests and benchmarks; `prefix` gives
    ComfyUI's `model.diffusion_model.` naming."""
    import os
    import shutil
    import tempfile

    from ..checkpoint import Entry, ShardedWriter

    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; pass force to replace it")
    source.validate()
    shapes, parts = inverse_layout(source, prefix)
    dtypes = {n: source.tensors[p[0][2]].dtype for n, p in parts.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        writer = ShardedWriter(tmp, [Entry(n, dtypes[n], shapes[n]) for n in shapes], out.stem, 2**62)
        try:
            for name, shape in shapes.items():
                if not shape:
                    writer.write(name, source.load(parts[name][0][2]))
                    continue
                tensor = torch.empty(shape, dtype=dtypes[name])
                for a, b, new, at in parts[name]:
                    tensor[a:b] = source.load(new)[at:at + b - a]
                writer.write(name, tensor)
                del tensor
            writer.close()
        except BaseException:
            writer.abort()
            raise
        os.replace(tmp / f"{out.stem}.safetensors", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

"""The Mac applications that run FLUX.2, loading our packs with their own, unmodified loading code.

Three consumers, each expecting a folder of a given name inside a model folder:

- `mlx-vlm-flux2`: mlx-vlm's generic FLUX.2 loader (`mlx_vlm.models.flux2.weights.load_transformer`), reading
  `<root>/transformer/*.safetensors`: MLX affine tensors under diffusers or mflux names, one bits / group size
  for every quantized layer, no safetensors metadata `mode` other than "affine". Loads and runs on CPU.
- `mlx-vlm-bonsai`: mlx-vlm's loader of the published Bonsai Image snapshots (`mlx_vlm.models.bonsai`), reading
  `<root>/transformer-packed-mflux/` with bits and group_size from quantization_config.json; kernels at bits 1
  or 2 and group 128 only; scales and every 16-bit tensor cast to bf16; the klein keep set (embedders,
  modulation, norms, output) read as dense weights. Its fused forward uses Metal kernels, so off a Mac only the
  loader and its per-layer kernels run: the weights it holds are compared with our decode, exactly.
- `mflux`: mflux's loader (`WeightLoader` + `WeightApplier`), reading `<root>/transformer/` in its saved format
  (`packing/mflux.py`). Loads and runs on CPU.

`layout_problems` says, from a pack's description alone, which consumers a pack suits (inspect); `check` loads
it with the consumer and compares (verify). Forwards run with the consumer's compute dtype set to float32, so
they are compared with our float32 reference at the same bound as our own runtimes. On a Linux CPU the
consumers' own quantized layers compute as MLX's dequantize of the tensors they hold and a dense matmul, the
same product (`mlx_cpu`: MLX's quantized_matmul is a slow loop there); MLX is first imported after
`mlx_cpu.enable()`, so its matmuls run on numpy's OpenBLAS.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import mlx_cpu
from .errors import BonsaiError
from .packing.config import PackConfig
from .packing.targets import TARGETS

# Measured 2.5e-6 to 2.8e-6 for both consumers' fp32 forwards on the tiny model (kernels and order differ
# from torch); the margin is the same as verify's MLX_E2E_BOUND.
FORWARD_BOUND = 1e-4


class ConsumerError(BonsaiError):
    pass


@dataclass(frozen=True)
class Consumer:
    name: str
    distribution: str   # the PyPI name
    module: str         # the import name
    tested: str         # the version the tests pin
    folder: str         # the folder of a model folder it reads the transformer from
    reads: str


CONSUMERS = {c.name: c for c in (
    Consumer("mlx-vlm-flux2", "mlx-vlm", "mlx_vlm", "0.7.10", "transformer",
             "mlx_vlm.models.flux2.weights.load_transformer"),
    Consumer("mlx-vlm-bonsai", "mlx-vlm", "mlx_vlm", "0.7.10", "transformer-packed-mflux",
             "mlx_vlm.models.bonsai (load_klein_fast_packed_weights_from_disk, Flux2KleinFastTransformer)"),
    Consumer("mflux", "mflux", "mflux", "0.24.0", "transformer", "mflux WeightLoader + WeightApplier"),
)}

# What the Bonsai loader reads as dense weights (cast to bf16), never as packed triples.
_BONSAI_DENSE = ("x_embedder", "context_embedder", "norm_out.linear", "proj_out", "time_guidance_embed.",
                 "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                 "single_stream_modulation.linear")
BONSAI_WEIGHTS = TARGETS["mlx"].weights_name  # one file, this name
BONSAI_GROUP_SIZE = 128


def installed(name: str) -> str | None:
    """The installed version of the consumer's package, or None."""
    consumer = CONSUMERS[name]
    if importlib.util.find_spec(consumer.module) is None:
        return None
    try:
        return importlib.metadata.version(consumer.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def layout_problems(qconfig: PackConfig, files: list[str]) -> dict[str, str | None]:
    """consumer -> None when the pack suits it, else why not. `files`: the pack folder's safetensors names."""
    fmt, quantized, group_size = qconfig.format, qconfig.quantized, qconfig.group_size
    kinds = {(q.bits, group_size) for q in quantized.values()}
    scale_dtype = qconfig.get("scale_dtype")
    problems: dict[str, str | None] = {}

    flux2 = None
    if fmt not in ("mlx", "mflux"):
        flux2 = f"it reads MLX affine tensors (an mlx or mflux pack), this is a {fmt} pack"
    elif len(kinds) > 1:
        flux2 = "it reads one bits / group size for all layers; this pack mixes binary and ternary"
    problems["mlx-vlm-flux2"] = flux2

    bonsai = None
    dense = sorted(m for m in quantized if any(m == d or m.startswith(d) for d in _BONSAI_DENSE))
    if fmt != "mlx":
        bonsai = f"it reads an MLX pack, this is a {fmt} pack"
    elif files != [BONSAI_WEIGHTS]:
        bonsai = f"it reads exactly one {BONSAI_WEIGHTS}, this pack holds {', '.join(files)}"
    elif group_size != BONSAI_GROUP_SIZE:
        bonsai = f"its kernels take group_size {BONSAI_GROUP_SIZE} only, this pack has {group_size}"
    elif len(kinds) > 1:
        bonsai = "it applies quantization_config's one `bits` to every layer; this pack mixes binary and ternary"
    elif scale_dtype != "bfloat16":
        bonsai = (f"it casts scales to bf16, so {scale_dtype} scales would arrive changed; valid: "
                  "scale_dtype: bfloat16")
    elif dense:
        bonsai = f"it reads {dense[0]} as a 16-bit weight, this pack quantizes it; valid: keep it (the published set)"
    problems["mlx-vlm-bonsai"] = bonsai

    problems["mflux"] = None if fmt == "mflux" else ("it reads only its saved format (bonsai-quant's mflux target), "
                                                     f"this is a {fmt} pack")
    return problems


def _overrides(config: dict) -> dict:
    """The consumers' transformer constructor arguments from a diffusers config.json (their defaults are klein
    4B's; every argument is given so that any FLUX.2 size loads)."""
    keys = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "timestep_guidance_channels", "mlp_ratio", "rope_theta",
            "guidance_embeds")
    out = {k: config[k] for k in keys if k in config}
    if "axes_dims_rope" in config:
        out["axes_dims_rope"] = tuple(config["axes_dims_rope"])
    if config.get("out_channels") is not None:
        out["out_channels"] = config["out_channels"]
    return out


@contextlib.contextmanager
def _model_root(folder: Path, name: str):
    """A temporary model folder whose `name/` is the pack folder (a symlink), as the consumers look for it."""
    with tempfile.TemporaryDirectory(prefix="bonsai-consumer-") as root:
        os.symlink(Path(folder).resolve(), Path(root) / name, target_is_directory=True)
        yield Path(root)


@contextlib.contextmanager
def _precision(config_class, dtype):
    """The consumer's compute dtype (a class attribute it reads at call time), set for the duration."""
    old = config_class.precision
    config_class.precision = dtype
    try:
        yield
    finally:
        config_class.precision = old


def _relative_error(out, reference: np.ndarray) -> float:
    import mlx.core as mx

    a = np.asarray(np.array(out.astype(mx.float32)), dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ConsumerError(f"output shape {list(a.shape)}, the reference has {list(b.shape)}")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _forward(model, inputs: dict[str, np.ndarray]):
    import mlx.core as mx

    args = [mx.array(inputs[k]) for k in ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")]
    out = model(*args)
    mx.eval(out)
    return out


def _gate(name: str, err: float) -> None:
    if not np.isfinite(err):
        raise ConsumerError(f"{name} forward: error is {err} (the output holds NaN or Inf)")
    if err > FORWARD_BOUND:
        raise ConsumerError(f"{name} forward differs from the float32 reference by {err:.2e} (bound {FORWARD_BOUND})")


def _run(name: str, what: str, fn):
    """Run the consumer's code; anything it raises becomes a ConsumerError naming the consumer and its version."""
    try:
        return fn()
    except ConsumerError:
        raise
    except Exception as e:  # noqa: BLE001 -- the consumers raise ValueError, KeyError, RuntimeError ...
        raise ConsumerError(f"{name} {installed(name)}: {what} failed: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------ the checks

def load_mlx_vlm_flux2(folder: Path, config: dict, precision=None):
    """mlx-vlm's FLUX.2 transformer loaded from the pack folder (as `<root>/transformer/`)."""
    mlx_cpu.enable()  # before mlx.core is first imported
    import dataclasses

    import mlx.core as mx
    from mlx_vlm.models.flux2 import constants, weights
    from mlx_vlm.models.flux2.config import VARIANTS

    variant = dataclasses.replace(VARIANTS["flux2-klein-4b"], transformer_overrides=_overrides(config))
    with _model_root(folder, "transformer") as root, _precision(constants.ModelConfig, precision or mx.float32):
        return weights.load_transformer(root, variant)


def load_mflux(folder: Path, config: dict):
    """mflux's FLUX.2 transformer loaded from the pack folder (as `<root>/transformer/` of a model folder)."""
    mlx_cpu.enable()  # before mlx.core is first imported
    from mflux.models.common.weights.loading.weight_applier import WeightApplier
    from mflux.models.common.weights.loading.weight_loader import WeightLoader
    from mflux.models.flux2.model.flux2_transformer.transformer import Flux2Transformer
    from mflux.models.flux2.weights.flux2_weight_definition import (
        Flux2KleinWeightDefinition,
    )

    component = next(c for c in Flux2KleinWeightDefinition.get_components() if c.name == "transformer")
    with _model_root(folder, "transformer") as root:
        loaded = WeightLoader.load_single_local(component, root)
    if loaded.meta_data.quantization_level is None:
        raise ConsumerError(f"{folder}: mflux did not take it as its saved format (no quantization_level read)")
    model = Flux2Transformer(**_overrides(config))
    # mflux prints a warning per 1-bit layer (it cannot infer 1 bit from the shapes and falls back to the
    # stored level at group 64, which is what a binary mflux pack holds): not news here.
    with contextlib.redirect_stdout(io.StringIO()):
        WeightApplier.apply_and_quantize_single(loaded, model, component, quantize_arg=None)
    return model


def _mflux_forward(model, inputs):
    import mlx.core as mx
    from mflux.models.common.config.model_config import ModelConfig

    with _precision(ModelConfig, mx.float32):
        return _forward(model, inputs)


def check_forward(name: str, folder: Path, config: dict, inputs: dict[str, np.ndarray],
                  reference: np.ndarray) -> tuple[str, dict]:
    """Load with the consumer, run its forward in float32, compare with the reference output."""
    mlx_cpu.enable()  # before mlx.core is first imported
    if name == "mlx-vlm-flux2":
        import mlx.core as mx
        from mlx_vlm.models.flux2 import constants

        model = _run(name, "load_transformer", lambda: load_mlx_vlm_flux2(folder, config))
        with _precision(constants.ModelConfig, mx.float32), mlx_cpu.dense_quantized_linears():
            out = _run(name, "forward", lambda: _forward(model, inputs))
    elif name == "mflux":
        model = _run(name, "loading", lambda: load_mflux(folder, config))
        with mlx_cpu.dense_quantized_linears():
            out = _run(name, "forward", lambda: _mflux_forward(model, inputs))
    else:
        raise ValueError(f"no forward check for {name}")
    err = _relative_error(out, reference)
    _gate(name, err)
    return (f"{name} {installed(name)}: loaded with {CONSUMERS[name].reads}; fp32 forward vs reference rel error "
            f"{err:.1e} (bound {FORWARD_BOUND})"), {"rel_error": err, "bound": FORWARD_BOUND}


def bonsai_spec(config: dict):
    from mlx_vlm.models.bonsai.klein_fast import Flux2KleinMegakernelSpec

    o = _overrides(config)
    return Flux2KleinMegakernelSpec(
        num_double_blocks=o["num_layers"], num_single_blocks=o["num_single_layers"],
        dim=o["num_attention_heads"] * o["attention_head_dim"], num_heads=o["num_attention_heads"],
        head_dim=o["attention_head_dim"], mlp_ratio=o["mlp_ratio"], layer_norm_eps=config.get("eps", 1e-6),
        rms_norm_eps=config.get("eps", 1e-6), rope_theta=o["rope_theta"], axes_dims_rope=o["axes_dims_rope"],
        in_channels=o["in_channels"], context_dim=o["joint_attention_dim"])


def load_bonsai(folder: Path, config: dict, bits: int):
    """The Bonsai fast transformer built from the pack folder (as `<root>/transformer-packed-mflux/`), the way
    mlx-vlm's `bonsai.weights.load_transformer` builds it, with the dimensions of `config` instead of klein
    4B's hard-coded ones."""
    mlx_cpu.enable()  # before mlx.core is first imported
    from mlx_vlm.models.bonsai.klein_fast import (
        Flux2KleinFastTransformer,
        find_packed_artifact_dir,
    )
    from mlx_vlm.models.bonsai.klein_fast import (
        load_klein_fast_packed_weights_from_disk as load_weights,
    )

    spec = bonsai_spec(config)
    with _model_root(folder, "transformer-packed-mflux") as root:
        packed = find_packed_artifact_dir(root)
        if packed is None:
            raise ConsumerError(f"{folder}: mlx-vlm's find_packed_artifact_dir does not take it as a packed artifact")
        weights = load_weights(packed, spec)
    model = Flux2KleinFastTransformer(
        weights=weights, precision={1: "1bit", 2: "2bit"}[bits], patch_size=1, in_channels=spec.in_channels,
        out_channels=spec.in_channels, num_layers=spec.num_double_blocks, num_single_layers=spec.num_single_blocks,
        attention_head_dim=spec.head_dim, num_attention_heads=spec.num_heads, joint_attention_dim=spec.context_dim,
        timestep_guidance_channels=config.get("timestep_guidance_channels", 256), mlp_ratio=spec.mlp_ratio,
        axes_dims_rope=spec.axes_dims_rope, rope_theta=spec.rope_theta, guidance_embeds=False,
        layer_norm_eps=spec.layer_norm_eps, rms_norm_eps=spec.rms_norm_eps)
    return weights, model


def _bonsai_kernels(model):
    """(kernel, diffusers modules it computes, in order of its output rows) of every block linear the Bonsai
    transformer holds; mlx-vlm fuses q/k/v of each stream into one kernel."""
    for i, block in enumerate(model.megakernel.double_blocks):
        p = f"transformer_blocks.{i}"
        yield block.img_qkv, [f"{p}.attn.to_q", f"{p}.attn.to_k", f"{p}.attn.to_v"]
        yield block.txt_qkv, [f"{p}.attn.add_q_proj", f"{p}.attn.add_k_proj", f"{p}.attn.add_v_proj"]
        for attr, module in (("to_out", "attn.to_out.0"), ("to_add_out", "attn.to_add_out"),
                             ("ff_linear_in", "ff.linear_in"), ("ff_linear_out", "ff.linear_out"),
                             ("ff_context_linear_in", "ff_context.linear_in"),
                             ("ff_context_linear_out", "ff_context.linear_out")):
            yield getattr(block, attr), [f"{p}.{module}"]
        yield block.modulation_img, ["double_stream_modulation_img.linear"]
        yield block.modulation_txt, ["double_stream_modulation_txt.linear"]
    for i, block in enumerate(model.megakernel.single_blocks):
        p = f"single_transformer_blocks.{i}.attn"
        yield block.qkv_mlp_proj, [f"{p}.to_qkv_mlp_proj"]
        yield block.out_proj, [f"{p}.to_out"]
        yield block.modulation, ["single_stream_modulation.linear"]
    mk = model.megakernel
    for kernel, module in ((mk.x_embedder, "x_embedder"), (mk.context_embedder, "context_embedder"),
                           (mk.norm_out_linear, "norm_out.linear"), (mk.proj_out, "proj_out")):
        yield kernel, [module]


def _compare_held(name: str, kernel, modules: list[str], weight, wanted: dict) -> None:
    """The matrix a Bonsai kernel holds, dequantized by MLX, against our decode of its modules: bit for bit.
    `wanted` keeps our decode (as MLX holds it) by modules: the loader gives every block its own copy of the
    shared modulation weights, and each copy is compared."""
    import mlx.core as mx
    from mlx_vlm.models.bonsai.klein_fast import (
        DenseLinearKernel,
        QuantizedLinearKernel,
    )

    dense = isinstance(kernel, DenseLinearKernel)
    if not dense and not isinstance(kernel, QuantizedLinearKernel):
        raise ConsumerError(f"{name}: {'+'.join(modules)} is held as {type(kernel).__name__}")
    key = tuple(modules)
    if key not in wanted:
        want = mx.array(np.concatenate([weight(m) for m in modules], axis=0))
        wanted[key] = want.astype(mx.bfloat16) if dense else want  # dense: their bf16 cast is what it reads
    want = wanted[key]
    held = kernel.weight if dense else mx.dequantize(kernel.packed_weight, kernel.scales, kernel.biases,
                                                     group_size=kernel.group_size, bits=kernel.bits).astype(mx.float32)
    if held.shape == want.shape and held.dtype == want.dtype and bool(mx.array_equal(held, want)):
        return
    held_type, want_type = f"{held.dtype} {list(held.shape)}", f"{want.dtype} {list(want.shape)}"
    held, want = np.array(held.astype(mx.float32)), np.array(want.astype(mx.float32))
    at = np.argwhere(held != want)[0].tolist() if held.shape == want.shape and (held != want).any() else None
    raise ConsumerError(f"{name}: {'+'.join(modules)} holds " + (
        f"{held[tuple(at)]} at {at}, the pack decodes to {want[tuple(at)]}" if at is not None else
        f"{held_type}, the pack's is {want_type}"))


def check_bonsai(folder: Path, config: dict, qconfig: PackConfig, weight, stored, seed: int = 0,
                 dequantize_exact: frozenset = frozenset()) -> tuple[str, dict]:
    """Build the Bonsai transformer from the pack; every matrix it holds must equal our decode exactly (kept
    tensors: their bf16 cast, which is what it reads), and each quantized kernel must give what
    `mx.quantized_matmul` gives on the pack's own tensors. `weight(module)`: our float32 decode (or kept
    tensor); `stored(name)`: a tensor of the pack as an mx array. `dequantize_exact`: modules whose
    `mx.dequantize` of the pack's own tensors was already found equal to our decode, bit for bit (verify's MLX
    layer step): a kernel of only those that holds exactly the pack's tensors and settings holds our decode, so
    it is not dequantized again (MLX's CPU dequantize costs ~0.5 s per klein layer)."""
    mlx_cpu.enable()  # before mlx.core is first imported
    import mlx.core as mx
    from mlx_vlm.models.bonsai.klein_fast import QuantizedLinearKernel

    name = "mlx-vlm-bonsai"
    bits = {q.bits for q in qconfig.quantized.values()}.pop()
    _, model = _run(name, "loading", lambda: load_bonsai(folder, config, bits))
    rng = np.random.default_rng(seed)
    matrices = kernels = dequantized = 0
    wanted: dict = {}
    called: set[tuple[int, ...]] = set()  # the shapes whose kernel has been called
    for kernel, modules in _bonsai_kernels(model):
        quantized = isinstance(kernel, QuantizedLinearKernel)
        if not (quantized and all(m in dequantize_exact for m in modules)):
            _compare_held(name, kernel, modules, weight, wanted)
            dequantized += 1
        matrices += 1  # a kernel of modules in dequantize_exact: compared with the pack's tensors below
        if quantized:
            parts = {s: mx.concatenate([stored(f"{m}.{s}") for m in modules], axis=0)
                     for s in ("weight", "scales", "biases")}
            # The kernel computes mx.quantized_matmul of what it holds at its bits and group size: with those
            # equal to the pack's tensors and settings, it gives what the pack's tensors give. Its own call runs
            # once per shape (MLX's CPU quantized_matmul takes seconds per klein layer, and the call is the same
            # function of the same arrays for every layer of a shape).
            for attr, suffix in (("packed_weight", "weight"), ("scales", "scales"), ("biases", "biases")):
                held_part = getattr(kernel, attr)
                if held_part.dtype != parts[suffix].dtype or not bool(mx.array_equal(held_part, parts[suffix])):
                    raise ConsumerError(f"{name}: the kernel of {'+'.join(modules)} holds a {attr} that is not the "
                                        f"pack's {suffix}")
            if (kernel.bits, kernel.group_size) != (bits, qconfig.group_size):
                raise ConsumerError(f"{name}: the kernel of {'+'.join(modules)} runs at {kernel.bits} bits, group "
                                    f"{kernel.group_size}; the pack is {bits} bits, group {qconfig.group_size}")
            shape = (parts["scales"].shape[0], parts["scales"].shape[1] * qconfig.group_size)
            if shape not in called:
                called.add(shape)
                x = mx.array(rng.standard_normal((4, shape[1]), dtype=np.float32)).astype(mx.bfloat16)
                expect = mx.quantized_matmul(x, parts["weight"], parts["scales"], parts["biases"],
                                             group_size=qconfig.group_size, bits=bits)
                got = _run(name, "per-layer kernel", lambda k=kernel, x=x: k(x))
                if not np.array_equal(np.array(got.astype(mx.float32)), np.array(expect.astype(mx.float32))):
                    raise ConsumerError(f"{name}: the kernel of {'+'.join(modules)} differs from "
                                        "mx.quantized_matmul on the pack's tensors")
            kernels += 1
    detail = (f"{name} {installed(name)}: loaded with {CONSUMERS[name].reads}; {matrices} held matrices equal the "
              f"pack's decode exactly ({dequantized} dequantized here, the others hold the pack's own tensors, whose "
              f"mx.dequantize was found exact), {kernels} quantized kernels hold the pack's tensors and settings, "
              f"one per shape ({len(called)}) called and equal to mx.quantized_matmul on them")
    data = {"matrices": matrices, "dequantized": dequantized, "kernels": kernels, "kernels_called": len(called)}
    try:
        _forward(model, _tiny_inputs(config))
        detail += "; fused forward ran (not compared: it computes in bf16)"
    except RuntimeError as e:
        if "Metal" not in str(e):
            raise ConsumerError(f"{name} {installed(name)}: fused forward failed: {e}") from None
        detail += "; its fused forward needs Metal, not run here"
    return detail, data


def _tiny_inputs(config: dict) -> dict[str, np.ndarray]:
    """Two image and two text tokens: enough to see whether the fused forward runs at all."""
    ids = np.zeros((2, 4), dtype=np.float32)
    ids[:, 1] = np.arange(2)
    return {"hidden_states": np.zeros((1, 2, config["in_channels"]), np.float32),
            "encoder_hidden_states": np.zeros((1, 2, config["joint_attention_dim"]), np.float32),
            "timestep": np.array([0.5], np.float32), "img_ids": ids, "txt_ids": ids}

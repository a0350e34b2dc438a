"""The FLUX.2 transformer forward pass in MLX, run from an MLX pack or from dense diffusers weights.

It reproduces diffusers' `Flux2Transformer2DModel.forward(..., return_dict=False)[0]` so that the pack can be
judged by the runtime that will serve it: quantized linears go through MLX's own `quantized_matmul` on the
packed codes, not through a re-implementation of the decode. On a Linux CPU, where that kernel is a slow loop,
they go through MLX's own `dequantize` of the same tensors and a dense matmul instead, and MLX's matmuls through
numpy's OpenBLAS (`bonsai_quant.mlx_cpu`). Module names follow diffusers, so every tensor of a pack (or of a
diffusers state dict) loads under its own name.

The forward itself uses only MLX and numpy; torch is imported only by `from_torch_state_dict`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .. import mlx_cpu

mlx_cpu.enable()  # before mlx.core is first imported: its BLAS is bound then

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from ..errors import PackError  # noqa: E402
from ..packing.targets import TARGETS  # noqa: E402
from ..shards import open_regular, read_weight_map  # noqa: E402

# diffusers' defaults for Flux2Transformer2DModel arguments, used where a config.json leaves one out
# (tests/test_mlx_flux2.py checks them against the installed diffusers).
CONFIG_DEFAULTS = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=48,
    attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True,
)

# The MLX pack's file names (the registry's, which loads no torch: this module stays free of it).
WEIGHTS_NAME = TARGETS["mlx"].weights_name
INDEX_NAME = TARGETS["mlx"].index_name
QUANT_CONFIG_NAME = "quantization_config.json"
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


# ---------------------------------------------------------------------------------------------------- layers

def _layer_norm(x: mx.array, eps: float) -> mx.array:
    return mx.fast.layer_norm(x, None, None, eps)


def _modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return x * (1 + scale) + shift


def _swiglu(x: mx.array) -> mx.array:
    # FLUX.2 fuses the gate and value projections into one matmul: the first half gates the second.
    gate, value = mx.split(x, 2, axis=-1)
    return nn.silu(gate) * value


def _linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


class _QuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear, returning the activations' dtype.

    When the pack's scales cannot be held exactly in the compute dtype (fp16 scales, bf16 compute) they are
    kept wider and `quantized_matmul` promotes its output; cast back so the rest of the graph stays in one dtype.
    On a Linux CPU it computes the same product as MLX's dequantize and a dense matmul (see mlx_cpu).
    """

    def __call__(self, x: mx.array) -> mx.array:
        if mlx_cpu.quantized_kernel_is_slow():
            return mlx_cpu.dense_quantized_matmul(self, x).astype(x.dtype)
        return super().__call__(x).astype(x.dtype)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the head dimension, as diffusers' `use_real_unbind_dim=-1`.

    x: [B, H, S, D]; cos, sin: float32 [S, D/2]. Done in float32 and cast back, as diffusers does.
    """
    shape = x.shape
    pairs = x.astype(mx.float32).reshape(*shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
    return rotated.reshape(shape).astype(x.dtype)


def rope_tables(ids: np.ndarray, axes_dims: tuple[int, ...], theta: float) -> tuple[mx.array, mx.array]:
    """cos and sin [S, sum(axes_dims)/2] of the multi-axis RoPE angles for position ids [S, n_axes].

    Each axis i rotates its own slice of axes_dims[i] head channels by pos_i * theta^(-2k/d_i). The angles are
    computed in float64, as diffusers does on CPU (large positions times high frequencies lose phase in
    float32), and only then rounded; numpy does it so Apple GPUs, which have no float64, get the same tables.
    """
    pos = np.asarray(ids, dtype=np.float32).astype(np.float64)
    if pos.ndim != 2 or pos.shape[1] != len(axes_dims):
        raise ValueError(f"position ids must be [tokens, {len(axes_dims)}], got {list(pos.shape)}")
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles.append(np.outer(pos[:, axis], freqs))
    angles = np.concatenate(angles, axis=-1)
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


def _attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Joint attention over [B, H, S, D] heads (RoPE already on q, k); returns [B, S, H*D]."""
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
    b, h, s, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def _heads(x: mx.array, head_dim: int, norm: nn.RMSNorm | None = None) -> mx.array:
    """[B, S, H*D] -> (per-head RMSNorm) -> [B, H, S, D]."""
    b, s, _ = x.shape
    x = x.reshape(b, s, -1, head_dim)
    return (x if norm is None else norm(x)).transpose(0, 2, 1, 3)


class _Modulation(nn.Module):
    """silu(temb) -> linear, split into (shift, scale, gate) triples broadcast over tokens."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = _linear(dim, dim * 3 * sets)

    def __call__(self, temb: mx.array) -> list[tuple[mx.array, mx.array, mx.array]]:
        chunks = mx.split(self.linear(nn.silu(temb))[:, None, :], 3 * self.sets, axis=-1)
        return [tuple(chunks[3 * i:3 * i + 3]) for i in range(self.sets)]


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = _linear(dim, 2 * hidden)
        self.linear_out = _linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_out(_swiglu(self.linear_in(x)))


class _JointAttention(nn.Module):
    """Double-stream attention: separate projections and q/k norms per stream, one softmax over text + image."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        inner = heads * head_dim
        self.head_dim = head_dim
        self.to_q, self.to_k, self.to_v = (_linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (_linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (
            nn.RMSNorm(head_dim, eps=eps) for _ in range(4))
        self.to_out = [_linear(inner, dim)]
        self.to_add_out = _linear(inner, dim)

    def __call__(self, img: mx.array, txt: mx.array, rope) -> tuple[mx.array, mx.array]:
        d = self.head_dim
        # Text first: the RoPE tables and the single-stream blocks use the order [text, image].
        q = [_heads(self.add_q_proj(txt), d, self.norm_added_q), _heads(self.to_q(img), d, self.norm_q)]
        k = [_heads(self.add_k_proj(txt), d, self.norm_added_k), _heads(self.to_k(img), d, self.norm_k)]
        v = [_heads(self.add_v_proj(txt), d), _heads(self.to_v(img), d)]
        q, k, v = (mx.concatenate(parts, axis=2) for parts in (q, k, v))
        out = _attention(apply_rope(q, *rope), apply_rope(k, *rope), v)
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class Flux2DoubleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = _JointAttention(dim, heads, head_dim, eps)
        self.ff = _FeedForward(dim, mlp_hidden)
        self.ff_context = _FeedForward(dim, mlp_hidden)

    def __call__(self, img, txt, mod_img, mod_txt, rope):
        (shift, scale, gate), (shift2, scale2, gate2) = mod_img
        (c_shift, c_scale, c_gate), (c_shift2, c_scale2, c_gate2) = mod_txt
        img_attn, txt_attn = self.attn(_modulate(_layer_norm(img, self.eps), shift, scale),
                                       _modulate(_layer_norm(txt, self.eps), c_shift, c_scale), rope)
        img = img + gate * img_attn
        img = img + gate2 * self.ff(_modulate(_layer_norm(img, self.eps), shift2, scale2))
        txt = txt + c_gate * txt_attn
        txt = txt + c_gate2 * self.ff_context(_modulate(_layer_norm(txt, self.eps), c_shift2, c_scale2))
        return img, txt


class _ParallelSelfAttention(nn.Module):
    """Single-stream block body: one matmul yields q, k, v and the MLP input; one matmul maps both back."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.inner = heads * head_dim
        self.to_qkv_mlp_proj = _linear(dim, 3 * self.inner + 2 * mlp_hidden)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = _linear(self.inner + mlp_hidden, dim)

    def __call__(self, x: mx.array, rope) -> mx.array:
        d, inner = self.head_dim, self.inner
        q, k, v, mlp = mx.split(self.to_qkv_mlp_proj(x), [inner, 2 * inner, 3 * inner], axis=-1)
        q = apply_rope(_heads(q, d, self.norm_q), *rope)
        k = apply_rope(_heads(k, d, self.norm_k), *rope)
        out = _attention(q, k, _heads(v, d))
        return self.to_out(mx.concatenate([out, _swiglu(mlp)], axis=-1))


class Flux2SingleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = _ParallelSelfAttention(dim, heads, head_dim, mlp_hidden, eps)

    def __call__(self, x, mod, rope):
        shift, scale, gate = mod[0]
        return x + gate * self.attn(_modulate(_layer_norm(x, self.eps), shift, scale), rope)


class _TimestepEmbedder(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = _linear(channels, dim)
        self.linear_2 = _linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


def timestep_features(t: mx.array, channels: int) -> mx.array:
    """Sinusoidal features [cos | sin] of t (already x1000), float32 as diffusers' `Timesteps(flip_sin_to_cos)`."""
    half = channels // 2
    # The frequencies come from numpy's exp (float64, rounded once): MLX's float32 exp is a few ulp off, and
    # with t up to 1000 one ulp of a frequency turns the angle by ~6e-5 rad, which was the largest deviation
    # from diffusers in the whole forward.
    exponent = np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = t.astype(mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class _TimeGuidanceEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, guidance: bool):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = _TimestepEmbedder(channels, dim)
        if guidance:
            self.guidance_embedder = _TimestepEmbedder(channels, dim)

    def __call__(self, t: mx.array, guidance: mx.array | None) -> mx.array:
        emb = self.timestep_embedder(timestep_features(t, self.channels).astype(t.dtype))
        if guidance is not None and "guidance_embedder" in self:
            emb = emb + self.guidance_embedder(timestep_features(guidance, self.channels).astype(t.dtype))
        return emb


class _AdaNormOut(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = _linear(dim, 2 * dim)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        # Unlike the block modulations, norm_out's projection is ordered (scale, shift).
        scale, shift = mx.split(self.linear(nn.silu(temb))[:, None, :], 2, axis=-1)
        return _modulate(_layer_norm(x, self.eps), shift, scale)


# ----------------------------------------------------------------------------------------------------- model

class MLXFlux2(nn.Module):
    """FLUX.2 transformer in MLX, parameter names as in diffusers' Flux2Transformer2DModel."""

    def __init__(self, config: dict, dtype: mx.Dtype = mx.float32):
        super().__init__()
        c = {**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
        unknown = set(c) - set(CONFIG_DEFAULTS)
        if unknown:
            raise PackError(f"config.json: unknown Flux2Transformer2DModel arguments {sorted(unknown)}")
        heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
        if sum(c["axes_dims_rope"]) != head_dim:
            raise PackError(f"config.json: axes_dims_rope {list(c['axes_dims_rope'])} must sum to "
                            f"attention_head_dim {head_dim}")
        dim = heads * head_dim
        mlp_hidden = int(dim * c["mlp_ratio"])
        out_channels = c["out_channels"] or c["in_channels"]
        self.config = c
        self.dtype = dtype
        self.time_guidance_embed = _TimeGuidanceEmbed(c["timestep_guidance_channels"], dim, c["guidance_embeds"])
        self.double_stream_modulation_img = _Modulation(dim, 2)
        self.double_stream_modulation_txt = _Modulation(dim, 2)
        self.single_stream_modulation = _Modulation(dim, 1)
        self.x_embedder = _linear(c["in_channels"], dim)
        self.context_embedder = _linear(c["joint_attention_dim"], dim)
        block = (dim, heads, head_dim, mlp_hidden, c["eps"])
        self.transformer_blocks = [Flux2DoubleBlock(*block) for _ in range(c["num_layers"])]
        self.single_transformer_blocks = [Flux2SingleBlock(*block) for _ in range(c["num_single_layers"])]
        self.norm_out = _AdaNormOut(dim, c["eps"])
        self.proj_out = _linear(dim, c["patch_size"] ** 2 * out_channels)
        # Parameters made above are lazy random arrays; they are replaced by load() before anything evaluates
        # them, so building even the full-size model allocates nothing.

    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None) -> mx.array:
        """diffusers' forward: hidden_states [B, L, in], encoder_hidden_states [B, T, joint], timestep [B] in
        [0, 1], img_ids [L, n_axes], txt_ids [T, n_axes] (a leading batch axis on ids is dropped, as there).
        Returns [B, L, patch^2 * out_channels] in the compute dtype."""
        dt = self.dtype
        img = mx.array(hidden_states).astype(dt)
        txt = mx.array(encoder_hidden_states).astype(dt)
        # diffusers rounds the timestep to the model dtype before scaling it to [0, 1000].
        t = mx.array(timestep).astype(dt) * 1000
        g = None if guidance is None else mx.array(guidance).astype(dt) * 1000
        temb = self.time_guidance_embed(t, g)
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)

        ids = [np.asarray(i) for i in (txt_ids, img_ids)]
        ids = [i[0] if i.ndim == 3 else i for i in ids]
        c = self.config
        rope = rope_tables(np.concatenate(ids, axis=0), tuple(c["axes_dims_rope"]), c["rope_theta"])
        rope = tuple(r[None, None, :, :] for r in rope)  # broadcast over batch and heads

        img, txt = self.x_embedder(img), self.context_embedder(txt)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, mod_img, mod_txt, rope)
        x = mx.concatenate([txt, img], axis=1)
        for block in self.single_transformer_blocks:
            x = block(x, mod_single, rope)
        x = x[:, txt.shape[1]:]
        return self.proj_out(self.norm_out(x, temb))

    forward = __call__

    # ------------------------------------------------------------------------------------------- loading

    def quantize_modules(self, quantized: dict[str, int], group_size: int) -> None:
        """Swap the named linears for MLX quantized linears of the given bits (before load)."""
        linears = {path: m for path, m in self.named_modules() if isinstance(m, nn.Linear)}
        for path, bits in quantized.items():
            if path not in linears:
                raise PackError(f"quantized module {path!r} is not a linear of this FLUX.2 config")
            out_features, in_features = linears[path].weight.shape
            try:
                layer = _QuantizedLinear(in_features, out_features, bias=False, group_size=group_size, bits=bits)
            except ValueError as e:
                raise PackError(f"{path}: MLX cannot quantize [{out_features}, {in_features}] with "
                                f"group_size={group_size}, bits={bits} ({e})") from None
            *parents, last = path.split(".")
            node = self
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            node[int(last) if isinstance(node, list) else last] = layer

    def load(self, weights: dict[str, mx.array], source: str) -> "MLXFlux2":
        """Assign every parameter from `weights` (names as in diffusers), checking names and shapes."""
        expected = dict(tree_flatten(self.parameters()))
        missing = sorted(set(expected) - set(weights))
        if missing:
            raise PackError(f"{source}: missing tensor {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(set(weights) - set(expected))
        if extra:
            raise PackError(f"{source}: unexpected tensor {extra[0]!r} for this config"
                            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        cast = {}
        for name, ref in expected.items():
            w = weights[name]
            if tuple(w.shape) != tuple(ref.shape):
                raise PackError(f"{source}: tensor {name!r} has shape {list(w.shape)}, expected {list(ref.shape)}")
            cast[name] = self._cast(name, w)
        self.update(tree_unflatten(list(cast.items())))
        mx.eval(self.parameters())
        return self

    def _cast(self, name: str, w: mx.array) -> mx.array:
        if name.endswith(".weight") and w.dtype == mx.uint32:
            return w  # packed codes
        if not mx.issubdtype(w.dtype, mx.floating):
            raise PackError(f"tensor {name!r} has dtype {w.dtype}; expected a float tensor")
        if name.endswith((".scales", ".biases")) and self.dtype != mx.float32 and w.dtype != self.dtype:
            # fp16 -> bf16 would round the scales; keep them exact in float32 (see _QuantizedLinear).
            return w.astype(mx.float32)
        return w.astype(self.dtype)


# ------------------------------------------------------------------------------------------------ entry points

def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackError(f"{path}: not found; {what}") from None
    except json.JSONDecodeError as e:
        raise PackError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise PackError(f"{path}: expected a JSON object")
    return data


def _load_pack_tensors(folder: Path) -> tuple[dict[str, mx.array], str]:
    index = folder / INDEX_NAME
    if index.exists():
        files = sorted(set(read_weight_map(index, PackError).values()))  # plain shard names beside the index
        source = str(index)
    else:
        files, source = [folder / WEIGHTS_NAME], str(folder / WEIGHTS_NAME)
    tensors: dict[str, mx.array] = {}
    for path in files:
        missing = "weights file not found" + (f" (listed in {index})" if index.exists() else "")
        open_regular(path, PackError, missing=missing).close()  # a FIFO would block mx.load
        try:
            tensors.update(mx.load(str(path), format="safetensors"))
        except Exception as e:  # mlx raises RuntimeError/ValueError for truncated or foreign files
            raise PackError(f"{path}: cannot read as safetensors ({e})") from None
    return tensors, source


def load_mlx_transformer(pack_dir: str | Path, dtype: str | mx.Dtype = "float32") -> MLXFlux2:
    """The FLUX.2 transformer of an MLX pack (`bonsai-quant convert --target mlx`): a folder with config.json,
    quantization_config.json and diffusion_pytorch_model.safetensors (or shards + index). `pack_dir` may also be
    a convert output folder holding `mlx/`."""
    folder = Path(pack_dir)
    if not (folder / QUANT_CONFIG_NAME).exists() and (folder / "mlx" / QUANT_CONFIG_NAME).exists():
        folder = folder / "mlx"
    qc_path = folder / QUANT_CONFIG_NAME
    qc = _read_json(qc_path, "an MLX pack folder holds quantization_config.json")
    if qc.get("format") != "mlx":
        raise PackError(f"{qc_path}: format is {qc.get('format')!r}, not 'mlx'; not an MLX pack")
    group_size, quantized = qc.get("group_size"), qc.get("quantized")
    if not isinstance(group_size, int) or not isinstance(quantized, dict):
        raise PackError(f"{qc_path}: needs an integer 'group_size' and a 'quantized' object")
    try:
        bits = {name: int(entry["bits"]) for name, entry in quantized.items()}
    except (KeyError, TypeError, ValueError):
        raise PackError(f"{qc_path}: every 'quantized' entry needs integer 'bits'") from None

    config = _read_json(folder / "config.json", "an MLX pack folder holds the diffusers config.json")
    model = MLXFlux2(config, _dtype(dtype))
    model.quantize_modules(bits, group_size)
    tensors, source = _load_pack_tensors(folder)
    return model.load(tensors, source)


def from_torch_state_dict(config: dict, state_dict: dict, dtype: str | mx.Dtype = "float32") -> MLXFlux2:
    """A dense MLX model from a diffusers Flux2Transformer2DModel state dict (torch tensors)."""
    import torch

    weights = {name: mx.array(t.detach().to(torch.float32).cpu().numpy()) for name, t in state_dict.items()}
    return MLXFlux2(config, _dtype(dtype)).load(weights, "state dict")


def _dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise PackError(f"unknown compute dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids")


def mlx_forward_numpy(pack_dir: str | Path | MLXFlux2, inputs: dict[str, np.ndarray],
                      dtype: str = "float32") -> np.ndarray:
    """Run the pack's transformer on numpy inputs named as diffusers' forward arguments; float32 numpy out."""
    model = pack_dir if isinstance(pack_dir, MLXFlux2) else load_mlx_transformer(pack_dir, dtype)
    missing = [k for k in INPUT_NAMES if k not in inputs]
    if missing:
        raise ValueError(f"inputs lack {missing}; needed: {', '.join(INPUT_NAMES)}")
    out = model(**{k: inputs[k] for k in INPUT_NAMES}, guidance=inputs.get("guidance"))
    return np.array(out.astype(mx.float32))


def relative_error(output: np.ndarray, reference) -> float:
    """||output - reference|| / ||reference||, in float64; `reference` may be a torch tensor."""
    if hasattr(reference, "detach"):
        reference = reference.detach().float().cpu().numpy()
    a, b = np.asarray(output, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {list(a.shape)} vs {list(b.shape)}")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def pack_relative_error(pack_dir: str | Path, inputs: dict[str, np.ndarray], reference,
                        dtype: str = "float32") -> float:
    """Relative error of the pack's MLX forward against a torch (or numpy) reference output."""
    return relative_error(mlx_forward_numpy(pack_dir, inputs, dtype), reference)

"""What bonsai-quant knows about FLUX.2 transformers: presets, the tensor inventory, and tensor roles.

The inventory is never guessed: it comes from building diffusers' real `Flux2Transformer2DModel` from a
`config.json` on the meta device, so a checkpoint is checked against exactly what diffusers would load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BonsaiError, CheckpointError
from .shards import read_json

if TYPE_CHECKING:  # torch loads on use: reading a config.json needs none
    import torch

CLASS_NAME = "Flux2Transformer2DModel"

PRESETS: dict[str, dict] = {
    # REFERENCE.md §1: the published FLUX.2 [klein] 4B transformer.
    "klein-4b": dict(
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=[32, 32, 32, 32], rope_theta=2000, eps=1e-6, guidance_embeds=False,
    ),
    # Same class and block structure, small enough for CPU tests: hidden 256, MLP hidden 768, single-block
    # output 1024, so every quantized in_features is a multiple of 128.
    "tiny": dict(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=256, timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=[16, 16, 16, 16], rope_theta=2000, eps=1e-6, guidance_embeds=False,
    ),
}

ROLES = ("attention", "mlp", "fused_projection", "modulation", "embedder", "norm", "output")

# Order matters: the first pattern that matches a module name gives its role.
_ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)norm_(q|k|added_q|added_k)$", "norm"),
    (r"^single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)$", "fused_projection"),
    (r"^transformer_blocks\.\d+\.attn\.", "attention"),
    (r"^transformer_blocks\.\d+\.(ff|ff_context)\.", "mlp"),
    (r"(^|_)modulation", "modulation"),
    (r"^norm_out\.", "modulation"),
    (r"^(x_embedder|context_embedder|time_guidance_embed)(\.|$)", "embedder"),
    (r"^proj_out$", "output"),
)


def role_of(tensor_name: str) -> str:
    module = tensor_name.rsplit(".", 1)[0]
    for pattern, role in _ROLE_PATTERNS:
        if re.search(pattern, module):
            return role
    raise CheckpointError(f"tensor {tensor_name!r} has no known FLUX.2 role; is this a FLUX.2 transformer?")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    role: str
    is_linear_weight: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_config(path: str | Path) -> dict:
    """Read a diffusers `config.json`, refusing anything that is not a FLUX.2 transformer config."""
    path = Path(path)
    config = read_json(path, CheckpointError, missing="not found; a diffusers checkpoint folder holds config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object of model arguments")
    cls = config.get("_class_name", CLASS_NAME)
    if cls != CLASS_NAME:
        raise CheckpointError(f"{path}: _class_name is {cls!r}; bonsai-quant converts {CLASS_NAME} checkpoints")
    return config


def model_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def inventory(config: dict, source: str = "config.json") -> dict[str, TensorSpec]:
    """Every tensor diffusers' Flux2Transformer2DModel has for this config, in state-dict order."""
    key = json.dumps(model_kwargs(config), sort_keys=True)
    return _inventory(key, source)


@lru_cache(maxsize=8)
def _inventory(key: str, source: str) -> dict[str, TensorSpec]:
    import torch
    from diffusers import Flux2Transformer2DModel

    kwargs = json.loads(key)
    try:
        # Every tensor made on the meta device, not allocated first and moved there as init_empty_weights
        # does: a config claiming huge widths must not reach the allocator.
        with torch.device("meta"):
            model = Flux2Transformer2DModel(**kwargs)
    except Exception as e:  # diffusers raises assorted types for a bad config
        raise CheckpointError(f"{source}: diffusers cannot build {CLASS_NAME} from it: {e}") from None
    linear_weights = {
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    }
    return {
        name: TensorSpec(name, tuple(t.shape), role_of(name), name in linear_weights)
        for name, t in model.state_dict().items()
    }


def block_counts(config: dict, source: str = "config.json") -> tuple[int, int]:
    """(num_layers, num_single_layers), diffusers' defaults where the config leaves them out."""
    import inspect

    from diffusers import Flux2Transformer2DModel

    defaults = inspect.signature(Flux2Transformer2DModel.__init__).parameters
    counts = []
    for key in ("num_layers", "num_single_layers"):
        value = config.get(key, defaults[key].default)
        if type(value) is not int or value < 0:
            raise CheckpointError(f"{source}: {key} is {value!r}; valid: a whole number >= 0")
        counts.append(value)
    return counts[0], counts[1]


def parameter_count(config: dict, source: str = "config.json") -> int:
    """Parameters of the model `config` describes, from a build with at most one block of each kind: the
    cost of building does not grow with the block counts a file claims."""
    doubles, singles = block_counts(config, source)
    probe = inventory({**config, "num_layers": min(doubles, 1), "num_single_layers": min(singles, 1)}, source)
    total = sum(s.numel for s in probe.values())
    double = sum(s.numel for n, s in probe.items() if n.startswith("transformer_blocks.0."))
    single = sum(s.numel for n, s in probe.items() if n.startswith("single_transformer_blocks.0."))
    return total + (doubles - min(doubles, 1)) * double + (singles - min(singles, 1)) * single


def check_size(config: dict, tensor_bytes: int, min_bits: int, source: str = "config.json") -> None:
    """Refuse a config whose model could not fit in `tensor_bytes` at `min_bits` per parameter, before the
    whole architecture is built: a claimed 10^6 blocks would take hours and ~180 GB to build on meta."""
    params = parameter_count(config, source)
    need = -(-params * min_bits // 8)
    if need > tensor_bytes:
        doubles, singles = block_counts(config, source)
        raise CheckpointError(
            f"{source}: describes {params:,} parameters (num_layers {doubles}, num_single_layers {singles}), at "
            f"least {need:,} bytes at {min_bits} bit(s) each, but the safetensors hold {tensor_bytes:,} bytes of "
            "tensors; valid: the config.json these weights were saved with")


def build_model(config: dict, dtype=None):
    """A real diffusers model with random weights, for tests and reference forwards."""
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(**model_kwargs(config))
    return model.to(dtype) if dtype is not None else model


def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    from diffusers import __version__ as diffusers_version

    return {"_class_name": CLASS_NAME, "_diffusers_version": diffusers_version, **PRESETS[name]}


# ---------------------------------------------------------------- FLUX.2's sampler

KLEIN_SHIFT = 3.0  # FLUX.2 [klein]'s sigma shift (REFERENCE.md §2)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigma_schedule(steps: int, shift: float = KLEIN_SHIFT) -> torch.Tensor:
    """klein's FlowMatch-Euler schedule: steps + 1 sigmas from 1 down to 0 (float64 for exact arithmetic)."""
    import torch

    if steps < 1:
        raise BonsaiError(f"steps must be at least 1, got {steps}")
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return torch.cat([shift_sigmas(s, shift), torch.zeros(1, dtype=torch.float64)])


def euler_sample(velocity, noise: torch.Tensor, steps: int, shift: float = KLEIN_SHIFT) -> torch.Tensor:
    """Integrate dx/dsigma = velocity(x, sigma) from sigma=1 (noise) to sigma=0 with Euler steps.

    `velocity(x [B, ...], sigma [B]) -> [B, ...]`."""
    import torch

    sigmas = sigma_schedule(steps, shift)
    x = noise.float()
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        v = velocity(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device))
        x = x + (s_next - s) * v.float()
    return x


def check_conditioning(config: dict, channels: int, text_dim: int, source: str, model: str, latents: str) -> None:
    """Refuse a FLUX.2 config whose latent width or text width does not fit a built-in model's sampler and text
    embedding; `model` names it ("digits"), `latents` says what its channels hold."""
    problems = []
    if config.get("in_channels") != channels:
        problems.append(f"in_channels is {config.get('in_channels')}, the {model} model takes {channels} ({latents})")
    if config.get("out_channels") not in (None, channels):
        problems.append(f"out_channels is {config.get('out_channels')}, expected {channels}")
    if config.get("joint_attention_dim") != text_dim:
        problems.append(f"joint_attention_dim is {config.get('joint_attention_dim')}, the {model} text embedding "
                        f"has {text_dim}")
    if problems:
        raise BonsaiError(f"{source}: not a FLUX.2 {model} model: " + "; ".join(problems))

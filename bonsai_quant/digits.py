"""flux2-tiny-digits: the pieces a FLUX.2 transformer needs to draw 8x8 handwritten digits.

The shipped model (`assets/flux2-tiny-digits`) is a real diffusers `Flux2Transformer2DModel` trained by
`tools/train_digits.py` as a rectified-flow generator of scikit-learn's 8x8 digits. This module owns the
contract between that model and everything that runs it:

- text: a fixed word-embedding table (shipped, never trained) turns "a handwritten digit 7" into
  `encoder_hidden_states [B, MAX_TOKENS, D]`; positions `txt_ids [T, 4]` are (0, 0, 0, l) as in diffusers' FLUX.2;
- image: pixels in [0, 1] (0 = paper, 1 = ink) become latents in [-1, 1] packed as 2x2 patches, so an 8x8 image
  is 16 tokens of 4 channels on a 4x4 grid, with `img_ids [16, 4]` = (0, h, w, 0);
- sampling: FlowMatch-Euler as in the FLUX.2 [klein] pipeline: sigmas linspace(1, 1/S, S), shifted by
  `shift * s / (1 + (shift - 1) * s)` (klein: 3.0), then 0; the transformer gets `timestep = sigma` in [0, 1]
  and predicts the velocity `noise - x0`, so `x <- x + (sigma_next - sigma) * v`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch

from . import shards
from .errors import BonsaiError
from .flux2 import KLEIN_SHIFT, check_conditioning, euler_sample, shift_sigmas, sigma_schedule  # noqa: F401 -- the sampler, re-exported

MODEL_NAME = "flux2-tiny-digits"
JUDGE_NAME = "digits-judge"
TEXT_EMBEDDINGS = "text_embeddings.safetensors"
IMAGE_SIZE, PATCH = 8, 2
GRID = IMAGE_SIZE // PATCH  # 4x4 tokens
CHANNELS = PATCH * PATCH  # 4 values per token
MAX_TOKENS = 8
SHIFT = KLEIN_SHIFT  # FLUX.2 [klein]'s sampler shift
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAD = "<pad>"
VOCAB = (PAD, "a", "handwritten", "digit", *DIGIT_WORDS)


def assets_dir() -> Path:
    return Path(str(files(__package__) / "assets"))


def model_dir() -> Path:
    """The shipped flux2-tiny-digits checkpoint (diffusers layout, bf16): bonsai-quant's built-in model."""
    return assets_dir() / MODEL_NAME


def judge_dir() -> Path:
    return assets_dir() / JUDGE_NAME


def prompt(digit: int) -> str:
    return f"a handwritten digit {digit}"


# ---------------------------------------------------------------- text

def make_embedding_table(dim: int, seed: int = 0) -> torch.Tensor:
    """The fixed text embedding: one N(0, 1) row per vocabulary word, drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(VOCAB), dim, generator=g)


class TextEncoder:
    """Whitespace tokenizer over VOCAB (digits as words or numerals), padded to MAX_TOKENS, then a table lookup."""

    def __init__(self, table: torch.Tensor):
        if table.ndim != 2 or table.shape[0] != len(VOCAB):
            raise BonsaiError(f"text embedding table has shape {list(table.shape)}; expected [{len(VOCAB)}, dim]")
        self.table = table.float()

    @classmethod
    def load(cls, folder: Path | None = None) -> "TextEncoder":
        from safetensors.torch import load_file

        path = Path(folder or model_dir()) / TEXT_EMBEDDINGS
        if not path.exists():
            raise BonsaiError(f"{path}: the digits text embedding is missing; reinstall bonsai-quant")
        return cls(load_file(str(path))["embeddings"])

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def token_ids(self, text: str) -> list[int]:
        ids = []
        for word in text.lower().split():
            if word.isdigit() and len(word) == 1:
                word = DIGIT_WORDS[int(word)]
            if word not in VOCAB or word == PAD:
                raise BonsaiError(f"prompt {text!r}: unknown word {word!r}; the digits model knows: "
                                  f"{', '.join(VOCAB[1:])} and the numerals 0-9")
            ids.append(VOCAB.index(word))
        if len(ids) > MAX_TOKENS:
            raise BonsaiError(f"prompt {text!r}: {len(ids)} words; at most {MAX_TOKENS}")
        return ids + [0] * (MAX_TOKENS - len(ids))

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """`encoder_hidden_states [B, MAX_TOKENS, dim]` in float32."""
        return self.table[torch.tensor([self.token_ids(p) for p in prompts])]


def txt_ids(length: int = MAX_TOKENS) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))


def img_ids() -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(GRID), torch.arange(GRID), torch.arange(1))


# ---------------------------------------------------------------- image <-> latent

def image_to_latent(images: torch.Tensor) -> torch.Tensor:
    """[B, 8, 8] pixels in [0, 1] -> [B, 16, 4] latents in [-1, 1] (2x2 patches, row-major over the 4x4 grid)."""
    x = images.float() * 2 - 1
    b = x.shape[0]
    return x.reshape(b, GRID, PATCH, GRID, PATCH).permute(0, 1, 3, 2, 4).reshape(b, GRID * GRID, CHANNELS)


def latent_to_image(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of image_to_latent, clamped to [0, 1]."""
    b = latents.shape[0]
    x = latents.float().reshape(b, GRID, GRID, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(b, IMAGE_SIZE, IMAGE_SIZE)
    return ((x + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------- sampler

def transformer_velocity(model, text: torch.Tensor):
    """The velocity field of a FLUX.2 transformer conditioned on `text [B, T, D]`, as euler_sample wants it."""
    param = next(model.parameters())
    dtype, ids_img, ids_txt = param.dtype, img_ids().to(param.device), txt_ids(text.shape[1]).to(param.device)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=x.to(dtype), encoder_hidden_states=text.to(dtype), timestep=sigma.to(dtype),
                     img_ids=ids_img, txt_ids=ids_txt, return_dict=False)[0]

    return velocity


@torch.no_grad()
def generate(model, encoder: TextEncoder, digits: list[int], noise: torch.Tensor, steps: int,
             shift: float = SHIFT) -> torch.Tensor:
    """Images [B, 8, 8] in [0, 1] for `digits[i]` from `noise[i]` ([B, 16, 4])."""
    device = next(model.parameters()).device
    text = encoder.encode([prompt(d) for d in digits]).to(device)
    return latent_to_image(euler_sample(transformer_velocity(model, text), noise.to(device), steps, shift).cpu())


def check_compatible(config: dict, encoder: TextEncoder, source: str) -> None:
    """Refuse a FLUX.2 config that cannot take digit latents and the digits text embedding."""
    check_conditioning(config, CHANNELS, encoder.dim, source, "digits",
                       f"2x2 patches of an {IMAGE_SIZE}x{IMAGE_SIZE} image")


def read_json(path: Path) -> dict:
    data = shards.read_json(Path(path), BonsaiError, missing="not found")
    if not isinstance(data, dict):
        raise BonsaiError(f"{path}: expected a JSON object")
    return data

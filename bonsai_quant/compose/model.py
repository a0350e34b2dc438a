"""flux2-tiny-compose: the contract between the shipped compose model and everything that runs it.

The model (`assets/flux2-tiny-compose`) is a real diffusers `Flux2Transformer2DModel` trained by
`tools/train_compose.py` as a rectified-flow generator of compose scenes (`world.py`) from prompts
(`grammar.py`):

- text: a fixed word-embedding table (shipped, never trained) turns "a red 1 and a green 8" into
  `encoder_hidden_states [B, MAX_TOKENS, D]`, one row per word, with `txt_ids` (0, 0, 0, l): the words reach the
  image only through the joint attention of the double blocks, where rotary positions say which word follows
  which, so binding "red" to "1" happens there, as in klein;
- image: RGB pixels in [0, 1] become latents in [-1, 1] packed as 4x4 patches, so a 32x32 scene is 64 tokens of
  48 channels on an 8x8 grid with `img_ids` (0, h, w, 0);
- sampling: the digits model's FlowMatch-Euler sampler (`digits.euler_sample`, klein's shift 3.0).

`config.json` carries `"_bonsai_benchmark": "compose"`; it is copied into every pack made from the model, so
`bonsai-quant eval` picks the compose benchmark for them by default.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BonsaiError
from ..flux2 import check_conditioning
from .world import CANVAS, COLOURS

MODEL_NAME = "flux2-tiny-compose"
JUDGE_NAME = "compose-judge"
TEXT_EMBEDDINGS = "text_embeddings.safetensors"
BENCHMARK_KEY = "_bonsai_benchmark"
BENCHMARK = "compose"
PATCH = 4
GRID = CANVAS // PATCH  # 8x8 tokens
CHANNELS = 3 * PATCH * PATCH  # 48 values per token
MAX_TOKENS = 8
PAD = "<pad>"
PLURAL = "s"
NUMERALS = tuple(str(d) for d in range(10))
VOCAB = (PAD, "a", "and", "left", "right", "of", "above", "below", "two", "three", "four", PLURAL, *COLOURS,
         *NUMERALS)


def model_dir() -> Path:
    from ..digits import assets_dir

    return assets_dir() / MODEL_NAME


def judge_dir() -> Path:
    from ..digits import assets_dir

    return assets_dir() / JUDGE_NAME


# ---------------------------------------------------------------- text

def make_embedding_table(dim: int, seed: int = 0) -> torch.Tensor:
    """The fixed text embedding: one N(0, 1) row per vocabulary word, drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(VOCAB), dim, generator=g)


def words(text: str) -> list[str]:
    """Whitespace words, a plural numeral ("5s") split into the numeral and the plural mark."""
    out = []
    for word in text.lower().split():
        if len(word) == 2 and word[0].isdigit() and word[1] == PLURAL:
            out += [word[0], PLURAL]
        else:
            out.append(word)
    return out


class TextEncoder:
    """Word tokenizer over VOCAB, padded to MAX_TOKENS, then a table lookup."""

    def __init__(self, table: torch.Tensor):
        if table.ndim != 2 or table.shape[0] != len(VOCAB):
            raise BonsaiError(f"compose text embedding table has shape {list(table.shape)}; expected "
                              f"[{len(VOCAB)}, dim]")
        self.table = table.float()

    @classmethod
    def load(cls, folder: Path | None = None) -> TextEncoder:
        from safetensors.torch import load_file

        path = Path(folder or model_dir()) / TEXT_EMBEDDINGS
        if not path.exists():
            raise BonsaiError(f"{path}: the compose text embedding is missing; reinstall bonsai-quant")
        return cls(load_file(str(path))["embeddings"])

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def token_ids(self, text: str) -> list[int]:
        ids = []
        for word in words(text):
            if word not in VOCAB or word == PAD:
                raise BonsaiError(f"prompt {text!r}: unknown word {word!r}; the compose model knows: "
                                  f"{', '.join(VOCAB[1:])}")
            ids.append(VOCAB.index(word))
        if len(ids) > MAX_TOKENS:
            raise BonsaiError(f"prompt {text!r}: {len(ids)} tokens; at most {MAX_TOKENS}")
        return ids + [0] * (MAX_TOKENS - len(ids))

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """`encoder_hidden_states [B, MAX_TOKENS, dim]` in float32."""
        return self.table[torch.tensor([self.token_ids(p) for p in prompts], dtype=torch.long)]


def txt_ids(length: int = MAX_TOKENS) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))


def img_ids() -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(GRID), torch.arange(GRID), torch.arange(1))


# ---------------------------------------------------------------- image <-> latent

def image_to_latent(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, 32, 32] in [0, 1] -> [B, 64, 48] in [-1, 1]: 4x4 patches, row-major over the 8x8 grid, each patch's
    values in (dy, dx, channel) order."""
    x = images.float() * 2 - 1
    b = x.shape[0]
    return x.reshape(b, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(b, GRID * GRID, CHANNELS)


def latent_to_image(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of image_to_latent, clamped to [0, 1]."""
    b = latents.shape[0]
    x = latents.float().reshape(b, GRID, GRID, PATCH, PATCH, 3).permute(0, 5, 1, 3, 2, 4)
    return ((x.reshape(b, 3, CANVAS, CANVAS) + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------- sampling

@torch.no_grad()
def generate(model, encoder: TextEncoder, prompts: list[str], noise: torch.Tensor, steps: int,
             shift: float) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [0, 1] for `prompts[i]` from `noise[i]` ([B, 64, 48])."""
    from ..flux2 import euler_sample

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    text = encoder.encode(prompts).to(device=device, dtype=dtype)
    ids_img, ids_txt = img_ids().to(device), txt_ids(text.shape[1]).to(device)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model(hidden_states=x.to(dtype), encoder_hidden_states=text, timestep=sigma.to(dtype),
                     img_ids=ids_img, txt_ids=ids_txt, return_dict=False)[0]

    return latent_to_image(euler_sample(velocity, noise.to(device), steps, shift).cpu())


def is_compose_config(config: dict) -> bool:
    return config.get(BENCHMARK_KEY) == BENCHMARK


def check_compatible(config: dict, encoder: TextEncoder, source: str) -> None:
    """Refuse a FLUX.2 config that cannot take compose latents and the compose text embedding."""
    check_conditioning(config, CHANNELS, encoder.dim, source, "compose",
                       f"4x4 RGB patches of a {CANVAS}x{CANVAS} scene")

"""A tiny FLUX.2 [klein] pipeline folder built from diffusers' and transformers' own classes, random weights.

It has the layout of a published klein snapshot (`model_index.json` naming `Flux2KleinPipeline`, `scheduler/`,
`vae/`, `text_encoder/`, `tokenizer/`, `transformer/`), so everything that takes a klein pipeline folder
(`generate --base-pipeline`, `release --base-pipeline`, `calibrate --text-encoder`, `convert --model`) can be
tested end to end on CPU in seconds:

- text encoder: a 28-layer `Qwen3ForCausalLM` of hidden size 32, so that klein's layers 9, 18 and 27 exist and
  the conditioning is 3 x 32 = 96 wide; a word-level tokenizer with a chat template;
- VAE: `AutoencoderKLFlux2` with two levels (pixels / 2) and 16 latent channels, 64 after the pipeline's 2x2
  patchify, which is the transformer's `in_channels`;
- transformer: the `tiny` preset with `joint_attention_dim` 96, written by `synthetic.write_checkpoint`;
- scheduler: `FlowMatchEulerDiscreteScheduler` with klein's settings (dynamic shifting, shift 3.0).

Everything depends only on the seed: two calls give byte-identical folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .output import atomic_output

TEXT_HIDDEN = 32
TEXT_LAYERS = 28  # klein reads hidden states 9, 18 and 27
LATENT_CHANNELS = 16
COMPONENTS_WITHOUT_TRANSFORMER = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "vae")
WORDS = ("<pad>", "<unk>", "a", "an", "the", "of", "at", "in", "on", "red", "blue", "green", "fox", "cat", "dog",
         "lighthouse", "dusk", "night", "photo", "painting", "city", "tree", "river", "mountain")
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
# FLUX.2 [klein]'s scheduler/scheduler_config.json.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def transformer_config() -> dict:
    from .flux2 import preset_config

    return {**preset_config("tiny"), "in_channels": 4 * LATENT_CHANNELS, "joint_attention_dim": 3 * TEXT_HIDDEN}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_encoder(seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(WORDS), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=TEXT_HIDDEN // 2, max_position_embeddings=512)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                             latent_channels=LATENT_CHANNELS, sample_size=32)
    # A fresh BatchNorm has mean 0 and variance 1; give the latent statistics klein-like non-trivial values so
    # that the pipeline's de-normalisation is exercised.
    g = torch.Generator().manual_seed(seed + 2)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=g))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae.eval()


def write_tiny_pipeline(out: Path, seed: int = 0, force: bool = False, transformer: bool = True) -> Path:
    """Write the tiny klein pipeline folder (with `transformer=False`, everything but the transformer, as a
    release's base pipeline carries it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from .synthetic import write_checkpoint

    with atomic_output(Path(out), force=force) as tmp:
        pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=_vae(seed),
                                  text_encoder=_text_encoder(seed), tokenizer=_tokenizer(), transformer=None,
                                  is_distilled=True)
        pipe.save_pretrained(tmp)
        index = json.loads((tmp / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "Flux2Transformer2DModel"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if transformer:
            write_checkpoint(transformer_config(), tmp / "transformer", seed=seed, dtype=torch.float32)
    return Path(out)

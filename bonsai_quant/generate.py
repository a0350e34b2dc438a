"""`bonsai-quant generate`: images from a release or pack, through diffusers' own `Flux2KleinPipeline`.

The quantized transformer is loaded by `load_transformer` (the runtime it picks is reported: reference, gemlite
or cuda) and put into `Flux2KleinPipeline` in place of the original, beside the text encoder, tokenizer, VAE and
scheduler of the base pipeline: the release folder's own when it carries them (`model_index.json` at its root,
as `release --base-pipeline` writes), else `--base-pipeline DIR` (a FLUX.2 [klein] pipeline folder). Nothing
else of the pipeline is changed, so a quantized release samples exactly as the dense pipeline does with the
decoded weights.

The built-in digits model has no VAE or Qwen3: its packs are drawn with its own text embedding and klein's
sampler (`digits.generate`), from its prompts ("a handwritten digit 7", or just "7"; default all ten).

Image i of a run comes from the noise of `seed + i` alone, so it does not change with the other prompts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BonsaiError, OutputExistsError

DEFAULT_STEPS = 4  # klein is step-distilled: 4 steps, guidance 1
DEFAULT_GUIDANCE = 1.0
DEFAULT_SIZE = 512
DEFAULT_SEED = 0
DEFAULT_OUT = Path("generated.png")
BACKENDS = ("reference", "gemlite", "cuda")  # == runtime.cuda.BACKENDS
PIPELINE_CLASS = "Flux2KleinPipeline"
COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer")
DIGIT_SCALE = 8  # an 8x8 digit is written as 64x64 pixels


@dataclass
class Generated:
    images: list  # PIL images, one per prompt (or latents [B, C, H, W] with output_type="latent")
    prompts: list[str]
    pack: Path
    runtime: str
    device: str
    base_pipeline: Path | None  # None: the digits model's own sampler
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------- what runs

def runtime_of(model) -> str:
    """The runtime of a loaded transformer's low-bit layers, from the modules it holds."""
    from .runtime.packed_linear import PackedLinear

    names = set()
    for module in model.modules():
        cls = type(module).__name__
        if isinstance(module, PackedLinear):
            names.add("reference")
        elif cls == "CudaPackedLinear":
            names.add("cuda")
        elif cls == "GemLiteLinearTriton":
            names.add("gemlite")
    return "+".join(sorted(names)) or "dense"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_quantized(pack: Path, device: str, dtype, backend: str | None = None, target: str | None = None):
    """(model, pack folder): without `backend` and `target`, `bonsai_quant.load_transformer`'s choice of pack
    and runtime (the fastest this machine has); else that pack through that runtime."""
    from . import load_transformer as load_best
    from .runtime import load_transformer, resolve_pack

    if backend is not None and backend not in BACKENDS:
        raise BonsaiError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend is None and target is None:
        model = load_best(Path(pack), dtype=dtype, device=device)
        return model, Path(model.config["_name_or_path"])
    if backend == "gemlite" and target is None:
        target = "gemlite"  # gemlite's kernels take only the gemlite layout
    folder = resolve_pack(Path(pack), target)
    kwargs = {} if backend is None else {"backend": backend}  # the loader checks that it runs on `device`
    return load_transformer(folder, dtype=dtype, device=device, **kwargs), folder


def find_base_pipeline(source: Path, base_pipeline: Path | None) -> Path | None:
    """`--base-pipeline`, else the release folder (or the release holding this pack) when it has
    `model_index.json`; None when there is none."""
    if base_pipeline is not None:
        return Path(base_pipeline)
    for folder in (source, source.parent):
        if (folder / "model_index.json").is_file():
            return folder
    return None


def check_base_pipeline(folder: Path) -> dict:
    from .shards import read_json

    if not folder.is_dir():
        raise BonsaiError(f"--base-pipeline {folder}: no such folder; valid: a FLUX.2 [klein] pipeline folder "
                          f"(model_index.json, {', '.join(c + '/' for c in COMPONENTS)})")
    index = read_json(folder / "model_index.json", BonsaiError,
                      missing="not found; a FLUX.2 [klein] pipeline folder holds model_index.json")
    if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS:
        got = index.get("_class_name") if isinstance(index, dict) else type(index).__name__
        raise BonsaiError(f"{folder / 'model_index.json'}: names pipeline {got!r}; generate runs "
                          f"{PIPELINE_CLASS} (FLUX.2 [klein])")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir() or c not in index]
    if missing:
        raise BonsaiError(f"{folder}: the pipeline lacks {', '.join(missing)} (a folder and a model_index.json "
                          f"entry each); valid: a FLUX.2 [klein] pipeline folder with {', '.join(COMPONENTS)}")
    return index


def is_digits_pack(folder: Path) -> bool:
    from .digits import CHANNELS, TextEncoder, read_json

    config = read_json(folder / "config.json")
    return config.get("in_channels") == CHANNELS and config.get("joint_attention_dim") == TextEncoder.load().dim


def parse_size(value: str) -> tuple[int, int]:
    """'512' or 'WIDTHxHEIGHT' -> (width, height)."""
    parts = value.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise BonsaiError(f"--size {value}: expected N or WIDTHxHEIGHT in pixels, e.g. 512 or 768x512")
    return (dims[0], dims[-1])


# ---------------------------------------------------------------- the pipeline

def load_pipeline(source: Path, base_pipeline: Path | None = None, backend: str | None = None,
                  device: str | None = None, dtype=None, target: str | None = None, progress: bool = True):
    """(Flux2KleinPipeline with the quantized transformer, pack folder, base pipeline folder)."""
    import torch
    from diffusers import Flux2KleinPipeline

    source = Path(source)
    base = find_base_pipeline(source, base_pipeline)
    if base is None:
        raise BonsaiError(f"{source}: holds no pipeline components (model_index.json, text encoder, VAE, "
                          "scheduler); valid: a release made with --base-pipeline, or --base-pipeline DIR (a "
                          "FLUX.2 [klein] pipeline folder)")
    check_base_pipeline(base)
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    model, folder = load_quantized(source, device, dtype, backend, target)
    try:
        pipe = Flux2KleinPipeline.from_pretrained(str(base), transformer=model, dtype=dtype,
                                                  local_files_only=True)
    except ImportError as e:
        raise BonsaiError(f"{base}: its Qwen3 text encoder needs transformers ({e}); valid: pip install "
                          "'bonsai-quant[qwen3]' (or the cuda extra)") from None
    except (OSError, ValueError, TypeError, KeyError) as e:  # diffusers' and transformers' loading errors
        raise BonsaiError(f"{base}: cannot load the pipeline components ({e})") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)
    expected = pipe.vae.config.latent_channels * 4
    if model.config.in_channels != expected:
        raise BonsaiError(f"{folder}: the transformer takes in_channels {model.config.in_channels}, the base "
                          f"pipeline's VAE gives {expected} (latent channels x 4); valid: the pipeline the pack's "
                          "source came from")
    return pipe, folder, base


def run_pipeline(pipe, prompts: list[str], steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED,
                 size: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE), guidance: float = DEFAULT_GUIDANCE,
                 output_type: str = "pil", max_sequence_length: int = 512):
    """Flux2KleinPipeline's own __call__; image i from a CPU generator seeded `seed + i`."""
    import torch

    multiple = pipe.vae_scale_factor * 2
    width, height = size
    if width % multiple or height % multiple:
        raise BonsaiError(f"--size {width}x{height}: width and height must be multiples of {multiple} for this "
                          f"pipeline's VAE")
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    with torch.no_grad():
        out = pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generators, output_type=output_type,
                   max_sequence_length=max_sequence_length)
    return out.images


def digits_images(model, prompts: list[str], steps: int, seed: int):
    """The digits model's images for `prompts`, from noise seeded `seed + i`, as 64x64 PIL images (ink dark)."""
    import torch
    from PIL import Image

    from .digits import CHANNELS, GRID, TextEncoder, latent_to_image, transformer_velocity
    from .flux2 import euler_sample

    encoder = TextEncoder.load()
    device = next(model.parameters()).device
    text = encoder.encode(prompts).to(device)
    noise = torch.stack([torch.randn(GRID * GRID, CHANNELS, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(len(prompts))])
    with torch.no_grad():
        pixels = latent_to_image(euler_sample(transformer_velocity(model, text), noise.to(device), steps).cpu())
    ink = (255 * (1 - pixels)).round().clamp(0, 255).to(torch.uint8)
    side = pixels.shape[-1] * DIGIT_SCALE
    return [Image.fromarray(im.numpy(), "L").resize((side, side), Image.NEAREST).convert("RGB") for im in ink]


def tile(images: list):
    """Images side by side, in order, on one canvas (one image is returned as it is)."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    width, height = sum(im.width for im in images), max(im.height for im in images)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return canvas


def write_png(image, out: Path, force: bool = False) -> Path:
    """Write `image` to `out` through a hidden temporary beside it, so a failed run leaves nothing."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise BonsaiError(f"--out {out}: expected a .png file name")
    if out.is_dir():
        raise BonsaiError(f"--out {out}: is a folder; valid: a .png file name")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def generate(source: Path, prompts: list[str] | None = None, *, out: Path | None = None, steps: int = DEFAULT_STEPS,
             seed: int = DEFAULT_SEED, size: tuple[int, int] | None = None, guidance: float = DEFAULT_GUIDANCE,
             base_pipeline: Path | None = None, backend: str | None = None, device: str | None = None,
             dtype=None, target: str | None = None, output_type: str = "pil", force: bool = False,
             max_text_tokens: int = 512, progress: bool = True, log=None) -> Generated:
    """Images for `prompts` from the release or pack `source`; with `out`, also written there as one PNG.

    `output_type="latent"` returns the pipeline's final latents instead (klein models only)."""
    import torch

    from .runtime import resolve_pack

    source = Path(source)
    if not source.exists():
        raise BonsaiError(f"{source}: no such release or pack folder")
    if steps < 1:
        raise BonsaiError(f"--steps must be at least 1, got {steps}")
    if out is not None and Path(out).exists() and not force:  # fail before the work, not after it
        raise OutputExistsError(f"{out}: already exists; pass --force to replace it")
    log = log or (lambda m: None)
    pack = resolve_pack(source, "gemlite" if backend == "gemlite" and target is None else target)
    if is_digits_pack(pack):
        from .digits import IMAGE_SIZE
        from .digits import prompt as digit_prompt

        if size is not None:
            raise BonsaiError(f"{pack}: the digits model draws {IMAGE_SIZE}x{IMAGE_SIZE} images; --size does not "
                              "apply")
        if output_type != "pil":
            raise BonsaiError("the digits model has no VAE latents; output_type must be 'pil'")
        prompts = list(prompts) if prompts else [digit_prompt(d) for d in range(10)]
        device = device or default_device()
        model, folder = load_quantized(source, device, torch.float32, backend, target)
        runtime, base = runtime_of(model), None
        log(f"transformer: {folder} (digits model), runtime: {runtime} on {device}")
        images = digits_images(model, prompts, steps, seed)
    else:
        if not prompts:
            raise BonsaiError("give at least one --prompt (or --prompts FILE)")
        pipe, folder, base = load_pipeline(source, base_pipeline, backend, device, dtype, target, progress)
        device, runtime = str(pipe.device), runtime_of(pipe.transformer)
        log(f"transformer: {folder}, runtime: {runtime} on {device}; pipeline components from {base}")
        images = run_pipeline(pipe, prompts, steps, seed, size or (DEFAULT_SIZE, DEFAULT_SIZE), guidance,
                              output_type, max_text_tokens)
    if runtime == "reference" and torch.device(device).type == "cuda":
        log("warning: the reference runtime decodes weights in torch and is slow on CUDA; install the cuda "
            "extra (pip install 'bonsai-quant[cuda]': triton, gemlite) for fast kernels")
    if out is not None and output_type == "pil":
        write_png(tile(images), out, force=force)
    return Generated(images, list(prompts), folder, runtime, str(device), base,
                     {"steps": steps, "seed": seed, "guidance": guidance})


# ---------------------------------------------------------------- CLI

def cmd_generate(args) -> int:
    import torch

    from .calibration import read_prompts

    prompts = list(args.prompt or [])
    if args.prompts is not None:
        prompts += read_prompts(args.prompts)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    result = generate(args.source, prompts, out=args.out, steps=args.steps, seed=args.seed,
                      size=parse_size(args.size) if args.size else None, guidance=args.guidance,
                      base_pipeline=args.base_pipeline, backend=args.backend, device=args.device, dtype=dtype,
                      target=args.target, force=args.force, max_text_tokens=args.max_text_tokens,
                      progress=not args.quiet,
                      log=lambda m: print(m, file=sys.stderr))
    first = result.images[0]
    print(f"wrote {args.out}: {len(result.images)} image(s) of {first.width}x{first.height} "
          f"({result.info['steps']} steps, seed {result.info['seed']}; runtime {result.runtime} on {result.device})")
    return 0


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive integer")
    return n


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="draw images with a release or pack in diffusers' Flux2KleinPipeline",
        description="Load the quantized transformer of a release or pack (through the fastest runtime this "
                    "machine has: cuda, gemlite, or the reference runtime; the choice is printed) into diffusers' "
                    "Flux2KleinPipeline with the text encoder, VAE and scheduler of the base pipeline (the "
                    "release's own, or --base-pipeline), and write the images for the prompts as one PNG, side "
                    "by side. Packs of the built-in digits model are drawn with its own sampler; their prompts "
                    "default to all ten digits.")
    p.add_argument("source", type=Path, help="a release folder, a convert output, or a pack folder")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several images)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="prompt file, one per line (# starts a comment)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=_positive, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="image i uses seed + i (default 0)")
    p.add_argument("--size", help=f"N or WIDTHxHEIGHT in pixels (default {DEFAULT_SIZE})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"guidance scale (default {DEFAULT_GUIDANCE:g}; klein is distilled and ignores it)")
    p.add_argument("--base-pipeline", type=Path, metavar="DIR",
                   help="FLUX.2 [klein] pipeline folder for the text encoder, tokenizer, VAE and scheduler "
                        "(default: the release's own)")
    p.add_argument("--max-text-tokens", type=_positive, default=512,
                   help="prompt tokens given to the transformer (default 512, as klein)")
    p.add_argument("--backend", choices=BACKENDS, help="runtime of the low-bit layers (default: the fastest here)")
    p.add_argument("--target", choices=("mlx", "gemlite", "bonsai"), help="which pack of a release to load")
    p.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="pipeline dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_generate)
    return p

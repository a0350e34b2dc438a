"""Calibration sets: the inputs a FLUX.2 transformer actually sees, taken along real sampling trajectories.

A set is a Hugging Face `datasets` folder (`save_to_disk`, read back offline with `load_from_disk`) plus
`calibration.json`, which records what made it. One row is one trajectory: a prompt's text conditioning and the
latents the FlowMatch-Euler sampler fed the full-precision transformer at each of its steps:

    prompt                 string
    seed                   int64   the noise seed of this trajectory
    encoder_hidden_states  [T, D]  the text conditioning (T text tokens of joint_attention_dim D)
    latents                [S, L, C]  the transformer's `hidden_states` input at step 0..S-1
    timesteps              [S]     the `timestep` input at each step (sigma in [0, 1], as the pipelines pass it)
    img_ids, txt_ids       [L, 4], [T, 4]  positions, as diffusers' FLUX.2 pipelines build them

Storing the text once per trajectory instead of once per call keeps klein sets S times smaller; a transformer
call is (row, step). `CalibrationSet.batches` turns rows back into batched keyword arguments for the forward.

Sets are made by `calibrate` (`bonsai-quant calibrate`): for the digits model from its own prompts, text
embedding and sampler; for a klein-sized model from a prompt file, encoded by the real Qwen3 text encoder when
the user has it (`--text-encoder`), sampled with the full-precision transformer.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import BonsaiError
from .flux2 import KLEIN_SHIFT

META_NAME = "calibration.json"
FORMAT_VERSION = 1
DEFAULT_STEPS = 4             # klein's default number of sampler steps
DEFAULT_SHIFT = KLEIN_SHIFT   # klein's sampler shift (REFERENCE.md §2)
DEFAULT_SEED = 1234           # not the benchmark's seeds (0..9 per digit): calibrate on other noise than we judge
DEFAULT_DIGIT_SAMPLES = 16    # trajectories per digit prompt in the shipped tiny set
DEFAULT_IMAGE_SIZE = 512      # klein calibration images: 32x32 latent tokens
VAE_SCALE = 16                # FLUX.2: 8x VAE downsampling, then 2x2 patches -> one token per 16x16 pixels
MAX_TEXT_TOKENS = 512         # the klein pipeline's max_sequence_length
MAX_SAMPLES_PER_PROMPT = 1000
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# The calibration.json keys a fingerprint covers: how the data was made, not when or from which paths.
DEFINING_SETTINGS = ("format_version", "model_config", "in_channels", "joint_attention_dim", "prompt_count",
                     "samples_per_prompt", "text_tokens", "image_tokens", "grid", "steps", "shift", "seed",
                     "sampler", "model_dtype", "store_dtype", "trajectories", "transformer_calls")


class CalibrationError(BonsaiError):
    """A calibration set is missing, corrupt, or does not fit the model."""


@dataclass
class CalibrationSet:
    path: Path
    dataset: object  # datasets.Dataset with torch formatting
    meta: dict

    @property
    def steps(self) -> int:
        return int(self.meta["steps"])

    @property
    def trajectories(self) -> int:
        return len(self.dataset)

    @property
    def calls(self) -> int:
        """Transformer forwards in one pass over the set."""
        return self.trajectories * self.steps

    def fingerprint(self) -> str:
        """sha256 over the set's data files and the settings that define it: what a pack records to say which set
        made it. Nothing that varies run to run enters (wall-clock seconds, the paths of the prompt file and
        text encoder, whose effect the data carries), so a re-made identical set has the same fingerprint."""
        import hashlib

        digest = hashlib.sha256()
        for file in sorted(self.path.glob("*.arrow")):
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
        settings = {k: self.meta.get(k) for k in DEFINING_SETTINGS}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()

    def check_model(self, config: dict, source: str) -> None:
        """Refuse a model whose input widths differ from the set's (a set made for another model)."""
        want = {"in_channels": self.meta["in_channels"], "joint_attention_dim": self.meta["joint_attention_dim"]}
        bad = [f"{k} is {config.get(k)}, the set has {v}" for k, v in want.items() if config.get(k) != v]
        if bad:
            raise CalibrationError(f"{self.path}: calibration set does not fit {source}: " + "; ".join(bad) +
                                   "; valid: a set made by `bonsai-quant calibrate` for this model")

    def batches(self, batch_size: int = 64, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, max_calls: int | None = None) -> Iterator[dict]:
        """Keyword arguments of the transformer forward, `batch_size` calls at a time (whole trajectories per
        batch, at least one), in set order; `max_calls` stops early (the first calls of the set)."""
        per_batch = max(1, batch_size // self.steps)
        done = 0
        for start in range(0, self.trajectories, per_batch):
            rows = self.dataset[start:start + per_batch]
            latents = rows["latents"]                         # [R, S, L, C]
            r, s = latents.shape[:2]
            text = rows["encoder_hidden_states"]              # [R, T, D]
            call = {
                "hidden_states": latents.reshape(r * s, *latents.shape[2:]),
                "encoder_hidden_states": text[:, None].expand(r, s, *text.shape[1:]).reshape(r * s, *text.shape[1:]),
                "timestep": rows["timesteps"].reshape(r * s),
            }
            if max_calls is not None:
                call = {k: v[:max_calls - done] for k, v in call.items()}
            n = len(call["timestep"])
            yield {**{k: v.to(device=device, dtype=dtype) for k, v in call.items()},
                   "img_ids": rows["img_ids"][0].to(device), "txt_ids": rows["txt_ids"][0].to(device),
                   "return_dict": False}
            done += n
            if max_calls is not None and done >= max_calls:
                return


def load_calibration(path: str | Path) -> CalibrationSet:
    """Open a calibration set folder (memory-mapped; nothing is downloaded)."""
    import datasets

    path = Path(path)
    hint = "a folder written by `bonsai-quant calibrate`, e.g. calibration/flux2-tiny-digits"
    if not path.is_dir():
        raise CalibrationError(f"{path}: no such calibration set folder; valid: {hint}")
    meta_path = path / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"{meta_path}: missing, so {path} is no calibration set; valid: {hint}") from None
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{meta_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CalibrationError(f"{meta_path}: format_version {meta.get('format_version')!r}; valid: {FORMAT_VERSION}")
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ArrowInvalid, ... for a damaged folder
        raise CalibrationError(f"{path}: cannot read the calibration data ({type(e).__name__}: {e})") from None
    missing = {"latents", "timesteps", "encoder_hidden_states", "img_ids", "txt_ids"} - set(dataset.column_names)
    if missing:
        raise CalibrationError(f"{path}: calibration data lacks column(s) {', '.join(sorted(missing))}")
    if len(dataset) == 0:
        raise CalibrationError(f"{path}: the calibration set is empty")
    return CalibrationSet(path, dataset.with_format("torch"), meta)


def resolve_calibration(calib, recipe, wanted: dict[str, str], config: dict, source: str) -> CalibrationSet:
    """The calibration set for a run whose calibrated solvers need statistics of the `wanted` tensors: `calib`
    (a folder or an open set) if given, else the recipe's `calibration:` folder; checked against `config`."""
    if isinstance(calib, CalibrationSet):
        found = calib
    elif calib is not None:
        found = load_calibration(calib)
    elif recipe.calibration is not None:
        try:
            found = load_calibration(recipe.calibration_path())
        except CalibrationError as e:
            raise CalibrationError(f"{recipe.source}:{recipe.calibration_line}: calibration: {e}") from None
    else:
        first = next(iter(wanted))
        raise CalibrationError(f"{first}: a calibrated solver (act-aware, gptq) quantizes it and {len(wanted) - 1} "
                               "more tensor(s), but no calibration set was given; valid: --calib SET, "
                               "`calibration: SET` in the recipe, or a data-free solver (absmean, optimal)")
    found.check_model(config, source)
    return found


# ---------------------------------------------------------------- sampling

@torch.no_grad()
def sample_trajectories(model, text: torch.Tensor, txt_ids: torch.Tensor, img_ids: torch.Tensor,
                        noise: torch.Tensor, steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run klein's FlowMatch-Euler sampler with `model` from `noise [B, L, C]`; returns the transformer's inputs
    at every step: latents [B, S, L, C] (float32, on the CPU) and timesteps [S] (float64)."""
    from .flux2 import euler_sample

    param = next(model.parameters())
    text = text.to(device=param.device, dtype=param.dtype)
    txt_ids, img_ids = txt_ids.to(param.device), img_ids.to(param.device)
    seen_x, seen_t = [], []

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen_x.append(x.float().cpu())
        seen_t.append(float(sigma[0]))
        return model(hidden_states=x.to(param.dtype), encoder_hidden_states=text, timestep=sigma.to(param.dtype),
                     img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

    euler_sample(velocity, noise.to(param.device), steps, shift)
    return torch.stack(seen_x, dim=1), torch.tensor(seen_t, dtype=torch.float64)


def latent_ids(height: int, width: int) -> torch.Tensor:
    """img_ids (0, h, w, 0) of a height x width token grid, as diffusers' FLUX.2 pipelines build them."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))


def text_ids(length: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))


# ---------------------------------------------------------------- text encoders

def digits_text_encoder(model_path: Path, config: dict):
    """The digits model's text embedding (its folder's table, else the shipped one), or None when `config` is
    not a digits model (other input widths)."""
    from .digits import CHANNELS, TEXT_EMBEDDINGS, TextEncoder

    if config.get("in_channels") != CHANNELS:
        return None
    own = Path(model_path) / TEXT_EMBEDDINGS
    try:
        encoder = TextEncoder.load(model_path if own.exists() else None)
    except BonsaiError:
        return None
    return encoder if encoder.dim == config.get("joint_attention_dim") else None


def qwen3_text_encoder(path: Path, device: str,
                       max_tokens: int = MAX_TEXT_TOKENS) -> Callable[[list[str]], torch.Tensor]:
    """klein's text conditioning: Qwen3 hidden states of layers 9, 18 and 27, stacked per token (diffusers'
    Flux2KleinPipeline._get_qwen3_prompt_embeds, called as is). `path`: a klein pipeline folder (its
    text_encoder/ and tokenizer/) or a Qwen3 folder holding its tokenizer."""
    try:
        from transformers import AutoTokenizer, Qwen3ForCausalLM
    except ImportError as e:
        raise BonsaiError(f"--text-encoder needs the transformers package ({e}); valid: pip install transformers, "
                          "or --synthetic-text for timing runs") from None
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    root = Path(path)
    if not root.is_dir():
        raise BonsaiError(f"{root}: no such text encoder folder; valid: a klein pipeline folder or a Qwen3 folder")
    encoder_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else encoder_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        encoder = Qwen3ForCausalLM.from_pretrained(str(encoder_dir), torch_dtype=torch.bfloat16,
                                                   local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise BonsaiError(f"{root}: cannot load a Qwen3 text encoder from it ({e})") from None

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(encoder, tokenizer, prompts, dtype=torch.float32,
                                                           device="cpu", max_sequence_length=max_tokens)

    return encode


def synthetic_text_encoder(dim: int, tokens: int, seed: int) -> Callable[[list[str]], torch.Tensor]:
    """N(0, 1) text conditioning, one seeded draw per prompt: for timing runs on random checkpoints only (a real
    set must come from the real encoder; these inputs are not what a trained model sees)."""
    import hashlib

    def encode(prompts: list[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            digest = hashlib.sha256(f"{seed}:{p}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            out.append(torch.randn(tokens, dim, generator=g))
        return torch.stack(out)

    return encode


# ---------------------------------------------------------------- building a set

def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BonsaiError(f"{path}: prompt file not found; valid: a UTF-8 text file, one prompt per line") from None
    except UnicodeDecodeError:
        raise BonsaiError(f"{path}: prompt file is not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise BonsaiError(f"{path}: holds no prompts (one per line; # starts a comment)")
    return prompts


def default_model_dtype(checkpoint) -> torch.dtype:
    """The dtype to run a full-precision model in for calibration: float32 when it is small (exact statistics,
    cheap), bf16 from 10^9 parameters (klein 4B: 7.75 GB instead of 15.5 GB)."""
    params = sum(info.nbytes // info.dtype.itemsize for info in checkpoint.tensors.values())
    return torch.float32 if params < 10**9 else torch.bfloat16


def load_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A diffusers FLUX.2 checkpoint folder or BFL single file as an eval-mode model (`dense.load_dense`)."""
    from .dense import load_dense
    from .readers.bfl import open_checkpoint

    return load_dense(open_checkpoint(path), dtype=dtype, device=device)


def calibrate(model_path: Path | None, out: Path, prompts_path: Path | None = None, text_encoder: Path | None = None,
              synthetic_text: bool = False, samples_per_prompt: int | None = None, steps: int = DEFAULT_STEPS,
              shift: float = DEFAULT_SHIFT, seed: int = DEFAULT_SEED, image_size: int = DEFAULT_IMAGE_SIZE,
              max_text_tokens: int = MAX_TEXT_TOKENS, device: str = "cpu", dtype: torch.dtype | None = None,
              store_dtype: str | None = None, batch_size: int | None = None, force: bool = False,
              log: Callable[[str], None] = lambda m: None) -> CalibrationSet:
    """Sample calibration trajectories with the full-precision `model_path` and write them as a set to `out`.

    The digits model (no `model_path`, or a checkpoint with the digits input widths) uses its own text embedding
    and, without a prompt file, its ten prompts; the compose model (config `_bonsai_benchmark: compose`) its own
    text embedding and training prompts (compose/calib.py); any other model needs `--prompts` and a text encoder."""
    from .dense import load_dense
    from .digits import GRID, MAX_TOKENS, model_dir, prompt
    from .output import atomic_output, check_output
    from .readers.bfl import open_checkpoint

    if steps < 1:
        raise BonsaiError(f"steps must be at least 1, got {steps}")
    model_path = Path(model_path) if model_path is not None else model_dir()
    sources = (model_path, text_encoder, prompts_path)
    check_output(Path(out), force, sources)  # before minutes of sampling, not after
    checkpoint = open_checkpoint(model_path)
    config = checkpoint.config
    digits = digits_text_encoder(model_path, config) if text_encoder is None else None
    compose = None
    if digits is None and text_encoder is None:
        from .compose import calib as compose_calib

        compose = compose_calib.text_encoder_for(model_path, config)
    prompts_label = str(prompts_path) if prompts_path else "the ten digit prompts 'a handwritten digit d'"
    if compose is not None:
        prompts = read_prompts(prompts_path) if prompts_path else compose_calib.prompts()
        prompts_label = str(prompts_path) if prompts_path else "compose training prompts (compose/calib.py)"
        encode, source, grid = compose.encode, "compose text embedding (fixed table)", compose_calib.GRID_SHAPE
        samples_per_prompt = samples_per_prompt or compose_calib.SAMPLES_PER_PROMPT
        dtype, store_dtype = dtype or torch.float32, store_dtype or "float32"
        txt_len, batch_size = compose_calib.TEXT_TOKENS, batch_size or 64
    elif digits is not None:
        prompts = read_prompts(prompts_path) if prompts_path else [prompt(d) for d in range(10)]
        encode, source = digits.encode, "digits text embedding (fixed table)"
        grid = (GRID, GRID)
        samples_per_prompt = samples_per_prompt or DEFAULT_DIGIT_SAMPLES
        dtype, store_dtype = dtype or torch.float32, store_dtype or "float32"
        txt_len = MAX_TOKENS
        batch_size = batch_size or 64
    else:
        if prompts_path is None:
            raise BonsaiError(f"{model_path}: is not the digits model, so calibration needs --prompts FILE "
                              "(e.g. calibration/klein-prompts.txt)")
        prompts = read_prompts(prompts_path)
        if image_size % VAE_SCALE:
            raise BonsaiError(f"--image-size {image_size} is not a multiple of {VAE_SCALE}")
        grid = (image_size // VAE_SCALE, image_size // VAE_SCALE)
        dim = config.get("joint_attention_dim")
        if text_encoder is not None:
            encode, source = qwen3_text_encoder(text_encoder, device, max_text_tokens), f"Qwen3 ({text_encoder})"
        elif synthetic_text:
            encode, source = synthetic_text_encoder(dim, max_text_tokens, seed), "synthetic N(0,1) (timing only)"
        else:
            raise BonsaiError(f"{model_path}: calibration needs its text encoder: --text-encoder PATH (Qwen3, as in "
                              "the klein pipeline), or --synthetic-text for timing runs on random weights")
        samples_per_prompt = samples_per_prompt or 1
        dtype, store_dtype = dtype or torch.bfloat16, store_dtype or "float16"
        txt_len = max_text_tokens
        batch_size = batch_size or 4
    if store_dtype not in STORE_DTYPES:
        raise BonsaiError(f"store dtype {store_dtype!r}; valid: {', '.join(STORE_DTYPES)}")

    start = time.perf_counter()
    log(f"loading {model_path} ({str(dtype).removeprefix('torch.')} on {device})")
    model = load_dense(checkpoint, dtype=dtype, device=device)
    channels = config["in_channels"]
    img = latent_ids(*grid)
    if samples_per_prompt > MAX_SAMPLES_PER_PROMPT:
        raise BonsaiError(f"--samples-per-prompt {samples_per_prompt}: at most {MAX_SAMPLES_PER_PROMPT}")
    # Sample i of prompt k has its own noise seed, independent of how many samples or prompts there are, so a
    # smaller run reproduces the first trajectories of a larger one (the tests re-derive the shipped set so).
    jobs = [(p, i, noise_seed(seed, k, i)) for k, p in enumerate(prompts) for i in range(samples_per_prompt)]

    def rows():
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b:b + batch_size]
            text = encode([p for p, _, _ in chunk]).float()
            if text.shape[-1] != config["joint_attention_dim"]:
                raise BonsaiError(f"the text encoder gives {text.shape[-1]}-dim features; {model_path} takes "
                                  f"joint_attention_dim {config['joint_attention_dim']}")
            noise = torch.stack([torch.randn(len(img), channels, generator=torch.Generator().manual_seed(s))
                                 for _, _, s in chunk])
            latents, sigmas = sample_trajectories(model, text, text_ids(text.shape[1]), img, noise, steps, shift)
            for j, (p, _, s) in enumerate(chunk):
                yield _row(p, s, text[j], latents[j], sigmas, img, text_ids(text.shape[1]), store_dtype)
            log(f"  {min(b + batch_size, len(jobs))}/{len(jobs)} trajectories, {time.perf_counter() - start:.1f} s")

    meta = {"format_version": FORMAT_VERSION, "model": model_path.name, "model_config": _config_summary(config),
            "in_channels": channels, "joint_attention_dim": config["joint_attention_dim"],
            "prompts": prompts_label,
            "prompt_count": len(prompts), "samples_per_prompt": samples_per_prompt, "text_encoder": source,
            "text_tokens": txt_len, "image_tokens": len(img), "grid": list(grid), "steps": steps, "shift": shift,
            "seed": seed, "sampler": "FlowMatch-Euler (sigmas linspace(1, 1/S, S) shifted), full-precision model",
            "model_dtype": str(dtype).removeprefix("torch."), "store_dtype": store_dtype,
            "trajectories": len(jobs), "transformer_calls": len(jobs) * steps}
    with atomic_output(Path(out), force=force, sources=sources) as tmp:
        _write(tmp, rows, len(img), txt_len, config["joint_attention_dim"], channels, steps, store_dtype)
        meta["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return load_calibration(out)


def noise_seed(seed: int, prompt_index: int, sample: int) -> int:
    return seed * 1_000_003 + prompt_index * MAX_SAMPLES_PER_PROMPT + sample


def _config_summary(config: dict) -> dict:
    keys = ("in_channels", "joint_attention_dim", "num_layers", "num_single_layers", "num_attention_heads",
            "attention_head_dim")
    return {k: config.get(k) for k in keys}


def _row(prompt: str, seed: int, text: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor,
         img: torch.Tensor, txt: torch.Tensor, store_dtype: str) -> dict:
    dtype = STORE_DTYPES[store_dtype]
    stored = {"encoder_hidden_states": text.to(dtype), "latents": latents.to(dtype)}
    for key, value in stored.items():
        if not torch.isfinite(value).all():
            raise BonsaiError(f"calibration {key} of prompt {prompt!r} overflow {store_dtype}; valid: "
                              "--store-dtype float32")
    return {"prompt": prompt, "seed": seed, **{k: v.numpy() for k, v in stored.items()},
            "timesteps": sigmas.numpy(), "img_ids": img.numpy(), "txt_ids": txt.numpy()}


def _write(folder: Path, rows, image_tokens: int, text_tokens: int, dim: int, channels: int, steps: int,
           store_dtype: str) -> None:
    """Stream rows into an Arrow dataset under `folder` (bounded memory: datasets writes as it goes)."""
    import datasets

    features = datasets.Features({
        "prompt": datasets.Value("string"),
        "seed": datasets.Value("int64"),
        "encoder_hidden_states": datasets.Array2D((text_tokens, dim), store_dtype),
        "latents": datasets.Array3D((steps, image_tokens, channels), store_dtype),
        "timesteps": datasets.Sequence(datasets.Value("float64"), length=steps),
        "img_ids": datasets.Array2D((image_tokens, 4), "int64"),
        "txt_ids": datasets.Array2D((text_tokens, 4), "int64"),
    })
    from datasets.arrow_writer import ArrowWriter

    # Written with ArrowWriter rather than Dataset.from_generator: the latter fingerprints the generator by
    # pickling it, which here would mean pickling the whole transformer the rows come from.
    # Staged beside the folder: save_to_disk refuses to write a dataset into the folder its file lives in.
    with tempfile.TemporaryDirectory(prefix=".calibration-rows-", dir=folder.parent) as staging_dir:
        staging = Path(staging_dir) / "rows.arrow"
        writer = ArrowWriter(features=features, path=str(staging), writer_batch_size=16)
        try:
            for row in rows():
                writer.write(row)
            writer.finalize()
        finally:
            writer.close()
        dataset = datasets.Dataset.from_file(str(staging))
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # our own log says how far sampling got; the copy is instant
        try:
            dataset.save_to_disk(str(folder))
        finally:
            if bars:
                datasets.enable_progress_bars()
        del dataset

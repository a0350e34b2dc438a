"""Train flux2-tiny-digits (a real FLUX.2 transformer drawing 8x8 digits) and its judge; write the shipped assets.

    python tools/train_digits.py                     # judge, then generator, then the model card (CPU, ~20 min)
    python tools/train_digits.py --only judge        # just the judge
    python tools/train_digits.py --only generator    # generator with the judge already in place

Data: scikit-learn's `load_digits` (1,797 real 8x8 images, 16 grey levels). The judge (bonsai_quant.digits_judge)
is trained on a stratified 80% split and its accuracy reported on the other 20%; its features on all 1,797
images give the real statistics of the Fréchet distance. The generator is a diffusers `Flux2Transformer2DModel`
(2 double + 2 single blocks, hidden 256, MLP 768, so every quantized in_features is a multiple of 128) trained
with rectified flow on all 1,797 images: x_t = (1 - t) x0 + t noise, target velocity noise - x0, t from a
logit-normal shifted by 3 (klein's sampler shift) mixed with 10% uniform; AdamW, cosine decay, an EMA of the
weights is what ships, in bf16. Everything is seeded: the same command on the same machine gives the same files.
scikit-learn is needed here only; the package reads the written assets.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonsai_quant.digits import (
    CHANNELS,
    MAX_TOKENS,
    MODEL_NAME,
    SHIFT,
    TEXT_EMBEDDINGS,
    VOCAB,
    TextEncoder,
    assets_dir,
    image_to_latent,
    img_ids,
    make_embedding_table,
    prompt,
    shift_sigmas,
    txt_ids,
)
from bonsai_quant.digits_judge import FEATURES, INFO, WEIGHTS, DigitJudge, Judge, feature_stats, frechet_distance
from bonsai_quant.flux2 import CLASS_NAME

TEXT_DIM = 128
CONFIG = dict(
    patch_size=1, in_channels=CHANNELS, out_channels=None, num_layers=2, num_single_layers=2, attention_head_dim=64,
    num_attention_heads=4, joint_attention_dim=TEXT_DIM, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=[16, 16, 16, 16], rope_theta=2000, eps=1e-6, guidance_embeds=False,
)


def load_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [1797, 8, 8], 1 = ink
    return images, torch.tensor(d.target, dtype=torch.long)


# ---------------------------------------------------------------- judge

def train_judge(images, labels, out: Path, seed: int, epochs: int) -> dict:
    from sklearn.model_selection import train_test_split

    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=seed,
                                           stratify=labels.numpy())
    xtr, ytr = images[idx_train], labels[idx_train]
    xte, yte = images[idx_test], labels[idx_test]
    torch.manual_seed(seed)
    net = DigitJudge(FEATURES, dropout=0.25)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(ytr), generator=g)
        total = 0.0
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            x = xtr[b]
            # +-1 pixel shifts: the judge must read generated digits, which need not be perfectly centred
            dy, dx = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(F.pad(x, (1, 1, 1, 1)), (dy, dx), (1, 2))[:, 1:-1, 1:-1]
            loss = F.cross_entropy(net(x), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        if (epoch + 1) % 10 == 0:
            print(f"judge epoch {epoch + 1}: train loss {total / len(ytr):.4f}")
    net.eval()
    with torch.no_grad():
        acc_test = float((net(xte).argmax(1) == yte).double().mean())
        acc_train = float((net(xtr).argmax(1) == ytr).double().mean())
        feats_all = net.features(images)
        feats_test = net.features(xte)
    mean, cov = feature_stats(feats_all)
    fd_test = frechet_distance(*feature_stats(feats_test), mean, cov)
    print(f"judge: train accuracy {acc_train:.4f}, held-out accuracy {acc_test:.4f} ({len(yte)} images); "
          f"FD(real held-out, all real) = {fd_test:.3f}")
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    tensors["real_mean"] = torch.from_numpy(mean)
    tensors["real_cov"] = torch.from_numpy(cov)
    save_file(tensors, str(out / WEIGHTS))
    info = {"name": "digits-judge", "architecture": DigitJudge.__doc__, "features": FEATURES,
            "data": "sklearn.datasets.load_digits (1797 images, 8x8, pixels/16)",
            "split": {"method": "sklearn train_test_split, stratified", "test_size": 0.2, "random_state": seed,
                      "train": len(ytr), "held_out": len(yte)},
            "training": {"epochs": epochs, "optimizer": "Adam lr 1e-3 wd 1e-4", "batch": 64, "dropout": 0.25,
                         "augmentation": "random +-1 pixel shift per batch"},
            "train_accuracy": round(acc_train, 4), "held_out_accuracy": round(acc_test, 4),
            "real_stats": "real_mean, real_cov in judge.safetensors: float64 features of all 1797 images",
            "frechet_distance_real_held_out": round(fd_test, 4)}
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---------------------------------------------------------------- generator

def sample_t(n: int, g: torch.Generator) -> torch.Tensor:
    t = shift_sigmas(torch.sigmoid(torch.randn(n, generator=g)), SHIFT)
    uniform = torch.rand(n, generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, uniform, t)


@torch.no_grad()
def quick_accuracy(model, encoder, judge, samples=20, steps=4) -> float:
    from bonsai_quant.evaluate import generate_digits, score

    return score(generate_digits(model, encoder, samples, steps, seed=1), judge)["accuracy"]


def train_generator(images, labels, encoder, judge, args) -> tuple[torch.nn.Module, dict]:
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(args.seed)
    model = Flux2Transformer2DModel(**CONFIG).to(args.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    print(f"generator: {params:,} parameters; {args.steps} steps of batch {args.batch} on {args.device}")
    x0_all = image_to_latent(images)
    text_all = encoder.encode([prompt(d) for d in range(10)])
    ids_img, ids_txt = img_ids().to(args.device), txt_ids(MAX_TOKENS).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    g = torch.Generator().manual_seed(args.seed + 1)
    curve, window, start = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        b = torch.randint(0, len(labels), (args.batch,), generator=g)
        # every random draw comes from the CPU generator, so CPU and GPU runs see the same batches
        x0, text = x0_all[b], text_all[labels[b]]
        noise = torch.randn(x0.shape, generator=g)
        t = sample_t(args.batch, g)
        x0, text, noise, t = (v.to(args.device) for v in (x0, text, noise, t))
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = model(hidden_states=xt, encoder_hidden_states=text, timestep=t, img_ids=ids_img, txt_ids=ids_txt,
                  return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            entry = {"step": step, "loss": round(float(np.mean(window)), 5),
                     "seconds": round(time.perf_counter() - start, 1)}
            if step % args.eval_every == 0 or step == args.steps:
                entry["ema_accuracy_4_steps"] = quick_accuracy(ema.eval(), encoder, judge, steps=4)
                entry["ema_accuracy_20_steps"] = quick_accuracy(ema, encoder, judge, steps=20)
            curve.append(entry)
            print("  ".join(f"{k} {v}" for k, v in entry.items()), flush=True)
            window = []
    return ema.cpu(), {"parameters": params, "curve": curve, "seconds": round(time.perf_counter() - start, 1),
                       "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else
                       f"CPU, {torch.get_num_threads()} thread(s)"}


def write_model(ema, out: Path, encoder_table: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the fp32-modules note of .to(): this model has none
    ema.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    config = json.loads((tmp / "config.json").read_text())
    assert config["_class_name"] == CLASS_NAME
    save_file({"embeddings": encoder_table.contiguous()}, str(tmp / TEXT_EMBEDDINGS),
              metadata={"vocab": json.dumps(list(VOCAB))})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def measure(out: Path, encoder, judge) -> dict:
    """Scores of the shipped (bf16) weights, loaded exactly as `bonsai-quant eval` loads them."""
    from bonsai_quant.eval_models import LoadedModel, load_full_precision
    from bonsai_quant.evaluate import DEFAULT_SAMPLES, evaluate, save_grid

    model = load_full_precision(out, encoder)
    results = {}
    for steps in (4, 8, 20):
        report, images = evaluate(LoadedModel(model, str(out), "full-precision"), DEFAULT_SAMPLES, steps,
                                  encoder=encoder, judge=judge)
        results[steps] = {"accuracy": report["accuracy"], "frechet_distance": round(report["frechet_distance"], 3),
                          "per_digit_accuracy": report["per_digit_accuracy"]}
        save_grid(images, out / f"samples-{steps}-steps.png")
        print(f"shipped model, {steps} steps: accuracy {report['accuracy']:.4f}, "
              f"FD {report['frechet_distance']:.3f}", flush=True)
    return results


def model_card(out: Path, args, train: dict, results: dict, judge_info: dict) -> None:
    curve = train["curve"]
    marks = [c for c in curve if "ema_accuracy_4_steps" in c]
    lines = [
        f"# {MODEL_NAME}",
        "",
        "A real diffusers `Flux2Transformer2DModel` (the class and block structure of FLUX.2 [klein] 4B, tiny dims)",
        "trained as a rectified-flow generator of 8x8 handwritten digits, prompted by \"a handwritten digit 7\".",
        "It is bonsai-quant's built-in model: small enough to generate and score on a laptop CPU in seconds, real",
        "enough that binary and ternary quantization can be judged by the images it draws (`bonsai-quant eval`).",
        "",
        "## Model",
        "",
        f"- config: {json.dumps({k: v for k, v in CONFIG.items() if v is not None})}",
        f"- {train['parameters']:,} parameters, stored in bf16 (`diffusion_pytorch_model.safetensors`).",
        "  Hidden 256 (4 heads x 64), MLP 768, single-block fused output 1024: every quantized in_features is a",
        "  multiple of 128.",
        "- latents: the 8x8 image in [-1, 1] as 16 tokens of 2x2 patches (4 channels) on a 4x4 grid;",
        "  img_ids (0, h, w, 0), txt_ids (0, 0, 0, l) as in diffusers' FLUX.2 pipelines.",
        f"- text: `{TEXT_EMBEDDINGS}`, a fixed N(0,1) table (seed {args.seed}, never trained) over the words",
        f"  of the prompt (a, handwritten, digit, zero..nine; numerals map to the words), padded to {MAX_TOKENS}",
        f"  tokens of {TEXT_DIM} dims: encoder_hidden_states [B, {MAX_TOKENS}, {TEXT_DIM}].",
        "- sampler: FlowMatch-Euler as klein: sigmas linspace(1, 1/S, S) shifted by 3.0, timestep = sigma in [0, 1],",
        "  the model predicts the velocity noise - x0. No guidance.",
        "",
        "## Training (`tools/train_digits.py`)",
        "",
        "- data: `sklearn.datasets.load_digits`, all 1,797 images (pixels / 16).",
        f"- {args.steps} steps, batch {args.batch}, AdamW lr {args.lr} (100 warm-up steps, cosine to 0), weight decay",
        f"  0.01, grad clip 1.0, EMA {args.ema} (shipped); t: logit-normal shifted by 3.0, 10% uniform; fp32 on",
        f"  {train['device']}, {train['seconds'] / 60:.1f} minutes, seed {args.seed}.",
        f"- final training loss (mean of the last {args.log_every} steps): {curve[-1]['loss']}",
        "- loss and judge accuracy of the EMA weights (20 samples per digit) during training:",
        "",
        "| step | loss | accuracy (4 steps) | accuracy (20 steps) |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {c['step']} | {c['loss']} | {c['ema_accuracy_4_steps']:.3f} | {c['ema_accuracy_20_steps']:.3f} |"
          for c in marks],
        "",
        "## Quality of the shipped bf16 weights",
        "",
        f"Judged by `digits-judge` (held-out accuracy {judge_info['held_out_accuracy']:.4f}), "
        f"{100} samples per digit, seed 0",
        f"(`bonsai-quant eval --steps S`). Real held-out digits score FD "
        f"{judge_info['frechet_distance_real_held_out']:.3f} against all real digits.",
        "",
        "| Euler steps | accuracy | Fréchet distance |",
        "| ---: | ---: | ---: |",
        *[f"| {s} | {r['accuracy']:.4f} | {r['frechet_distance']:.3f} |" for s, r in results.items()],
        "",
        "Samples (first 10 per digit, one row per digit) at 4, 8 and 20 steps:",
        "",
        "![4 steps](samples-4-steps.png) ![8 steps](samples-8-steps.png) ![20 steps](samples-20-steps.png)",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    (out / "training.json").write_text(json.dumps({"args": vars(args), "config": CONFIG, **train,
                                                   "shipped_quality": results}, indent=2, default=str) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("judge", "generator"))
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge-epochs", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the same seeds; GPU numerics differ slightly)")
    ap.add_argument("--assets", type=Path, default=assets_dir(), help="where to write the assets")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, labels = load_data()
    judge_out, model_out = args.assets / "digits-judge", args.assets / MODEL_NAME
    if args.only != "generator":
        train_judge(images, labels, judge_out, args.seed, args.judge_epochs)
    if args.only == "judge":
        return 0
    judge = Judge.load(judge_out)
    table = make_embedding_table(TEXT_DIM, args.seed)
    encoder = TextEncoder(table)
    ema, train = train_generator(images, labels, encoder, judge, args)
    write_model(ema, model_out, table)
    results = measure(model_out, encoder, judge)
    model_card(model_out, args, train, results, judge.info)
    print(f"wrote {model_out} and {judge_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

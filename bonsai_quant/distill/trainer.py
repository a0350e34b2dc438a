"""`bonsai-quant distill`: quantization-aware distillation of a FLUX.2 transformer from its full-precision self.

The teacher is the full-precision model; the student the same model with every linear the recipe quantizes in
fake-quantized form (`student.FakeQuantLinear`), initialised from the recipe's post-training solver, so step 0
is exactly the `convert` result. The loss is the mean squared difference of their velocities on points of the
teacher's own sampling trajectories (a calibration set: no image data), plus, optionally, a flow-matching loss
on real digits. accelerate runs it on a CPU, one GPU or several (`accelerate launch`, DDP or FSDP) with bf16
autocast if asked; checkpoints land in a state folder every `checkpoint_every` steps and `--resume` picks up
from the last one. The result is exported through `convert`'s path (`export.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import BonsaiError
from ..output import check_output
from ..recipe import Recipe
from .inputs import process_slice
from .settings import DistillSettings

STATE_PREFIX = "step-"
KEEP_CHECKPOINTS = 2
TRAINER_STATE = "trainer.json"


@dataclass
class DistillOptions:
    model: Path
    recipe: Recipe
    out: Path
    settings: DistillSettings
    calib: Path | None = None
    targets: tuple[str, ...] | None = None
    force: bool = False
    resume: bool = False
    state_dir: Path | None = None
    checkpoint_every: int = 50
    eval_every: int = 0
    eval_samples: int = 20
    gradient_checkpointing: bool = False
    mixed_precision: str | None = None  # None: accelerate's config / `accelerate launch` decides
    cpu: bool = False
    save_checkpoint: bool = False
    keep_state: bool = False
    verbose: bool = True

    @property
    def sources(self) -> tuple:
        """What the output must never be, hold or lie inside: the teacher and its calibration set."""
        return (self.model, self.calib or self.recipe.calibration_path())

    @property
    def state(self) -> Path:
        return self.state_dir or self.out.with_name(self.out.name + ".distill-state")


def checkpoints(state: Path) -> list[Path]:
    return sorted(p for p in state.glob(f"{STATE_PREFIX}*") if p.is_dir()) if state.is_dir() else []


def lr_factor(step: int, settings: DistillSettings) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to zero at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / (settings.warmup_steps + 1)
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup_steps) / span))


def run_fingerprint(opts: DistillOptions, calib) -> dict:
    """What a checkpoint must share with the run resuming it."""
    return {"model": str(Path(opts.model).resolve()),
            "recipe_sha256": hashlib.sha256(opts.recipe.text.encode()).hexdigest(),
            "settings": opts.settings.to_dict(), "calibration": calib.fingerprint(),
            "targets": list(opts.targets or opts.recipe.targets)}


class Trainer:
    def __init__(self, opts: DistillOptions):
        from accelerate import Accelerator

        self.opts, self.settings = opts, opts.settings
        for key, what, valid in self.settings.problems():
            raise BonsaiError(f"distill setting {key}: {what}; valid: {valid}")
        # accelerate runs several CPU processes (gloo) only when told cpu=True: without a GPU there is no choice.
        self.acc = Accelerator(mixed_precision=opts.mixed_precision, cpu=opts.cpu or not torch.cuda.is_available())
        self.main = self.acc.is_main_process
        self.part = process_slice(self.settings.batch_size, self.acc.process_index, self.acc.num_processes)

    def log(self, msg: str) -> None:
        if self.main and self.opts.verbose:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    # ------------------------------------------------------------------ setup

    def check_paths(self) -> Path | None:
        """Refuse to clobber output or an earlier run's state; returns the checkpoint to resume from."""
        opts, state = self.opts, self.opts.state
        check_output(opts.out, opts.force, opts.sources)
        found = checkpoints(state)
        if found and not opts.resume and not opts.force:
            raise BonsaiError(f"{state}: holds checkpoints of an earlier run (last: {found[-1].name}); valid: "
                              "--resume to continue it, --force to start over, or another --state-dir")
        if opts.resume:
            if not found:
                self.log(f"--resume: no checkpoint in {state}; starting from step 0")
            return found[-1] if found else None
        if self.main and state.exists():
            shutil.rmtree(state)
        self.acc.wait_for_everyone()
        return None

    def load(self, resume_from: Path | None) -> None:
        from ..calibration import default_model_dtype, load_calibration
        from ..checkpoint import Checkpoint
        from ..dense import load_dense
        from ..plan import make_plan
        from .inputs import DigitsData, TrajectoryInputs

        opts = self.opts
        checkpoint = Checkpoint(opts.model)
        self.plan = make_plan(checkpoint, opts.recipe, opts.targets)
        calib_path = opts.calib or opts.recipe.calibration_path()
        if calib_path is None:
            raise BonsaiError("distill needs a calibration set (the teacher's sampling trajectories it trains on); "
                              "valid: --calib SET (e.g. calibration/flux2-tiny-digits, or one made by "
                              "`bonsai-quant calibrate`), or `calibration:` in the recipe")
        self.calib = load_calibration(calib_path)
        self.calib.check_model(checkpoint.config, str(checkpoint.path))
        self.fingerprint = run_fingerprint(opts, self.calib)
        self.inputs = TrajectoryInputs(self.calib, continuous=self.settings.inputs == "continuous")

        device = self.acc.device
        big = default_model_dtype(checkpoint) != torch.float32
        teacher_dtype = torch.bfloat16 if big or self.acc.mixed_precision == "bf16" else torch.float32
        self.log(f"teacher: {checkpoint.path} ({str(teacher_dtype).removeprefix('torch.')} on {device}); "
                 f"calibration: {self.calib.path} ({self.calib.trajectories} trajectories x {self.calib.steps} steps)")
        self.teacher = load_dense(checkpoint, dtype=teacher_dtype, device=str(device)).requires_grad_(False)
        student = load_dense(checkpoint, dtype=torch.float32, device="cpu")
        self.init_solvers = self.make_student(student, resume_from is None)
        self.digits = self.encoder = None
        if self.settings.data_loss > 0 or opts.eval_every:
            from ..calibration import digits_text_encoder

            self.encoder = digits_text_encoder(checkpoint.path, checkpoint.config)
            if self.encoder is None:
                raise BonsaiError(f"{checkpoint.path}: data_loss and --eval-every need a FLUX.2 digits model "
                                  "(the real data and the quality benchmark exist only for it); valid: data_loss: 0 "
                                  "and no --eval-every")
        if self.settings.data_loss > 0:
            self.digits = DigitsData(self.encoder)

        if opts.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        student.train()
        self.student = student.to(device)
        # fused on a GPU: the foreach path makes temporaries the size of whole parameter groups (16 GB at klein)
        self.optimizer = torch.optim.AdamW(self.param_groups(), betas=(0.9, 0.99), weight_decay=0.0,
                                           fused=device.type == "cuda")
        self.student, self.optimizer = self.acc.prepare(self.student, self.optimizer)

    def make_student(self, student: torch.nn.Module, initialise: bool) -> dict[str, int]:
        """Swap each quantized linear for a FakeQuantLinear holding the recipe solver's codes and scales (or
        placeholders, when a checkpoint will overwrite them); returns {solver: tensors}."""
        from ..quantizers import quantize, statistics_needed
        from .student import FakeQuantLinear, install

        recipe, plan = self.opts.recipe, self.plan
        stats = None
        wanted = statistics_needed(plan.quantized)
        if initialise and wanted:
            from ..stats import BlockStats

            stats = BlockStats(self.teacher, self.calib, wanted, log=self.log)
        solvers: dict[str, int] = {}
        for d in plan.quantized:
            linear = student.get_submodule(d.module)
            if initialise:
                q = quantize(linear.weight.detach(), d.mode, recipe.group_size, plan.scale_dtype, d.solver,
                             name=d.name, stats=stats.get(d.name) if stats is not None else None)
                layer = FakeQuantLinear.from_quantized(linear, q.codes, q.scales, d.mode, recipe.group_size)
            else:
                out_f, in_f = linear.weight.shape
                layer = FakeQuantLinear(linear.weight.detach(), torch.zeros(out_f, in_f // recipe.group_size),
                                        linear.bias.detach() if linear.bias is not None else None, d.mode,
                                        recipe.group_size, plan.scale_dtype)
            install(student, d.module, layer)
            solvers[d.solver] = solvers.get(d.solver, 0) + 1
        return solvers

    def param_groups(self) -> list[dict]:
        from .student import FakeQuantLinear

        s = self.settings
        latent, scales, kept = [], [], []
        for module in self.student.modules():
            if isinstance(module, FakeQuantLinear):
                latent.append(module.weight)
                scales.append(module.scales)
                if module.bias is not None:
                    kept.append(module.bias)
        quantized_ids = {id(p) for p in latent + scales + kept}
        kept += [p for p in self.student.parameters() if id(p) not in quantized_ids]
        for p in kept:
            p.requires_grad_(s.train_kept)
        groups = [{"params": latent, "lr": s.lr, "base_lr": s.lr},
                  {"params": scales, "lr": s.scale_lr, "base_lr": s.scale_lr}]
        if s.train_kept:
            groups.append({"params": kept, "lr": s.kept_lr, "base_lr": s.kept_lr})
        return groups

    # ------------------------------------------------------------------ training

    def loss(self, step: int) -> torch.Tensor:
        device, s = self.acc.device, self.settings
        batch = {k: v.to(device) for k, v in self.inputs.batch(s.seed, step, s.batch_size, self.part).items()}
        with torch.no_grad(), self.acc.autocast():
            target = self.teacher(**{k: (v.to(self.teacher.dtype) if v.is_floating_point() else v)
                                     for k, v in batch.items()}, return_dict=False)[0].float()
        with self.acc.autocast():
            loss = F.mse_loss(self.student(**batch, return_dict=False)[0].float(), target)
        if self.digits is not None:
            data, velocity = self.digits.batch(s.seed, step, s.batch_size, self.part)
            with self.acc.autocast():
                pred = self.student(**{k: v.to(device) for k, v in data.items()}, return_dict=False)[0].float()
            loss = loss + s.data_loss * F.mse_loss(pred, velocity.to(device))
        return loss

    def train(self) -> dict:
        from tqdm import tqdm

        resume_from = self.check_paths()
        self.load(resume_from)
        history: list[dict] = []
        start = 0
        if resume_from is not None:
            start, history = self.restore(resume_from)
        s, opts = self.settings, self.opts
        began = time.perf_counter()
        bar = tqdm(total=s.steps, initial=start, desc="distill", unit="step", file=sys.stderr,
                   disable=not (self.main and opts.verbose and sys.stderr.isatty()))
        if start == 0 and opts.eval_every:
            history.append({"step": 0, **self.evaluate()})
        for step in range(start, s.steps):
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, s)
            loss = self.loss(step)
            self.acc.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            value = float(self.acc.reduce(loss.detach(), "mean"))
            if not math.isfinite(value):
                raise BonsaiError(f"distill: the loss became {value} at step {step + 1}; valid: a lower lr "
                                  f"(now {s.lr}) or scale_lr (now {s.scale_lr}), or --mixed-precision no")
            history.append({"step": step + 1, "loss": value})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}")
            done = step + 1
            if opts.eval_every and done % opts.eval_every == 0:
                history.append({"step": done, **self.evaluate()})
            if done % opts.checkpoint_every == 0 and done < s.steps:
                self.save(done, history)
                self.log(f"step {done}/{s.steps}: loss {value:.5g} (checkpoint saved)")
        bar.close()
        if opts.eval_every and s.steps % opts.eval_every:
            # The last score reported must be the exported packs' (the student's forward is exactly theirs), not
            # that of the last multiple of eval_every; the same test on every process, so all take part.
            history.append({"step": s.steps, **self.evaluate()})
        seconds = time.perf_counter() - began
        return self.finish(history, start, seconds)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The digits quality benchmark on the student (its forward is exactly the pack's), main process only."""
        result = {}
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.FSDP:
            self.log("quality evaluation skipped: the student is sharded (FSDP); evaluate the packs afterwards")
        elif self.main:
            from ..eval_models import LoadedModel
            from ..evaluate import evaluate

            model = self.acc.unwrap_model(self.student)
            params = dict(model.named_parameters())
            master = {d.name: params[d.name].detach().clone() for d in self.plan.kept}
            for d in self.plan.kept:  # judge the weights the pack will hold: kept tensors in their 16-bit dtype
                params[d.name].data.copy_(master[d.name].to(d.kept_dtype).float())
            model.eval()
            try:
                report, _ = evaluate(LoadedModel(model, "student", "fake-quant"), samples=self.opts.eval_samples,
                                     encoder=self.encoder)
            finally:
                model.train()
                for name, value in master.items():
                    params[name].data.copy_(value)
            result = {"accuracy": report["accuracy"], "frechet_distance": report["frechet_distance"],
                      "samples_per_digit": self.opts.eval_samples}
            self.log(f"quality ({self.opts.eval_samples} per digit, 4 steps): accuracy {result['accuracy']:.3f}, "
                     f"FD {result['frechet_distance']:.1f}")
        self.acc.wait_for_everyone()
        return result

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int, history: list[dict]) -> None:
        state = self.opts.state
        final = state / f"{STATE_PREFIX}{step:07d}"
        partial = state / f".{final.name}.partial"
        if self.main:
            state.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(partial))
        self.acc.wait_for_everyone()
        if self.main:
            (partial / TRAINER_STATE).write_text(json.dumps(
                {"step": step, "history": history, "fingerprint": self.fingerprint}, indent=1) + "\n")
            os.replace(partial, final)  # a kill mid-save leaves only a .partial folder, never a broken step-N
            for old in checkpoints(state)[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old)
        self.acc.wait_for_everyone()

    def restore(self, folder: Path) -> tuple[int, list[dict]]:
        meta = json.loads((folder / TRAINER_STATE).read_text())
        differ = [k for k, v in self.fingerprint.items() if meta["fingerprint"].get(k) != v]
        if differ:
            raise BonsaiError(f"{folder}: this checkpoint is from a run with other {', '.join(differ)}; valid: "
                              "resume with the same model, recipe, settings, calibration set and targets, or "
                              "--force to start over")
        self.acc.load_state(str(folder))
        self.log(f"resumed from {folder} (step {meta['step']} of {self.settings.steps})")
        return int(meta["step"]), meta["history"]

    # ------------------------------------------------------------------ export

    def finish(self, history: list[dict], start: int, seconds: float) -> dict:
        from ..output import atomic_output
        from .export import export

        opts = self.opts
        losses = [h["loss"] for h in history if "loss" in h]
        evals = [h for h in history if "accuracy" in h]
        record = {
            "tool": {"name": "bonsai-quant", "version": __version__},
            "teacher": Path(opts.model).name,
            "recipe": opts.recipe.to_dict(),
            "recipe_yaml": opts.recipe.text,
            "init_solvers": self.init_solvers,
            "settings": self.settings.to_dict(),
            "calibration": {"set": self.calib.path.name, "fingerprint": self.fingerprint["calibration"],
                            "trajectories": self.calib.trajectories, "steps": self.calib.steps},
            "processes": self.acc.num_processes,
            "mixed_precision": self.acc.mixed_precision,
            "gradient_checkpointing": opts.gradient_checkpointing,
            "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                     "last_10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None},
            **({"quality": evals[-1]} if evals else {}),
        }
        report = {}
        state = self.acc.get_state_dict(self.student)  # every process takes part: FSDP gathers the shards here
        if self.main:
            with atomic_output(opts.out, force=opts.force, sources=opts.sources) as tmp:
                report = export(state, opts.model, self.plan, tmp, record, opts.save_checkpoint)
                log = {"record": record, "history": history, "resumed_at_step": start or None,
                       "seconds_this_run": round(seconds, 3), "device": str(self.acc.device)}
                (tmp / "distill.json").write_text(json.dumps(log, indent=1) + "\n")
            report["distill"] = record
            if not opts.keep_state:  # the packs are complete: the checkpoints (weights + Adam) are spent
                shutil.rmtree(opts.state, ignore_errors=True)
        self.acc.wait_for_everyone()
        return report


def distill(opts: DistillOptions) -> dict:
    trainer = Trainer(opts)
    try:
        return trainer.train()
    finally:
        trainer.acc.end_training()  # tears down the process group of a multi-process run

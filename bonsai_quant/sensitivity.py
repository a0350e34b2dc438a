"""Which tensors should stay 16-bit: rank layers by how much quantizing each one alone changes the output.

For every Linear weight that could be quantized (a multiple of the group size wide), including those the
published recipe keeps, the transformer is run over the calibration set with only that tensor replaced by its
quantized value, and its sensitivity is the relative change of the output (the predicted velocity):

    sum ||f_q(x) - f(x)||^2 / sum ||f(x)||^2   over the calibration calls

The keep set is then the most sensitive tensors, taken in ranking order while their 16-bit bytes fit the
budget (a tensor that does not fit is skipped, a smaller one further down may still fit). The default budget
is what the published keep set spends on such tensors, so the comparison with it is at equal bytes.
`write_recipe` turns the choice into a strict recipe: keep rules for chosen tensors the planner would
quantize, quantize rules for published-kept tensors not chosen.

Quantizing a tensor changes nothing before the transformer block it lives in, so each measurement re-runs only
the blocks from that one on (`BlockReplay`): the blocks before return the outputs they gave on the unchanged
model, captured once per starting block. The scores are those of whole forwards, bit for bit (same operations on
the same inputs); the test suite checks that against whole forwards for every candidate.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import BonsaiError
from .flux2 import inventory
from .packing.formats import SCALE_DTYPES
from .plan import DEFAULT_QUANTIZED_ROLES, decide_all
from .quantizers import CALIBRATED_SOLVERS, dequantize, quantize
from .recipe import DEFAULT_SOLVERS, Recipe, default_recipe, parse_recipe

BYTES_16 = 2


@dataclass(frozen=True)
class Sensitivity:
    name: str
    role: str
    shape: tuple[int, int]
    published_keep: bool   # the published (default) recipe keeps it 16-bit
    score: float           # relative output change with only this tensor quantized
    bytes16: int           # bytes kept in 16-bit


def candidates(model: torch.nn.Module, group_size: int) -> dict[str, object]:
    """Every Linear weight the group size can divide: what a keep set can choose from."""
    specs = inventory(dict(model.config))
    return {n: s for n, s in specs.items() if s.is_linear_weight and s.shape[1] % group_size == 0}


def start_block(name: str, double_blocks: int, blocks: int) -> int:
    """The first transformer block (double blocks, then single blocks, counted together) whose output changes when
    only tensor `name` is quantized; `blocks` (the count of both kinds) when it acts after every block."""
    top, _, rest = name.partition(".")
    if top == "transformer_blocks":
        return int(rest.partition(".")[0])
    if top == "single_transformer_blocks":
        return double_blocks + int(rest.partition(".")[0])
    if top == "single_stream_modulation":  # its output modulates the single blocks only
        return double_blocks
    if top in ("norm_out", "proj_out"):  # the output layers, after every block (norm_out reads the time embedding)
        return blocks
    return 0  # embedders, time embedding, double-stream modulation: they feed the first block


def _returning(value):
    return lambda *args, **kwargs: value


class _Captured(Exception):
    """Raised by a hook once the last block whose outputs are wanted has run: the rest of that forward is not."""


class BlockReplay:
    """A FLUX.2 transformer over fixed batches, re-running only the blocks from `start` on.

    The blocks before `start` return, without running, the outputs they gave on the unchanged model for that batch
    (so a weight may change only in block `start` or later). Those outputs are captured when `start` advances: a
    pass that stops after the block before it. At most two blocks' outputs are held at a time (that block's and,
    past the double blocks, the last double block's, which the concatenation of the two streams needs)."""

    def __init__(self, model: torch.nn.Module, batches: list[dict]):
        self.model, self.batches = model, batches
        self.double = len(getattr(model, "transformer_blocks", ()))
        self.blocks = [*getattr(model, "transformer_blocks", ()), *getattr(model, "single_transformer_blocks", ())]
        self.start = 0
        self.saved: dict[int, list] = {}  # block index -> its outputs on the unchanged model, one per batch

    def _output(self, i: int, batch: int):
        """What skipped block i returns: the saved output of the last skipped block of its kind (only the block
        just before `start` and the last double block feed anything that runs; the others just need the type)."""
        last = self.start - 1
        same_kind = (i < self.double) == (last < self.double)
        return self.saved[last if same_kind else self.double - 1][batch]

    @contextlib.contextmanager
    def _skipping(self, batch: int):
        for i in range(self.start):
            self.blocks[i].forward = _returning(self._output(i, batch))
        try:
            yield
        finally:
            for i in range(self.start):
                del self.blocks[i].forward

    def advance(self, start: int) -> None:
        """Replay from block `start` on (no earlier than the current start), on the unchanged model."""
        if start < self.start:
            raise ValueError(f"replay start {start} is before the current one, {self.start}")
        if start == self.start:
            return
        wanted = {start - 1} | ({self.double - 1} if self.double and start - 1 >= self.double else set())
        captured = {j: self.saved[j] for j in wanted if j in self.saved}
        missing = sorted(wanted - set(captured))
        for j in missing:
            captured[j] = []

        def hook(module, args, output, j):
            captured[j].append(output)
            if j == missing[-1]:
                raise _Captured

        handles = [self.blocks[j].register_forward_hook(lambda m, a, o, j=j: hook(m, a, o, j)) for j in missing]
        try:
            for batch in range(len(self.batches) if missing else 0):
                try:
                    self.forward(batch)
                except _Captured:
                    pass
        finally:
            for h in handles:
                h.remove()
        self.start, self.saved = start, captured

    def forward(self, batch: int) -> torch.Tensor:
        """The model's output on batch `batch`, running the blocks from `start` on."""
        with self._skipping(batch):
            return self.model(**self.batches[batch])[0]


@torch.no_grad()
def measure(model: torch.nn.Module, calib, mode: str, solver: str | None = None, group_size: int = 128,
            scale_dtype: str = "float16", batch_size: int = 64, max_calls: int | None = None,
            log: Callable[[str], None] = lambda m: None, progress: bool = False) -> list[Sensitivity]:
    """Sensitivities of every candidate tensor of `model` (full precision, left unchanged), most sensitive first.

    Each tensor's row goes to `log` as soon as it is measured; `progress` adds a bar (on a terminal)."""
    from tqdm import tqdm

    solver = solver or DEFAULT_SOLVERS[mode]
    param = next(model.parameters())
    batches = list(calib.batches(batch_size, device=param.device, dtype=param.dtype, max_calls=max_calls))
    log(f"reference forward over {sum(len(b['timestep']) for b in batches)} calibration calls")
    reference = [model(**b)[0].float() for b in batches]
    ref2 = sum(float(r.square().sum()) for r in reference)
    if ref2 == 0:
        raise BonsaiError(f"{calib.path}: the model's output is zero on every calibration call; nothing to rank")
    published = {d.name for d in decide_all(inventory(dict(model.config)),
                                            {n: p.dtype for n, p in model.named_parameters()},
                                            default_recipe(mode)) if d.action == "keep"}
    params = dict(model.named_parameters())
    found = candidates(model, group_size)
    stats = {}
    if solver in CALIBRATED_SOLVERS:
        from .stats import collect_stats

        log(f"statistics for {solver} over the calibration set")
        stats = collect_stats(model, calib, {n: CALIBRATED_SOLVERS[solver] for n in found}, batch_size)
    out = []
    start = time.perf_counter()
    replay = BlockReplay(model, batches)
    starts = {n: start_block(n, replay.double, len(replay.blocks)) for n in found}
    order = sorted(found, key=starts.get)  # by the block each starts at (stable: inventory order within one)
    bar = tqdm(order, desc="sensitivity", unit="layer", file=sys.stderr, disable=not (progress and sys.stderr.isatty()))
    for i, name in enumerate(bar):
        spec = found[name]
        replay.advance(starts[name])
        weight = params[name]
        original = weight.detach().clone()
        q = quantize(original.float().cpu(), mode, group_size, SCALE_DTYPES[scale_dtype], solver, name=name,
                     stats=stats.get(name))
        weight.copy_(dequantize(q.codes, q.scales, group_size).to(weight.dtype))
        try:
            err2 = sum(float((replay.forward(j).float() - r).square().sum()) for j, r in enumerate(reference))
        finally:
            weight.copy_(original)
        out.append(Sensitivity(name, spec.role, tuple(spec.shape), name in published, err2 / ref2,
                               spec.numel * BYTES_16))
        log(f"  [{i + 1}/{len(found)}] {name}: {err2 / ref2:.3e} ({time.perf_counter() - start:.1f} s)")
    return sorted(out, key=lambda s: (-s.score, s.name))


def published_budget(ranking: list[Sensitivity]) -> int:
    """16-bit bytes of the candidate tensors the published recipe keeps."""
    return sum(s.bytes16 for s in ranking if s.published_keep)


def choose(ranking: list[Sensitivity], budget_bytes: int) -> list[Sensitivity]:
    """The most sensitive tensors, in ranking order, whose 16-bit bytes fit `budget_bytes` together."""
    if budget_bytes < 0:
        raise BonsaiError(f"--budget-bytes {budget_bytes}: must be >= 0")
    chosen, used = [], 0
    for s in ranking:
        if used + s.bytes16 <= budget_bytes:
            chosen.append(s)
            used += s.bytes16
    return chosen


def compare_with_published(ranking: list[Sensitivity], chosen: list[Sensitivity]) -> dict:
    """How the chosen keep set differs from the published one (over candidate tensors)."""
    keep = {s.name for s in chosen}
    published = {s.name for s in ranking if s.published_keep}
    rank = {s.name: i + 1 for i, s in enumerate(ranking)}
    return {"same": keep == published,
            "both": sorted(keep & published, key=rank.get),
            "only_published": sorted(published - keep, key=rank.get),
            "only_ranking": sorted(keep - published, key=rank.get),
            "published_ranks": sorted(rank[n] for n in published)}


def write_recipe(ranking: list[Sensitivity], chosen: list[Sensitivity], mode: str, solver: str | None,
                 budget_bytes: int, path: Path | None = None, calibration: str | None = None,
                 model_label: str = "") -> Recipe:
    """A recipe keeping `chosen` 16-bit; validated by parsing it back. Written to `path` when given."""
    keep = {s.name for s in chosen}
    lines = [f"# Sensitivity-chosen keep set for {model_label or 'this model'} ({mode}), written by "
             "`bonsai-quant sensitivity`.",
             "# Score: relative change of the transformer output over the calibration set when only that tensor "
             "is quantized.",
             f"# Budget: {budget_bytes:,} bytes of 16-bit Linear weights; chosen "
             f"{sum(s.bytes16 for s in chosen):,} bytes.",
             "#",
             "# rank  score       16-bit bytes  published  chosen  tensor"]
    for i, s in enumerate(ranking):
        lines.append(f"# {i + 1:>4}  {s.score:.4e}  {s.bytes16:>12,}  {'keep' if s.published_keep else '-':<9}  "
                     f"{'keep' if s.name in keep else '-':<6}  {s.name}")
    lines += ["", "format_version: 1", f"name: sensitivity-{mode}", f"mode: {mode}"]
    if solver and solver != DEFAULT_SOLVERS[mode]:
        lines.append(f"solver: {solver}")
    if calibration is not None:
        lines.append(f"calibration: {calibration}")
    rules = []
    for s in ranking:
        module = s.name.removesuffix(".weight")
        default_quantized = s.role in DEFAULT_QUANTIZED_ROLES
        if s.name in keep and default_quantized:
            rules.append(f"  - keep: {module}")
        elif s.name not in keep and not default_quantized:
            rules.append(f"  - quantize: {module}")
    lines += ["rules:" if rules else "rules: []"] + rules
    text = "\n".join(lines) + "\n"
    recipe = parse_recipe(text, str(path) if path else "<string>")
    if path is not None:
        Path(path).write_text(text)
    return recipe


def sensitivity(model_path: Path | None, calib_path: Path, mode: str, solver: str | None = None,
                budget_bytes: int | None = None, out: Path | None = None, max_calls: int | None = None,
                device: str = "cpu", log: Callable[[str], None] = lambda m: None, progress: bool = False) -> dict:
    """Rank, choose within the budget, compare with the published keep set and write the recipe to `out`."""
    from .calibration import default_model_dtype, load_calibration
    from .dense import load_dense
    from .digits import model_dir
    from .readers.bfl import open_checkpoint

    model_path = Path(model_path) if model_path is not None else model_dir()
    solver = solver or DEFAULT_SOLVERS[mode]
    from .recipe import SOLVERS

    if solver not in SOLVERS[mode]:
        raise BonsaiError(f"--solver {solver!r} is not a {mode} solver; valid: {', '.join(SOLVERS[mode])}")
    checkpoint = open_checkpoint(model_path)
    calib = load_calibration(calib_path)
    calib.check_model(checkpoint.config, str(model_path))
    dtype = default_model_dtype(checkpoint)
    model = load_dense(checkpoint, dtype=dtype, device=device)
    start = time.perf_counter()
    ranking = measure(model, calib, mode, solver, max_calls=max_calls, log=log, progress=progress)
    budget = published_budget(ranking) if budget_bytes is None else budget_bytes
    chosen = choose(ranking, budget)
    calibration = None
    if solver in CALIBRATED_SOLVERS:  # the recipe names its set, relative to where the recipe is written
        import os

        calibration = os.path.relpath(Path(calib_path).resolve(), Path(out or ".").resolve().parent)
    recipe = write_recipe(ranking, chosen, mode, solver, budget, out, calibration, model_path.name)
    return {"model": str(model_path), "calibration": str(calib.path), "mode": mode, "solver": solver,
            "calls": min(calib.calls, max_calls or calib.calls), "budget_bytes": budget,
            "chosen_bytes": sum(s.bytes16 for s in chosen), "seconds": round(time.perf_counter() - start, 2),
            "ranking": [{**asdict(s), "rank": i + 1, "chosen": s in chosen} for i, s in enumerate(ranking)],
            "published": compare_with_published(ranking, chosen), "recipe": str(out) if out else None,
            "recipe_text": recipe.text}


def format_report(r: dict) -> str:
    lines = [f"sensitivity of {r['model']} ({r['mode']}, solver {r['solver']}) over {r['calls']} calibration calls "
             f"of {r['calibration']}",
             f"{'rank':>4}  {'score':>10}  {'16-bit bytes':>12}  {'published':<9}  {'chosen':<6}  tensor"]
    for s in r["ranking"]:
        lines.append(f"{s['rank']:>4}  {s['score']:>10.4e}  {s['bytes16']:>12,}  "
                     f"{'keep' if s['published_keep'] else '-':<9}  {'keep' if s['chosen'] else '-':<6}  {s['name']}")
    p = r["published"]
    lines.append(f"budget {r['budget_bytes']:,} bytes of 16-bit Linear weights; chosen {r['chosen_bytes']:,}")
    if p["same"]:
        lines.append("the ranking chooses exactly the published keep set")
    else:
        lines.append(f"the ranking does not choose the published keep set: {len(p['both'])} in common; published "
                     f"only: {', '.join(p['only_published']) or '-'}; "
                     f"ranking only: {', '.join(p['only_ranking']) or '-'}")
        lines.append(f"published tensors rank {', '.join(map(str, p['published_ranks']))} of {len(r['ranking'])}")
    if r["recipe"]:
        lines.append(f"recipe: {r['recipe']}")
    return "\n".join(lines)

"""Launchers for the kernels, with per-shape tile choice measured once on the device and cached.

On a GPU each (kernel, shape, M bucket) times its candidate tiles on first use (outside CUDA-graph capture)
and keeps the fastest; under Triton's interpreter (CPU tests) the first candidate runs.
"""

from __future__ import annotations

import os

import torch

from . import kernels as K
from .layout import CODES_PER_BYTE, ENCODINGS, PackedWeights

_BEST: dict[tuple, dict] = {}
TUNED: dict[tuple, list] = {}  # key -> [(ms, config)] of every config timed while tuning (the benchmark reports it)
REJECTED: list = []  # (key, config) pairs whose output disagreed with the tiled kernel's while tuning
TUNE_MS = {"warmup": 2, "rep": 8}  # triton.testing.do_bench's budget per config, ms: a layer tunes well under 1 s
_SCALED_MM_LAYOUT: dict[str, int] = {}
SCALED_MM_REFUSED: dict[tuple, str] = {}  # (out, in, M) -> why torch._scaled_mm refused the block scales
EXPAND: dict = {"words": None}  # whether the word-at-a-time expansion compiled here (None: not tried yet)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def m_bucket(m: int) -> int:
    b = 1
    while b < m and b < 8192:
        b *= 2
    return b


def _pick(key: tuple, candidates: list[dict], launch, accept=None) -> None:
    """Run `launch(**config)` with the tuned config for `key`, tuning first where that is possible; with
    `accept`, a config whose first result it rejects is never timed (a wrong result is never fast enough)."""
    best = _BEST.get(key)
    if best is None:
        if interpreting() or len(candidates) == 1 or torch.cuda.is_current_stream_capturing():
            best = candidates[0]
        else:
            import triton.testing

            timed = []
            for cfg in candidates:
                try:
                    if accept is not None:
                        launch(**cfg)
                        if not accept():
                            REJECTED.append((key, cfg))
                            continue
                    timed.append((triton.testing.do_bench(lambda: launch(**cfg), **TUNE_MS), cfg))
                except Exception:  # a tile that does not fit this device's shared memory: skip it
                    continue
            if not timed:
                raise RuntimeError(f"no kernel configuration runs for {key}")
            TUNED[key] = timed
            best = min(timed, key=lambda t: t[0])[1]
        _BEST[key] = best
    launch(**best)


def _matmul_candidates(m: int) -> list[dict]:
    if m <= 16:
        return [dict(BLOCK_M=16, BLOCK_N=n, num_warps=w, num_stages=s)
                for n, w, s in ((32, 4, 3), (16, 4, 4), (64, 4, 3))]
    if m <= 64:
        return [dict(BLOCK_M=m_bucket(m), BLOCK_N=n, num_warps=4, num_stages=3) for n in (64, 32)]
    return [dict(BLOCK_M=bm, BLOCK_N=n, num_warps=w, num_stages=s)
            for bm, n, w, s in ((128, 128, 8, 3), (64, 128, 4, 3))]


SMALL_M = 64  # up to here the byte-once kernels run (the weight read is the cost); above, the tiled kernel
ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # the bit pattern of 1.0


SMS = 132  # an H200's multiprocessors: the split-K target below (a guess on other devices; tuning decides)


def _tiles(programs_per_tile: int, groups: int, n: int, count: int, widths=(64, 128, 256)) -> list[tuple]:
    """(column tile, K split) pairs: the weight read is the cost, so the grid must keep enough bytes in flight;
    pairs giving ~2-16 programs per multiprocessor are kept, closest to ~8 first (each is a compile per layer
    width when tuned, so only `count` of them)."""
    options = []
    for bn in widths:
        for split in (1, 2, 3, 4, 6, 8, 12, 24):
            if groups % split:
                continue
            programs = -(-n // bn) * split * programs_per_tile
            if 2 * SMS <= programs <= 16 * SMS or (split == 1 and programs < 2 * SMS):
                options.append((abs(programs - 8 * SMS) / (8 * SMS) + 0.1 * (bn == 256), bn, split))
    options.sort()
    return [(bn, split) for _, bn, split in options[:count]] or [(min(widths[-1], 128), 1)]


SMALL_M_KINDS = ("gemv", "dot", "dot_xsplit", "dot_t", "tiled")
DISABLED_KINDS: set = set()  # kinds this process must not tune (a benchmark saw them fault in another process)


def _small_m_candidates(m: int, groups: int, n: int = 3072) -> list[dict]:
    """Tiles for the byte-once kernels, chosen by rule so that tuning a layer compiles a handful: two gemv
    tiles (M <= 4), the tensor-core kernels (x split in registers, and transposed with the codes as the first
    operand) at the one or two best (column tile, split) pairs, the round-2 dot kernel once, and last the
    tiled kernel, the reference every other tile is checked against while tuning. Split tiles reduce in their
    last program (one launch)."""
    bm = max(16, m_bucket(m))
    cands = []
    if m <= 4:
        cands += [dict(kind="gemv", BLOCK_N=bn, SPLIT=sp, num_warps=8 if bn == 256 else 4, num_stages=3)
                  for bn, sp in _tiles(m, groups, n, 2)]
    dot_tiles = _tiles(1, groups, n, 1 if m <= 4 else 2, widths=(64, 128))
    cands += [dict(kind="dot_xsplit", BLOCK_M=bm, BLOCK_N=bn, SPLIT=sp, num_warps=4, num_stages=3)
              for bn, sp in dot_tiles]
    cands += [dict(kind="dot_t", BLOCK_M=bm, BLOCK_N=bn, SPLIT=sp, num_warps=4, num_stages=3)
              for bn, sp in dot_tiles]
    if m > 4:
        bn, sp = dot_tiles[0]
        cands.append(dict(kind="dot", BLOCK_M=bm, BLOCK_N=bn, SPLIT=sp, num_warps=4, num_stages=3))
    cands = [dict(c, LAST_REDUCES=c["SPLIT"] > 1) for c in cands if c["kind"] not in DISABLED_KINDS]
    cands.append(dict(kind="tiled", BLOCK_M=16 if m <= 16 else m_bucket(m), BLOCK_N=32, SPLIT=1, num_warps=4,
                      num_stages=3))
    return cands


def small_m_matmul(x: torch.Tensor, w: PackedWeights, y: torch.Tensor, kind: str, BLOCK_N: int, SPLIT: int,
                   num_warps: int, num_stages: int, BLOCK_M: int = 1, LAST_REDUCES: bool = False) -> None:
    """y[M, N] = x @ (codes * s)^T through one byte-once kernel ("gemv": one row per program, fp32 FMAs;
    "dot", "dot_xsplit", "dot_t": tensor cores, see `kernels`) or the tiled one ("tiled"), with K split SPLIT
    ways, the fp32 partial outputs summed in split order by each tile's last program (LAST_REDUCES) or by a
    second launch."""
    if kind not in SMALL_M_KINDS:
        raise ValueError(f"unknown small-M kernel {kind!r}; valid: {', '.join(SMALL_M_KINDS)}")
    m, n, k = x.shape[0], w.out_features, w.in_features
    enc = ENCODINGS[w.encoding]
    if kind == "tiled":
        grid = (-(-n // BLOCK_N), -(-m // BLOCK_M))
        K.packed_matmul_kernel[grid](x, w.codes, w.scales, y, m, n, k, x.stride(0), y.stride(0), ENC=enc,
                                     BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IEEE=x.dtype == torch.float32,
                                     num_warps=num_warps, num_stages=num_stages)
        return
    gps = k // K.GROUP // SPLIT
    per = CODES_PER_BYTE[w.encoding]
    p = y if SPLIT == 1 else torch.empty(SPLIT, m, n, dtype=torch.float32, device=x.device)
    common = dict(ENC=enc, PER=per, GPS=gps, SPLIT=SPLIT, LAST_REDUCES=LAST_REDUCES, BLOCK_N=BLOCK_N,
                  num_warps=num_warps, num_stages=num_stages)
    grid = (m, -(-n // BLOCK_N), SPLIT) if kind == "gemv" else (-(-n // BLOCK_N), -(-m // BLOCK_M), SPLIT)
    cnt = Counters.get(x.device)
    if LAST_REDUCES and SPLIT > 1 and grid[0] * grid[1] > Counters.SIZE:
        raise ValueError(f"{grid[0] * grid[1]} output tiles exceed the {Counters.SIZE} split-K counters")
    if kind == "gemv":
        K.packed_gemv_kernel[grid](x, w.codes, w.scales, y, p, cnt, m, n, x.stride(0), m * n, **common)
    elif kind == "dot_t":
        K.packed_dot_t_kernel[grid](x, w.codes, w.scales, y, p, cnt, m, n, x.stride(0), m * n,
                                    ONE=ONE_BITS[x.dtype], BLOCK_M=BLOCK_M, **common)
    else:
        K.packed_dot_kernel[grid](x, w.codes, w.scales, y, p, cnt, m, n, x.stride(0), m * n,
                                  ONE=ONE_BITS[x.dtype], BLOCK_M=BLOCK_M, XSPLIT=kind == "dot_xsplit", **common)
    if SPLIT > 1 and not LAST_REDUCES:
        K.split_sum_kernel[(-(-(m * n) // 1024),)](p, y, m * n, SPLIT=SPLIT, BLOCK=1024, num_warps=4)


class Counters:
    """Per device, zeroed int32 arrival counters for the split-K tiles whose last program reduces; every
    reduction re-arms its counter, so one buffer serves every layer and CUDA-graph replay in stream order."""

    SIZE = 1 << 16
    _buffers: dict = {}

    @classmethod
    def get(cls, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in cls._buffers:
            cls._buffers[key] = torch.zeros(cls.SIZE, dtype=torch.int32, device=device)
        return cls._buffers[key]


def packed_matmul(x: torch.Tensor, w: PackedWeights, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ (codes * s)^T with 16-bit or fp32 activations (fp32 runs exact-fp32 products)."""
    m = x.shape[0]
    y = torch.empty(m, w.out_features, dtype=out_dtype or x.dtype, device=x.device)
    enc = ENCODINGS[w.encoding]
    ieee = x.dtype == torch.float32
    if m <= SMALL_M and not ieee and w.encoding != "trits" and x.dtype in ONE_BITS:
        # bonsai trits straddle the 128-groups (5 per byte), so they keep the tiled kernel
        cands = _small_m_candidates(m, w.in_features // K.GROUP, w.out_features)
        key = ("small", w.out_features, w.in_features, m_bucket(m), enc, x.dtype)
        accept = None
        if key not in _BEST and not interpreting() and not torch.cuda.is_current_stream_capturing():
            ref = torch.empty_like(y)
            small_m_matmul(x, w, ref, **cands[-1])  # the tiled kernel, checked in the first round

            def accept():
                return bool(torch.isfinite(y).all()) and float((y.float() - ref.float()).norm()) <= \
                    1e-2 * float(ref.float().norm())

        _pick(key, cands, lambda **cfg: small_m_matmul(x, w, y, **cfg), accept)
        return y

    def launch(BLOCK_M, BLOCK_N, num_warps, num_stages):
        grid = (-(-w.out_features // BLOCK_N), -(-m // BLOCK_M))
        K.packed_matmul_kernel[grid](x, w.codes, w.scales, y, m, w.out_features, w.in_features, x.stride(0),
                                     y.stride(0), ENC=enc, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, IEEE=ieee,
                                     num_warps=num_warps, num_stages=num_stages)

    cands = _matmul_candidates(m)
    if ieee:
        cands = [dict(c, BLOCK_M=min(c["BLOCK_M"], 64), BLOCK_N=min(c["BLOCK_N"], 64)) for c in cands]
    _pick(("mm", w.out_features, w.in_features, m_bucket(m), enc, x.dtype), cands, launch)
    return y


def quantize_e4m3(x: torch.Tensor, column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 power-of-two scales [M, K/128]); x = q * scale per 128 channels."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    if column_major_scales:  # the layout torch._scaled_mm's blockwise path asks for
        sx = torch.empty(k // K.GROUP, m, dtype=torch.float32, device=x.device).t()
    else:
        sx = torch.empty(m, k // K.GROUP, dtype=torch.float32, device=x.device)
    block_m = 16 if interpreting() else 32
    K.quantize_e4m3_kernel[(-(-m // block_m), k // K.GROUP)](x, q, sx, m, k, x.stride(0), sx.stride(0),
                                                              sx.stride(1), BLOCK_M=block_m, num_warps=4)
    return q, sx


def _fp8_candidates() -> list[dict]:
    return [dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (64, 128, 4, 4))]


def packed_fp8_matmul(x: torch.Tensor, w: PackedWeights, out_dtype: torch.dtype) -> torch.Tensor:
    """y = x @ (codes * s)^T with x rounded to e4m3 per (token, 128 channels); codes decoded in the K loop."""
    q, sx = quantize_e4m3(x)
    m = x.shape[0]
    y = torch.empty(m, w.out_features, dtype=out_dtype, device=x.device)
    enc = ENCODINGS[w.encoding]

    def launch(BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages):
        grid = (-(-m // BLOCK_M) * -(-w.out_features // BLOCK_N),)
        K.packed_fp8_matmul_kernel[grid](q, sx, w.codes, w.scales, y, m, w.out_features, w.in_features,
                                         sx.stride(0), sx.stride(1), y.stride(0), ENC=enc, BLOCK_M=BLOCK_M,
                                         BLOCK_N=BLOCK_N, GROUP_M=GROUP_M, num_warps=num_warps,
                                         num_stages=num_stages)

    cands = _fp8_candidates()
    if interpreting():
        cands = [dict(BLOCK_M=16, BLOCK_N=32, GROUP_M=2, num_warps=4, num_stages=1)]
    _pick(("fp8", w.out_features, w.in_features, m_bucket(m), enc), cands, launch)
    return y


class Scratch:
    """One e4m3 weight buffer (and its fp32 scales) per device, reused by every layer in turn."""

    _buffers: dict = {}

    @classmethod
    def get(cls, device: torch.device, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        codes, scales = cls._buffers.get(key, (None, None))
        if codes is None or codes.numel() < n * k or scales.numel() < n * (k // K.GROUP):
            size = max(n * k, 0 if codes is None else codes.numel())
            ssize = max(n * (k // K.GROUP), 0 if scales is None else scales.numel())
            codes = torch.empty(size, dtype=torch.float8_e4m3fn, device=device)
            scales = torch.empty(ssize, dtype=torch.float32, device=device)
            cls._buffers[key] = (codes, scales)
        return codes[:n * k].view(n, k), scales[:n * (k // K.GROUP)].view(k // K.GROUP, n)

    @classmethod
    def nbytes(cls) -> int:
        return sum(c.numel() + 4 * s.numel() for c, s in cls._buffers.values())


def expand_e4m3(w: PackedWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes as e4m3 [out, in] and scales as fp32 [in/128, out], written into the shared scratch buffer."""
    codes, scales = Scratch.get(w.codes.device, w.out_features, w.in_features)

    def grid(block_n):
        return -(-w.out_features // block_n), w.in_features // K.GROUP

    if w.encoding != "trits" and EXPAND["words"] is not False:
        words = codes.view(torch.int64 if w.encoding == "bits1" else torch.int32)
        block_n = 32 if interpreting() else 128
        try:
            K.expand_words_kernel[grid(block_n)](w.codes, w.scales, words, scales, w.out_features,
                                                 w.in_features, ENC=ENCODINGS[w.encoding],
                                                 PER=CODES_PER_BYTE[w.encoding], BLOCK_N=block_n, num_warps=4)
            EXPAND["words"] = True
            return codes, scales
        except Exception as e:  # a Triton build that cannot compile it: the per-code kernel still runs
            if EXPAND["words"] or torch.cuda.is_current_stream_capturing():
                raise
            EXPAND["words"] = False
            EXPAND["error"] = f"{type(e).__name__}: {e}"[:400]
    # bonsai trits: 5 codes per byte straddle the words, so one load per code
    block_n = 32 if interpreting() else 64
    K.expand_e4m3_kernel[grid(block_n)](w.codes, w.scales, codes, scales, w.out_features, w.in_features,
                                        ENC=ENCODINGS[w.encoding], BLOCK_N=block_n, num_warps=4)
    return codes, scales


def scaled_mm_matmul(x: torch.Tensor, w: PackedWeights, out_dtype: torch.dtype) -> torch.Tensor:
    """Expanded codes through `torch._scaled_mm` with 1x128 block scales on both operands."""
    q, sx = quantize_e4m3(x, column_major_scales=True)
    codes, scales = expand_e4m3(w)
    # Which scale_b layout this torch accepts is found once (builds differ), then reused.
    variants = (lambda s: s, lambda s: s.t().contiguous().t())
    which = _SCALED_MM_LAYOUT.get("b")
    order = [which] if which is not None else range(len(variants))
    last = None
    for i in order:
        try:
            y = torch._scaled_mm(q, codes.t(), scale_a=sx, scale_b=variants[i](scales), out_dtype=out_dtype)
        except RuntimeError as e:
            last = e
            continue
        _SCALED_MM_LAYOUT["b"] = i
        return y
    raise ScaledMmRefused(f"torch._scaled_mm refuses 1x128 block scales for [{w.out_features}, {w.in_features}] "
                          f"at M = {x.shape[0]}: {last}")


class ScaledMmRefused(RuntimeError):
    """This torch build's `_scaled_mm` takes no 1x128 block scales at this shape (CudaPackedLinear then runs
    `packed_fp8_matmul`, the same arithmetic)."""

"""MLX on a Linux CPU, made fast without changing what it computes: its matmuls through numpy's OpenBLAS, and
its quantized linears as its own dequantize followed by a dense matmul.

The mlx[cpu] Linux wheel links netlib's reference BLAS, whose sgemm is an unblocked loop: a float32
96x3072 @ 3072x9216 product takes ~8.7 s there and ~0.2 s in OpenBLAS. MLX calls three BLAS functions
(`nm -D libmlx.so`: cblas_sgemm, cblas_dgemm, cblas_cgemm). numpy 2 bundles OpenBLAS with 64-bit integers under
prefixed names (`scipy_cblas_sgemm64_`), so a few lines of C give MLX those three entry points, with its 32-bit
integers widened, forwarding to numpy's library. The shim is compiled once with the system C compiler into the
user's cache folder and loaded with RTLD_GLOBAL before `mlx.core` is first imported: the dynamic linker then
binds libmlx.so's cblas_* to it (Python loads extensions with RTLD_NOW, so after that import it is too late).
Without a compiler or numpy's OpenBLAS, MLX keeps its own BLAS and one line on stderr says so. What changes is
the summation order inside each product, as between any two BLAS builds; OpenBLAS splits a product over threads
by rows and columns, never along the sum, so results do not depend on its thread count.
`BONSAI_QUANT_MLX_BLAS=off` keeps MLX's own BLAS.

MLX's CPU `quantized_matmul` is a scalar loop too (2-bit, 96 rows at 3072x9216: ~2.5 s CPU; 1-bit about the
same), ~7x slower than dequantizing (`mx.dequantize`, exact for these packs) and multiplying densely.

Both apply on Linux only: on macOS MLX uses Accelerate and Metal, and nothing here changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

# MLX's arguments are netlib CBLAS's (32-bit int); OpenBLAS's ILP64 build takes 64-bit integers (its enums stay
# int). Widening is all the shim does, besides counting calls so that tests can see MLX really arrives here.
SOURCE = r"""
#include <stdint.h>

typedef void (*sgemm_t)(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t,
                        const float *, int64_t, float, float *, int64_t);
typedef void (*dgemm_t)(int, int, int, int64_t, int64_t, int64_t, double, const double *, int64_t,
                        const double *, int64_t, double, double *, int64_t);
typedef void (*cgemm_t)(int, int, int, int64_t, int64_t, int64_t, const void *, const void *, int64_t,
                        const void *, int64_t, const void *, void *, int64_t);

static sgemm_t sgemm64;
static dgemm_t dgemm64;
static cgemm_t cgemm64;
static uint64_t calls;

void bonsai_mlx_blas_bind(void *s, void *d, void *c) {
  sgemm64 = (sgemm_t)s;
  dgemm64 = (dgemm_t)d;
  cgemm64 = (cgemm_t)c;
}

uint64_t bonsai_mlx_blas_calls(void) { return __atomic_load_n(&calls, __ATOMIC_RELAXED); }

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
  sgemm64(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
                 const double *b, int ldb, double beta, double *c, int ldc) {
  __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
  dgemm64(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_cgemm(int order, int ta, int tb, int m, int n, int k, const void *alpha, const void *a, int lda,
                 const void *b, int ldb, const void *beta, void *c, int ldc) {
  __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED);
  cgemm64(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""

FORWARDED = ("sgemm", "dgemm", "cgemm")
OFF_VARIABLE = "BONSAI_QUANT_MLX_BLAS"
_state: dict = {}


def _note(msg: str) -> None:
    print(f"note: {msg}; MLX's CPU matmuls run on the reference BLAS of its Linux wheel (slow on full-size "
          "models)", file=sys.stderr)


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bonsai-quant"


def compiler() -> str | None:
    """The C compiler: $CC, else cc or gcc on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(cache: Path) -> Path | None:
    """The compiled shim in `cache` (compiled on first use), or None with a note saying why not."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    lib = cache / f"mlx-blas-{digest}-{platform.machine()}.so"
    if lib.is_file():
        return lib
    cc = compiler()
    if cc is None:
        _note("no C compiler found ($CC, cc or gcc) to build the shim that gives MLX numpy's OpenBLAS")
        return None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        src = cache / f".mlx-blas-{digest}-{os.getpid()}.c"
        tmp = src.with_suffix(".so")
        src.write_text(SOURCE)
        done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], capture_output=True,
                              text=True)
        src.unlink()
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            _note(f"{cc} could not build the shim that gives MLX numpy's OpenBLAS ({why})")
            return None
        os.replace(tmp, lib)  # atomic: a concurrent process sees the whole library or none
    except OSError as e:
        _note(f"cannot build the shim that gives MLX numpy's OpenBLAS in {cache} ({e.strerror or e})")
        return None
    return lib


def _numpy_openblas() -> ctypes.CDLL | None:
    """numpy's own OpenBLAS (ILP64, `scipy_` prefix), found among the libraries numpy loaded."""
    import numpy  # noqa: F401 -- loads its OpenBLAS

    with open("/proc/self/maps") as maps:
        fields = [line.split(maxsplit=5) for line in maps]
    paths = sorted({f[5].strip() for f in fields if len(f) == 6 and "openblas" in Path(f[5].strip()).name.lower()})
    for path in paths:
        lib = ctypes.CDLL(path)
        if all(hasattr(lib, f"scipy_cblas_{f}64_") for f in FORWARDED):
            return lib
    return None


def enable() -> bool:
    """Route MLX's CPU matmuls to numpy's OpenBLAS, once per process; call it before `mlx.core` is imported.
    True when MLX's matmuls go there."""
    if "enabled" in _state:
        return _state["enabled"]
    _state["enabled"] = False
    if not sys.platform.startswith("linux") or os.environ.get(OFF_VARIABLE, "").lower() == "off":
        return False
    if "mlx.core" in sys.modules:
        _note("mlx was imported before bonsai_quant could give it numpy's OpenBLAS (import bonsai_quant's MLX "
              "modules first)")
        return False
    blas = _numpy_openblas()
    if blas is None:
        import numpy

        _note(f"numpy {numpy.__version__} loaded no OpenBLAS with 64-bit integers (scipy_cblas_sgemm64_)")
        return False
    lib = build(cache_folder())
    if lib is None:
        return False
    shim = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    shim.bonsai_mlx_blas_bind(*(ctypes.cast(getattr(blas, f"scipy_cblas_{f}64_"), ctypes.c_void_p)
                                for f in FORWARDED))
    shim.bonsai_mlx_blas_calls.restype = ctypes.c_uint64
    _state.update(enabled=True, shim=shim)
    return True


@contextlib.contextmanager
def blas_threads(threads: int):
    """numpy's OpenBLAS (MLX's matmuls here, once enabled) on `threads` threads for the duration: where another
    thread keeps the other cores busy, its spinning workers only take time from it. Results do not change (see
    the module's docstring)."""
    blas = _numpy_openblas() if sys.platform.startswith("linux") else None
    get = getattr(blas, "scipy_openblas_get_num_threads64_", None)
    set_ = getattr(blas, "scipy_openblas_set_num_threads64_", None)
    if get is None or set_ is None:
        yield
        return
    before = get()
    set_(ctypes.c_int(threads))
    try:
        yield
    finally:
        set_(ctypes.c_int(before))


def calls() -> int | None:
    """How many BLAS calls the shim forwarded in this process (None when it is not loaded)."""
    shim = _state.get("shim")
    return None if shim is None else int(shim.bonsai_mlx_blas_calls())


def quantized_kernel_is_slow() -> bool:
    """Whether MLX's quantized_matmul would run as its CPU loop: on Linux, on the CPU device (mlx[cuda]'s GPU
    kernels and macOS are fast)."""
    import mlx.core as mx

    return sys.platform.startswith("linux") and mx.default_device() == mx.cpu


def _table(bits: int) -> np.ndarray:
    """Every byte's `8 // bits` codes, least significant first (MLX's order), as float32 values held in one
    element per byte, so that one `np.take` unpacks a whole packed weight."""
    per = 8 // bits
    values = ((np.arange(256)[:, None] >> (np.arange(per) * bits)) & ((1 << bits) - 1)).astype(np.float32)
    return values.view(np.dtype((np.void, 4 * per))).reshape(256)


_TABLES = {bits: _table(bits) for bits in (1, 2, 4, 8)}
_scratch = threading.local()


def affine_dequantize(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int,
                      bits: int) -> np.ndarray:
    """What `mx.dequantize` returns in float32 for MLX affine tensors (uint32 weight, float32 scales and
    biases), bit for bit: q * scale + bias, rounded after the product and after the sum as MLX's CPU kernel
    does (tests/test_mlx_cpu.py compares them on random tensors). A table lookup per byte, ~8x faster than
    MLX's CPU loop. The result lives in a buffer reused by the next call of the same thread (a fresh ~340 MB
    array per klein layer costs more in page faults than the decode)."""
    out_f = weight.shape[0]
    in_f = weight.shape[1] * 32 // bits
    block = getattr(_scratch, "block", np.empty(0, np.float32))
    if block.size < out_f * in_f:
        _scratch.block = block = np.empty(0, np.float32)  # freed before the larger one is allocated
        _scratch.block = block = np.empty(out_f * in_f, np.float32)
    dense = block[:out_f * in_f].reshape(out_f, in_f // group_size, group_size)
    np.take(_TABLES[bits], weight.view(np.uint8).reshape(out_f, -1), out=dense.view(_TABLES[bits].dtype)
            .reshape(out_f, -1))
    dense *= scales[..., None]
    dense += biases[..., None]
    return dense.reshape(out_f, in_f)


def dense_quantized_matmul(layer, x):
    """What `layer` (an `mlx.nn.QuantizedLinear`) computes for `x`: its own tensors dequantized, then a dense
    matmul, in quantized_matmul's output dtype (x's and the scales', promoted). Dequantizing in that dtype, as
    quantized_matmul computes scales * q + biases, makes it the same product in another summation order. In
    float32 the dequantize is `affine_dequantize` (mx.dequantize's values) and the matmul numpy's OpenBLAS, which
    MLX's own matmuls use here too; otherwise MLX's dequantize and matmul."""
    import mlx.core as mx

    dtype = mx.result_type(x, layer["scales"])
    biases = layer.get("biases")
    if dtype == mx.float32 and biases is not None and layer.mode == "affine" and layer.bits in _TABLES:
        w = affine_dequantize(np.asarray(layer["weight"]), np.asarray(layer["scales"].astype(dtype)),
                              np.asarray(biases.astype(dtype)), layer.group_size, layer.bits)
        y = mx.array(np.asarray(x.astype(dtype)) @ w.T)
        return y + layer["bias"] if "bias" in layer else y
    w = mx.dequantize(layer["weight"], layer["scales"].astype(dtype),
                      None if biases is None else biases.astype(dtype), group_size=layer.group_size,
                      bits=layer.bits, mode=layer.mode)
    y = x @ w.T
    y = y + layer["bias"] if "bias" in layer else y
    # Evaluated here, so the dense weight is freed before the next layer's is made: left to one mx.eval of
    # the whole forward, MLX held ~2.6 GB of them at once on klein 4B.
    mx.eval(y)
    return y


@contextlib.contextmanager
def dense_quantized_linears():
    """Every `mlx.nn.QuantizedLinear` (an application's own layers included) computes through
    dense_quantized_matmul for the duration, where quantized_kernel_is_slow()."""
    import mlx.nn as nn

    if not quantized_kernel_is_slow():
        yield
        return
    original = nn.QuantizedLinear.__call__
    nn.QuantizedLinear.__call__ = dense_quantized_matmul
    try:
        yield
    finally:
        nn.QuantizedLinear.__call__ = original

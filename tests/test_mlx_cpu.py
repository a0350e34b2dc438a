"""MLX on a Linux CPU: the BLAS shim (exact products, really used, a clear note where it cannot be built) and
quantized linears as dequantize + dense matmul."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonsai_quant import mlx_cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shim is for MLX's Linux wheel")

ROOT = Path(__file__).resolve().parents[1]

# Products of small integers are exact in any summation order, so every BLAS must give the same bits: a wrong
# transpose, leading dimension or argument width would not. Operands cover MLX's plain, transposed, strided and
# batched calls, and the three BLAS functions it uses (float32, float64, complex64).
PRODUCTS = r"""
import json, sys
import numpy as np
from bonsai_quant import mlx_cpu
enabled = mlx_cpu.enable()
import mlx.core as mx
rng = np.random.default_rng(0)
def ints(*shape, dtype=np.float32):
    return rng.integers(-8, 9, size=shape).astype(dtype)
a, b = mx.array(ints(37, 129)), mx.array(ints(129, 65))
c = mx.array(ints(3, 21, 17))
z = mx.array(ints(9, 6) + 1j * ints(9, 6), dtype=mx.complex64)
products = {
    "plain": a @ b,
    "a_transposed": mx.array(ints(129, 37)).T @ b,
    "b_transposed": a @ mx.array(ints(65, 129)).T,
    "strided": a[::2, 1:] @ b[1::1, ::3],
    "batched": c @ mx.array(ints(3, 17, 5)),
    "matrix_vector": a @ mx.array(ints(129)),
    "float64": mx.array(ints(11, 7, dtype=np.float64)) @ mx.array(ints(7, 13, dtype=np.float64)),
    "complex64": z @ z.T,
}
mx.eval(list(products.values()))
np.savez(sys.argv[1], **{k: np.array(v) for k, v in products.items()})
print(json.dumps({"enabled": enabled, "calls": mlx_cpu.calls(), "products": len(products)}))
"""


def _python(code: str, *args, **env):
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full = {k: v for k, v in full.items() if v is not None}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=full, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_shim_gives_mlx_the_same_products_as_its_own_blas_and_mlx_calls_it(tmp_path):
    cache = tmp_path / "cache"
    shim = _python(PRODUCTS, tmp_path / "shim.npz", XDG_CACHE_HOME=str(cache))
    own = _python(PRODUCTS, tmp_path / "own.npz", BONSAI_QUANT_MLX_BLAS="off")
    shim_info, own_info = json.loads(shim.stdout), json.loads(own.stdout)
    assert own_info == {"enabled": False, "calls": None, "products": 8}
    # Every product went through the shim (the batched one is one call per matrix; the vector may be one too).
    assert shim_info["enabled"] is True and shim_info["calls"] >= 8
    assert (shim.stderr, own.stderr) == ("", "")
    assert [p.name for p in (cache / "bonsai-quant").iterdir()] == [mlx_cpu.build(cache / "bonsai-quant").name]
    with np.load(tmp_path / "shim.npz") as a, np.load(tmp_path / "own.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


def test_without_a_compiler_mlx_keeps_its_blas_with_one_note(tmp_path):
    done = _python(PRODUCTS, tmp_path / "out.npz", XDG_CACHE_HOME=str(tmp_path / "cache"), CC=None,
                   PATH=str(tmp_path / "no-bin"))
    assert json.loads(done.stdout) == {"enabled": False, "calls": None, "products": 8}
    assert done.stderr == ("note: no C compiler found ($CC, cc or gcc) to build the shim that gives MLX numpy's "
                           "OpenBLAS; MLX's CPU matmuls run on the reference BLAS of its Linux wheel (slow on "
                           "full-size models)\n")
    assert not (tmp_path / "cache" / "bonsai-quant").exists()


def test_build_notes_a_missing_or_failing_compiler_and_reuses_a_built_shim(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(mlx_cpu.shutil, "which", lambda name: None)
    assert mlx_cpu.build(tmp_path) is None
    assert capsys.readouterr().err.startswith("note: no C compiler found ($CC, cc or gcc) to build the shim")

    monkeypatch.setenv("CC", "false")
    assert mlx_cpu.build(tmp_path) is None
    assert capsys.readouterr().err.startswith("note: false could not build the shim that gives MLX numpy's "
                                              "OpenBLAS (exit status 1); MLX's CPU matmuls run on the reference")
    assert list(tmp_path.iterdir()) == []  # no half-written library or source left

    monkeypatch.undo()
    lib = mlx_cpu.build(tmp_path)
    assert lib is not None and lib.is_file()
    monkeypatch.setenv("CC", "false")  # once built it is not compiled again
    assert mlx_cpu.build(tmp_path) == lib
    assert capsys.readouterr().err == ""


def test_mlx_imported_first_is_noted():
    done = subprocess.run([sys.executable, "-c", "import mlx.core; from bonsai_quant import mlx_cpu; "
                           "print(mlx_cpu.enable())"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.stdout == "False\n"
    assert done.stderr.startswith("note: mlx was imported before bonsai_quant could give it numpy's OpenBLAS")


def test_conftest_enabled_the_shim_for_the_suite():
    import mlx.core as mx

    before = mlx_cpu.calls()
    mx.eval(mx.ones((4, 3)) @ mx.ones((3, 2)))
    assert mlx_cpu.calls() == before + 1


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16", "float16"])
def test_dense_quantized_matmul_is_quantized_matmul_in_another_order(bits, scale_dtype):
    import mlx.core as mx
    import mlx.nn as nn

    rng = np.random.default_rng(bits)
    w, s, b = mx.quantize(mx.array(rng.standard_normal((192, 384), dtype=np.float32)), 128, bits)
    layer = nn.QuantizedLinear(384, 192, bias=True, group_size=128, bits=bits)
    dtype = getattr(mx, scale_dtype)
    layer.update({"weight": w, "scales": s.astype(dtype), "biases": b.astype(dtype),
                  "bias": mx.array(rng.standard_normal(192, dtype=np.float32))})
    x = mx.array(rng.standard_normal((5, 384), dtype=np.float32))
    want = mx.quantized_matmul(x, w, s.astype(dtype), b.astype(dtype), transpose=True, group_size=128,
                               bits=bits) + layer["bias"]
    assert mlx_cpu.quantized_kernel_is_slow()  # Linux, CPU device
    got = mlx_cpu.dense_quantized_matmul(layer, x)
    assert got.dtype == want.dtype == mx.float32
    err = float(mx.linalg.norm(got - want) / mx.linalg.norm(want))
    assert err < 1e-6
    with mlx_cpu.dense_quantized_linears():  # an application's own QuantizedLinear takes the same path
        assert mx.array_equal(layer(x), got)
    assert mx.array_equal(layer(x), want)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_affine_dequantize_is_mlx_dequantize_bit_for_bit(bits, group_size):
    """Any scales and biases (not only a pack's s and -s), so the rounding order is MLX's, not just the values."""
    import mlx.core as mx

    rng = np.random.default_rng(bits * group_size)
    words = rng.integers(0, 2**32, size=(48, 256 * bits // 32), dtype=np.uint32)
    scales = rng.standard_normal((48, 256 // group_size)).astype(np.float32) * 3
    biases = rng.standard_normal((48, 256 // group_size)).astype(np.float32)
    want = np.array(mx.dequantize(mx.array(words), mx.array(scales), mx.array(biases), group_size=group_size,
                                  bits=bits))
    got = mlx_cpu.affine_dequantize(words, scales, biases, group_size, bits)
    assert got.dtype == np.float32 and got.shape == (48, 256)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
    again = mlx_cpu.affine_dequantize(words[:7], scales[:7], biases[:7], group_size, bits)  # reuses the buffer
    assert np.array_equal(again.view(np.int32), want[:7].view(np.int32))


def test_blas_threads_sets_and_restores_numpys_openblas():
    blas = mlx_cpu._numpy_openblas()
    before = blas.scipy_openblas_get_num_threads64_()
    with mlx_cpu.blas_threads(1):
        assert blas.scipy_openblas_get_num_threads64_() == 1
    assert blas.scipy_openblas_get_num_threads64_() == before

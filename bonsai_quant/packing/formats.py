"""The numbers every pack format shares, defined once: modes and their bits, scale and kept dtypes, group sizes.

Recipes validate against these names, plans and packers use the dtypes, pack readers check a pack's
`quantization_config.json` against them. The torch dtypes load torch on first use only, so that argument
parsing (which needs the names) stays fast.
"""

from __future__ import annotations

MODES = ("binary", "ternary")
# Bits of the runtime slot each code takes (MLX and gemlite store ternary codes in 2-bit slots).
MODE_BITS = {"binary": 1, "ternary": 2}
GROUP_SIZES = (32, 64, 128)  # what MLX's 1- and 2-bit kernels accept
SCALE_DTYPE_NAMES = ("float16", "bfloat16")
KEPT_DTYPE_NAMES = ("float16", "bfloat16", "float32")
# A recipe's kept_dtype may also be "source": the checkpoint's own dtype, copied bit for bit.
RECIPE_KEPT_DTYPES = ("source", *KEPT_DTYPE_NAMES)


def __getattr__(name: str):
    # SCALE_DTYPES, KEPT_DTYPES: name -> torch.dtype
    if name in ("SCALE_DTYPES", "KEPT_DTYPES"):
        import torch

        names = SCALE_DTYPE_NAMES if name == "SCALE_DTYPES" else KEPT_DTYPE_NAMES
        return {n: getattr(torch, n) for n in names}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")

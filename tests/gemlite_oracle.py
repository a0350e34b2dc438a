"""gemlite's own bit packing, loaded on a CPU-only machine, as the oracle for our gemlite `W_q`.

`import gemlite` queries the CUDA device at import time, so it cannot be imported here. Its `bitpack.py`
only needs torch, triton (for kernels we do not call) and the sibling `dtypes.py`, so we register an empty
`gemlite` package object pointing at the installed source and import `gemlite.bitpack` alone. Without
triton installed, a throwaway stand-in satisfies the module-level `@triton.jit` and `tl.<dtype>` uses;
nothing of triton runs in `pack_weights_over_cols_torch`.

Where the source comes from: an installed `gemlite` distribution (`pip install --no-deps gemlite==0.6.0.post2`
installs it even though importing it fails without a GPU), else the directory in BONSAI_GEMLITE_SRC (the
`gemlite` package directory or its parent). `load_bitpack()` returns None with a reason when neither exists.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from pathlib import Path

ENV_VAR = "BONSAI_GEMLITE_SRC"
_NAMES = ("gemlite", "gemlite.bitpack", "gemlite.dtypes", "triton", "triton.language")


def find_source() -> tuple[Path | None, str]:
    """(package directory holding bitpack.py, how it was found) or (None, why not)."""
    try:
        dist = importlib.metadata.distribution("gemlite")
        for f in dist.files or ():
            if f.as_posix() == "gemlite/bitpack.py":
                path = Path(dist.locate_file(f)).parent
                if (path / "bitpack.py").is_file():
                    return path, f"installed gemlite {dist.version}"
    except importlib.metadata.PackageNotFoundError:
        pass
    env = os.environ.get(ENV_VAR)
    if env:
        for cand in (Path(env), Path(env) / "gemlite"):
            if (cand / "bitpack.py").is_file():
                return cand, f"{ENV_VAR}={env}"
        return None, f"{ENV_VAR}={env} holds no gemlite/bitpack.py"
    return None, f"gemlite source not found: pip install --no-deps gemlite==0.6.0.post2 or set {ENV_VAR}"


class _AnyAttr(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return f"<stand-in triton.language.{name}>"


def _triton_stand_in() -> dict[str, types.ModuleType]:
    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)
    triton.cdiv = lambda a, b: -(-a // b)
    language = _AnyAttr("triton.language")
    triton.language = language
    return {"triton": triton, "triton.language": language}


@functools.lru_cache(maxsize=1)
def load_bitpack() -> tuple[types.ModuleType | None, str]:
    """(gemlite.bitpack module, source description) or (None, reason to skip)."""
    src, how = find_source()
    if src is None:
        return None, how
    saved = {name: sys.modules.get(name) for name in _NAMES}
    stand_in = importlib.util.find_spec("triton") is None
    try:
        package = types.ModuleType("gemlite")
        package.__path__ = [str(src)]
        sys.modules["gemlite"] = package
        if stand_in:
            sys.modules.update(_triton_stand_in())
        module = importlib.import_module("gemlite.bitpack")
    except Exception as exc:  # an oracle that cannot load is a skip, not a failure of our code
        return None, f"could not import gemlite.bitpack from {src}: {exc!r}"
    finally:
        # Leave no fake `gemlite`/`triton` behind for other code that probes for them.
        # A real triton imported on the way stays: dropping only some of its submodules would break it.
        for name, mod in saved.items():
            if name.startswith("triton") and not stand_in:
                continue
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    return module, how


def pack_weights_over_cols(q, w_nbits: int, packing_bitwidth: int = 8, transpose: bool = True):
    """gemlite.bitpack.pack_weights_over_cols_torch(W_q, W_nbits, packing_bitwidth, transpose) -> (packed, per)."""
    module, why = load_bitpack()
    if module is None:
        raise RuntimeError(why)
    return module.pack_weights_over_cols_torch(q, W_nbits=w_nbits, packing_bitwidth=packing_bitwidth,
                                               transpose=transpose)

"""Load a pack as a real diffusers `Flux2Transformer2DModel` with `PackedLinear`s in place of quantized Linears."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BonsaiError, PackError
from ..flux2 import model_kwargs
from ..pack_check import open_pack, pack_headers
from ..packing.folders import CONFIG_NAME, pack_folders
from ..packing.targets import NAMES, TARGETS
from ..readers.published import find_published, published_folder
from ..shards import read_json
from .cuda.backend import apply_backend, choose_backend
from .packed_linear import PackedLinear
from .published import load_published_transformer

# Where a convert output holds several packs: the registry's order.
TARGET_PREFERENCE = NAMES


def _format_of(folder: Path) -> str:
    path = folder / CONFIG_NAME
    qconfig = read_json(path, PackError)
    if not isinstance(qconfig, dict):
        raise PackError(f"{path}: expected a JSON object")
    fmt = qconfig.get("format")
    return fmt if isinstance(fmt, str) else repr(fmt)


def resolve_pack(path: Path, target: str | None = None) -> Path:
    """A pack folder, or the preferred target's folder of a `convert` output holding several; or a published
    Bonsai pack folder (its layout counts as `mlx` or `gemlite`)."""
    if find_published(path):
        return published_folder(path, target)
    folders = pack_folders(Path(path))
    formats = {_format_of(f): f for f in folders}
    if target is not None:
        if target not in formats:
            raise PackError(f"{path}: no {target} pack here (found: {', '.join(sorted(formats))})")
        return formats[target]
    for fmt in TARGET_PREFERENCE:
        if fmt in formats:
            return formats[fmt]
    raise PackError(f"{path}: no {', '.join(NAMES)} pack found (formats: {sorted(formats)})")


class PackReader:
    """Streams tensors out of a pack's safetensors with the pread backend (no whole-file mapping), by diffusers
    tensor name whatever the pack's own names (`pack_check.pack_headers`)."""

    def __init__(self, folder: Path, headers: dict | None = None):
        self.folder = folder
        if headers is None:
            headers = pack_headers(folder, _format_of(Path(folder)))
        self.files = {n: i.file for n, i in headers.items()}
        self.stored = {n: i.name for n, i in headers.items()}
        self._handles = {}

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from its file's header (nothing read)."""
        file = self.files.get(name)
        if file is None:
            raise PackError(f"{self.folder}: tensor {name!r} is missing from the pack")
        from safetensors import safe_open

        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), "pt", backend="pread")
        return tuple(handle.get_slice(self.stored[name]).get_shape())

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files.get(name)
        if file is None:
            raise PackError(f"{self.folder}: tensor {name!r} is missing from the pack")
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = safe_open(str(file), "pt", backend="pread")
            return handle.get_tensor(self.stored[name])
        except Exception as e:  # safetensors' own error types are not stable across versions
            raise PackError(f"{file}: cannot read tensor {name!r}: {e}") from None


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     target: str | None = None, backend: str | None = None):
    """The pack as a ready-to-run `Flux2Transformer2DModel`; kept tensors in `dtype`, low-bit layers packed.

    `backend` picks the runtime of the low-bit layers (`cuda.BACKENDS`): "reference" (torch, any device),
    "gemlite", or "cuda" (this package's Triton kernels); by default "cuda" where it runs on `device`.

    The pack's structure is checked against its config.json before anything is built (`pack_check.open_pack`);
    its sha256 are `verify`'s to check."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    chosen = choose_backend(backend, device)
    folder = resolve_pack(Path(path), target)
    if find_published(folder):
        if backend not in (None, "reference"):
            raise BonsaiError(f"{folder}: a published Bonsai pack runs on the reference backend (its levels are "
                              f"symmetric only up to rounding), not {backend!r}; use backend='reference'")
        return load_published_transformer(folder, dtype=dtype, device=device)
    pack = open_pack(folder)
    qconfig, layout = pack.qconfig, pack.format
    reader = PackReader(folder, pack.headers)
    suffixes = TARGETS[layout].buffers
    with init_empty_weights():
        model = Flux2Transformer2DModel(**model_kwargs(pack.config))
    for module, q in qconfig.quantized.items():
        out_features, in_features = q.shape
        buffers = {s: reader.get(f"{module}.{s}").to(device) for s in suffixes}
        model.set_submodule(module, PackedLinear(layout, in_features, out_features, q.bits, qconfig.group_size,
                                                 buffers))
    kept = {name: reader.get(name).to(device=device, dtype=dtype) for name in qconfig.kept}
    model.load_state_dict(kept, strict=False, assign=True)
    model.register_to_config(_name_or_path=str(folder))
    return apply_backend(model, folder, chosen).eval()

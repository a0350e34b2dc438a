"""Load a pack as a real diffusers `Flux2Transformer2DModel` with `PackedLinear`s in place of quantized Linears."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import read_header
from ..describe import CONFIG_NAME, pack_folders
from ..errors import PackError
from ..flux2 import model_kwargs, read_config
from .packed_linear import LAYOUT_BUFFERS, PackedLinear

TARGET_PREFERENCE = ("mlx", "gemlite", "bonsai")


def resolve_pack(path: Path, target: str | None = None) -> Path:
    """A pack folder, or the preferred target's folder of a `convert` output holding several."""
    folders = pack_folders(Path(path))
    formats = {json.loads((f / CONFIG_NAME).read_text()).get("format"): f for f in folders}
    if target is not None:
        if target not in formats:
            raise PackError(f"{path}: no {target} pack here (found: {', '.join(sorted(map(str, formats)))})")
        return formats[target]
    for fmt in TARGET_PREFERENCE:
        if fmt in formats:
            return formats[fmt]
    raise PackError(f"{path}: no MLX, gemlite or bonsai pack found (formats: {sorted(map(str, formats))})")


def pack_files(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a pack (single file or index + shards)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise PackError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    return {name: single for name in read_header(single)}


class PackReader:
    """Streams tensors out of a pack's safetensors with the pread backend (no whole-file mapping)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = pack_files(folder)
        self._handles = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files.get(name)
        if file is None:
            raise PackError(f"{self.folder}: tensor {name!r} is missing from the pack")
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), "pt", backend="pread")
        return handle.get_tensor(name)


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     target: str | None = None):
    """The pack as a ready-to-run `Flux2Transformer2DModel`; kept tensors in `dtype`, low-bit layers packed."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    folder = resolve_pack(Path(path), target)
    qconfig = json.loads((folder / CONFIG_NAME).read_text())
    layout = qconfig.get("format")
    config = read_config(folder / "config.json")
    reader = PackReader(folder)
    if layout not in LAYOUT_BUFFERS:
        raise PackError(f"{folder}: format {layout!r} in {CONFIG_NAME}; valid: {', '.join(LAYOUT_BUFFERS)}")
    suffixes = LAYOUT_BUFFERS[layout]
    with init_empty_weights():
        model = Flux2Transformer2DModel(**model_kwargs(config))
    for module, q in qconfig["quantized"].items():
        out_features, in_features = q["shape"]
        buffers = {s: reader.get(f"{module}.{s}").to(device) for s in suffixes}
        model.set_submodule(module, PackedLinear(layout, in_features, out_features, q["bits"],
                                                 qconfig["group_size"], buffers))
    kept = {name: reader.get(name).to(device=device, dtype=dtype) for name in qconfig["kept"]}
    missing = [n for n, p in model.named_parameters() if p.is_meta and n not in kept]
    if missing:
        raise PackError(f"{folder}: {CONFIG_NAME} lists neither as quantized nor kept: {missing[:5]}")
    model.load_state_dict(kept, strict=False, assign=True)
    model.register_to_config(_name_or_path=str(folder))
    return model.eval()

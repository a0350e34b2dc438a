"""The pack-folder contract: which files make a pack folder, and how a convert output holds several."""

from __future__ import annotations

from pathlib import Path

from ..errors import PackError
from .targets import target as registered

CONFIG_NAME = "quantization_config.json"


def weights_name(fmt: str) -> str:
    """The safetensors file of a `fmt` pack (each target names its own: `Target.weights_stem`)."""
    return registered(fmt).weights_name


def index_name(fmt: str) -> str:
    """The shard index of a sharded `fmt` pack."""
    return registered(fmt).index_name


def pack_folders(path: Path) -> list[Path]:
    """A pack folder itself, or the per-target pack folders of a convert output."""
    path = Path(path)
    if (path / CONFIG_NAME).exists():
        return [path]
    found = sorted(p.parent for p in path.glob(f"*/{CONFIG_NAME}"))
    if not found:
        raise PackError(f"{path}: no {CONFIG_NAME} here or one level down; is this a bonsai-quant pack?")
    return found

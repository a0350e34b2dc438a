"""The registry of pack targets: one entry per format, asked by everything that lists or dispatches on targets.

A target is one module under `packing/` (the contract in docs/design.md: SUFFIXES, BUFFERS, layout, pack,
unpack, decode_rows) plus its `Target` entry below. The packer module is imported on first use, so listing
the targets (argument parsing, `--help`) does not load torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import PackError


@dataclass(frozen=True)
class Target:
    name: str                  # the pack folder name and quantization_config.json's "format"
    module: str                # bonsai_quant.packing.<module>: SUFFIXES, BUFFERS, layout, pack, unpack, decode_rows
    safetensors_format: str    # the `format` of every safetensors file's __metadata__ (what loaders read)
    runtime: bool              # a runtime loads it as is (repack writes it); False: distribution only
    role: str                  # one line for a release's model card
    slots: dict[str, str] | None = None  # mode -> how codes are stored, where it is not "<bits>-bit slots"

    @property
    def packer(self) -> ModuleType:
        return importlib.import_module(f"{__package__}.{self.module}")

    @property
    def suffixes(self) -> tuple[str, ...]:
        return self.packer.SUFFIXES

    @property
    def buffers(self) -> tuple[str, ...]:
        return self.packer.BUFFERS

    def layout(self, out_features, in_features, mode, group_size, scale_dtype):
        return self.packer.layout(out_features, in_features, mode, group_size, scale_dtype)

    def pack(self, codes, scales, mode, group_size):
        return self.packer.pack(codes, scales, mode, group_size)

    def unpack(self, tensors, mode, group_size):
        return self.packer.unpack(tensors, mode, group_size)

    def decode_rows(self, *args):
        return self.packer.decode_rows(*args)


# In order of preference where a convert output holds several and a reader may take any.
_REGISTRY = (
    Target("mlx", "mlx", "mlx", True, "MLX (Apple Silicon)"),
    Target("gemlite", "gemlite", "pt", True, "gemlite (CUDA)"),
    Target("bonsai", "bonsai", "pt", False, "compact distribution (repack to a runtime layout)",
           slots={"binary": "1 bit per weight", "ternary": "5 trits per byte"}),
)
TARGETS: dict[str, Target] = {t.name: t for t in _REGISTRY}
NAMES: tuple[str, ...] = tuple(TARGETS)
RUNTIME_NAMES: tuple[str, ...] = tuple(t.name for t in _REGISTRY if t.runtime)


def target(name: str, error=PackError, what: str = "target") -> Target:
    """The registered target `name`; `error(...)` naming the valid ones otherwise."""
    found = TARGETS.get(name) if isinstance(name, str) else None
    if found is None:
        raise error(f"unknown {what} {name!r}; valid: {', '.join(NAMES)}")
    return found

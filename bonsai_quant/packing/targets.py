"""The registry of pack targets: one entry per format, asked by everything that lists or dispatches on targets.

A target is one module under `packing/` (the contract in docs/design.md: SUFFIXES, BUFFERS, layout, pack,
unpack, decode_rows, and where its files name tensors otherwise than diffusers stored_name/source_name) plus its
`Target` entry below. The packer module is imported on first use, so listing
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
    weights_stem: str = "model"  # <stem>.safetensors, or its shards + <stem>.safetensors.index.json
    # The scale dtype of a recipe writing this target when the recipe names none: what its consumers hold
    # (mlx-vlm casts MLX scales to bf16, the published MLX packs store it), so they load exactly what was quantized.
    default_scale_dtype: str = "float16"
    # Its pack folder in a release: the published snapshot's name where a consumer looks for it (default: name).
    release_folder: str | None = None

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

    def decode_rows(self, *args, **kwargs):
        return self.packer.decode_rows(*args, **kwargs)

    @property
    def weights_name(self) -> str:
        return f"{self.weights_stem}.safetensors"

    @property
    def index_name(self) -> str:
        return f"{self.weights_name}.index.json"

    def stored_name(self, name: str) -> str:
        """The name this target's files give the tensor diffusers calls `name` (a packer may rename)."""
        rename = getattr(self.packer, "stored_name", None)
        return rename(name) if rename is not None else name

    def source_name(self, stored: str) -> str:
        """Inverse of `stored_name`."""
        rename = getattr(self.packer, "source_name", None)
        return rename(stored) if rename is not None else stored

    @property
    def folder(self) -> str:
        return self.release_folder or self.name

    def check_readable(self, mode: str, group_size: int) -> None:
        """PackError where this target's consumers cannot read layers of `mode` at `group_size` (checked before
        any shape is known; `layout` refuses them too)."""
        check = getattr(self.packer, "check_readable", None)
        if check is not None:
            check(mode, group_size)

    def extra_metadata(self, modes) -> dict[str, str]:
        """More `__metadata__` keys a consumer of this target reads, for a pack whose layers use `modes`."""
        extra = getattr(self.packer, "extra_metadata", None)
        return extra(modes) if extra is not None else {}


# In order of preference where a convert output holds several and a reader may take any.
_REGISTRY = (
    # diffusers' file name, which the published MLX snapshots keep and mlx-vlm's Bonsai loader requires.
    Target("mlx", "mlx", "mlx", True, "MLX (Apple Silicon): mlx-vlm's Bonsai loader",
           weights_stem="diffusion_pytorch_model", default_scale_dtype="bfloat16",
           release_folder="transformer-packed-mflux"),
    Target("gemlite", "gemlite", "pt", True, "gemlite (CUDA)"),
    Target("bonsai", "bonsai", "pt", False, "compact distribution (repack to a runtime layout)",
           slots={"binary": "1 bit per weight", "ternary": "5 trits per byte"}),
    # mflux's saved format: mflux (0.24) reads it, and mlx-vlm's FLUX.2 loader, as a model folder's transformer/.
    Target("mflux", "mflux", "mlx", True, "MLX (Apple Silicon): mflux, mlx-vlm's FLUX.2 loader",
           default_scale_dtype="bfloat16", release_folder="transformer"),
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

"""Codes and scales for the pack round-trip tests of every target, and a watchdog for bad-input tests."""

import contextlib
import signal
import struct

import torch


def make_codes(mode: str, out: int, inn: int, ramp: bool, seed: int) -> torch.Tensor:
    k = 2 if mode == "binary" else 3
    if ramp:  # a fixed pattern makes a permuted or shifted slot show up as a visibly wrong pattern
        raw = (torch.arange(out * inn) % k).reshape(out, inn).to(torch.int8)
    else:
        raw = torch.randint(0, k, (out, inn), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    return raw * 2 - 1 if mode == "binary" else raw - 1


def make_scales(out: int, groups: int, dtype: torch.dtype, seed: int, negative_zero: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    magnitude = 10.0 ** (torch.rand(out, groups, generator=g) * 6 - 4)  # 1e-4 .. 1e2
    s = torch.randn(out, groups, generator=g) * magnitude
    s[torch.rand(out, groups, generator=g) < 0.1] = 0.0  # all-zero groups have s = 0
    if negative_zero:
        s[torch.rand(out, groups, generator=g) < 0.05] = -0.0  # the sign of zero must survive too
    return s.to(dtype)


def full_codes(out: int, inn: int, value: int = 1) -> torch.Tensor:
    """Every code the same: the base for planting one bad code in an error test."""
    return torch.full((out, inn), value, dtype=torch.int8)


def full_scales(out: int, groups: int, dtype: torch.dtype = torch.float16, value: float = 0.5) -> torch.Tensor:
    return torch.full((out, groups), value, dtype=dtype)


@contextlib.contextmanager
def watchdog(seconds: int, what: str):
    """Raise TimeoutError in this thread after `seconds`: ends a run that would otherwise take hours (and all
    the memory) when the check under test is missing. Not a timing assertion: the checks take milliseconds."""
    def expire(*_):
        raise TimeoutError(f"{what} still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def reseal_in_place(folder, edit) -> None:
    """Edit the tensors of `folder/model.safetensors` in place and reseal its manifest, as a careful tamperer
    would: the header stays byte-identical, so only verify's deeper checks can tell."""
    from safetensors.torch import load_file

    from bonsai_quant.checkpoint import read_header
    from bonsai_quant.manifest import write_manifest

    (file,) = folder.glob("*.safetensors")  # each target names its own weights file
    tensors = load_file(str(file))
    edit(tensors)
    data = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    for name, info in read_header(file).items():
        raw = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        data[8 + n + info.offset:8 + n + info.offset + len(raw)] = raw
    file.write_bytes(bytes(data))
    (folder / "manifest.json").unlink()
    write_manifest(folder)


def flip_code(folder, module: str, row: int, col: int) -> None:
    """Give one code of `module` in the pack at `folder` another valid value, packed by the pack's own target
    and resealed: a pack that a faulty packer could have written, which only a re-quantization can tell."""
    from bonsai_quant.packing.config import PackConfig
    from bonsai_quant.packing.targets import TARGETS

    q = PackConfig.load(folder)
    target, mode = TARGETS[q.format], q.quantized[module].mode

    def edit(tensors):
        codes, scales = target.unpack({s: tensors[f"{module}.{s}"] for s in target.suffixes}, mode, q.group_size)
        codes[row, col] = -1 if int(codes[row, col]) == 1 else 1
        tensors.update({f"{module}.{s}": t for s, t in target.pack(codes, scales, mode, q.group_size).items()})

    reseal_in_place(folder, edit)

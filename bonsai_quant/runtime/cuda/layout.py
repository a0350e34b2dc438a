"""The resident weight layout of the CUDA backend, built from any pack format without widening the codes.

Codes stay packed as in the pack, only re-oriented so that a byte row runs along the output features
(`codes[k_byte, n]`, the gemlite orientation): a kernel tile then reads consecutive bytes across n.

- "bits1": binary, bit k % 8 of byte k // 8 is (code + 1) / 2 (MLX, gemlite and bonsai all store these bits);
- "bits2": ternary, bits 2 (k % 4) .. of byte k // 4 hold code + 1 (MLX and gemlite);
- "trits": ternary, digit k % 5 (base 3, lowest first) of byte k // 5 holds code + 1 (bonsai), so the 1.6
  bits per weight of a bonsai pack stay 1.6 bits resident.

`scales` is s itself, [in / group, out] in the pack's 16-bit dtype (MLX and gemlite binary store 2s and -s;
only s is kept, so a binary layer holds less than its pack).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import PackError

ENCODINGS = {"bits1": 1, "bits2": 2, "trits": 3}  # the kernels' ENC constant
CODES_PER_BYTE = {"bits1": 8, "bits2": 4, "trits": 5}


@dataclass
class PackedWeights:
    encoding: str
    codes: torch.Tensor   # uint8 [ceil(in / per_byte), out]
    scales: torch.Tensor  # fp16/bf16 [in / group, out]
    in_features: int
    out_features: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


def from_buffers(layout: str, buffers: dict[str, torch.Tensor], in_features: int, out_features: int, bits: int,
                 group_size: int) -> PackedWeights:
    """PackedWeights from one layer's pack tensors (`packed_linear.LAYOUT_BUFFERS[layout]`), on their device."""
    if bits not in (1, 2):
        raise PackError(f"the CUDA backend runs 1-bit (binary) and 2-bit (ternary) layers, got bits={bits}")
    binary = bits == 1
    if layout in ("mlx", "mflux"):  # mflux packs hold MLX's tensors (under mflux's names, which PackReader undoes)
        # uint32 words LSB-first on a little-endian host are the same bits as LSB-first bytes.
        codes = buffers["weight"].contiguous().view(torch.uint8).t().contiguous()
        scales = (-buffers["biases"]).t().contiguous()
        encoding = "bits1" if binary else "bits2"
    elif layout == "gemlite":
        codes = buffers["W_q"].contiguous()
        if binary:
            scales = (-buffers["zeros"]).contiguous()
        else:
            if int(buffers["zeros"]) != 1:
                raise PackError(f"gemlite ternary layer stores zero point {int(buffers['zeros'])}, expected 1")
            scales = buffers["scales"].contiguous()
        encoding = "bits1" if binary else "bits2"
    elif layout == "bonsai":
        codes = buffers["codes"].t().contiguous()
        scales = buffers["scales"].t().contiguous()
        encoding = "bits1" if binary else "trits"
    else:
        raise PackError(f"unknown pack layout {layout!r}; valid: mlx, gemlite, bonsai, mflux")
    want = -(-in_features // CODES_PER_BYTE[encoding])
    if tuple(codes.shape) != (want, out_features) or tuple(scales.shape) != (in_features // group_size,
                                                                               out_features):
        raise PackError(f"{layout} layer [{out_features}, {in_features}]: codes {list(codes.shape)} / scales "
                        f"{list(scales.shape)} do not match {want} code bytes and {in_features // group_size} "
                        f"groups per output feature")
    return PackedWeights(encoding, codes, scales, in_features, out_features, group_size)


def from_codes(codes: torch.Tensor, scales: torch.Tensor, encoding: str, group_size: int) -> PackedWeights:
    """PackedWeights straight from int8 codes [out, in] and scales [out, in / group] (on any device)."""
    out_features, in_features = codes.shape
    t = (codes.t().to(torch.int16) + 1).to(torch.uint8)  # [in, out] slot values
    if encoding == "bits1":
        t = t >> 1
    per = CODES_PER_BYTE[encoding]
    rows = -(-in_features // per)
    pad = rows * per - in_features
    if pad:
        t = torch.cat([t, torch.ones(pad, out_features, dtype=torch.uint8, device=t.device)])  # code 0
    t = t.view(rows, per, out_features).to(torch.int32)
    if encoding == "trits":
        weights = 3 ** torch.arange(per, dtype=torch.int32, device=t.device)
    else:
        weights = 1 << (torch.arange(per, dtype=torch.int32, device=t.device) * (8 // per))
    packed = (t * weights[None, :, None]).sum(1).to(torch.uint8)
    return PackedWeights(encoding, packed, scales.t().contiguous(), in_features, out_features, group_size)


def codes_of(w: PackedWeights) -> torch.Tensor:
    """int8 codes [out, in] from the resident layout, in torch (the kernels' bit-exact oracle)."""
    per = CODES_PER_BYTE[w.encoding]
    b = w.codes.to(torch.int32)
    k = torch.arange(w.in_features, device=b.device)
    digit = k % per
    byte = b[k // per]  # [in, out]
    if w.encoding == "trits":
        q = torch.div(byte, (3 ** digit)[:, None], rounding_mode="floor") % 3
    else:
        bits = 8 // per
        q = (byte >> (digit * bits)[:, None]) & ((1 << bits) - 1)
    if w.encoding == "bits1":
        q = q * 2
    return (q - 1).to(torch.int8).t().contiguous()


def dense_of(w: PackedWeights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * s as [out, in] in `dtype` (exact in float32 or wider)."""
    c = codes_of(w).to(dtype).view(w.out_features, -1, w.group_size)
    return (c * w.scales.t().to(dtype)[:, :, None]).view(w.out_features, w.in_features)

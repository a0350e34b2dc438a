"""Triton kernels of the CUDA backend: packed-code matmuls, e4m3 activation quantization, code expansion.

Every kernel reads the resident layout of `layout.PackedWeights` (codes[k_byte, n], scales[group, n]) and
walks K one 128-wide group at a time, so the weight scale of a group multiplies an exact partial sum:

- `packed_gemv` / `packed_dot` / `packed_dot_t`: the small-M kernels (M <= 64): each code byte loaded once
  and expanded in registers, fp32 FMAs (a few rows) or tensor cores (up to 64), K split with the last program
  reducing. `packed_dot_t` computes y^T = W x^T, so the decoded codes are the tensor-core product's first
  operand, which Hopper's wgmma reads from registers.
- `packed_matmul`: 16-bit (or fp32) activations x codes decoded one load per code, fp32 accumulation; the
  bf16-activation path at any M, bonsai trits, and the small-M kernels' reference while tuning.
- `quantize_e4m3`: activations to e4m3 with one power-of-two scale per (token, 128 channels).
- `packed_fp8_matmul`: e4m3 activations x codes decoded to e4m3 inside the K loop (no expanded copy), one
  fp8 tensor-core product per 128-wide block promoted to fp32 with weight scale x activation scale.
- `expand_words` (`expand_e4m3` for trits): codes -> e4m3 [out, in] in a scratch buffer, for
  `torch._scaled_mm`'s blockwise path.
"""

from __future__ import annotations

import triton
import triton.language as tl

GROUP = 128  # the K block every kernel walks; packs with another group size take the reference runtime

# K is a compile-time constant of the matmuls (one build per layer width, five in klein): the K loop's trip
# count is then known to the compiler, and Triton's interpreter cannot iterate over a run-time bound.


@triton.jit
def _decode(w_ptr, offs_k, offs_n, N, mask, ENC: tl.constexpr):
    """int32 codes in {-1, 0, +1} of a [len(offs_k), len(offs_n)] tile."""
    if ENC == 1:
        b = tl.load(w_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mask, other=0).to(tl.int32)
        c = ((b >> (offs_k[:, None] % 8)) & 1) * 2 - 1
    elif ENC == 2:
        b = tl.load(w_ptr + (offs_k[:, None] // 4) * N + offs_n[None, :], mask=mask, other=0).to(tl.int32)
        c = ((b >> ((offs_k[:, None] % 4) * 2)) & 3) - 1
    else:
        b = tl.load(w_ptr + (offs_k[:, None] // 5) * N + offs_n[None, :], mask=mask, other=0).to(tl.int32)
        d = offs_k[:, None] % 5
        p = tl.where(d == 0, 1, tl.where(d == 1, 3, tl.where(d == 2, 9, tl.where(d == 3, 27, 81))))
        c = (b // p) % 3 - 1
    return c


@triton.jit
def packed_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_ym,
                         ENC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         IEEE: tl.constexpr):
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // 128):
        offs_k = g * 128 + tl.arange(0, 128)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        c = _decode(w_ptr, offs_k, offs_n, N, mask_n[None, :], ENC)
        if IEEE:
            part = tl.dot(x, c.to(x.dtype), input_precision="ieee")
        else:
            part = tl.dot(x, c.to(x.dtype))
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += part * s[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _x_times_codes(xj, b, j: tl.constexpr, ENC: tl.constexpr):
    """x[k] * code[k, n] in fp32 for the j-th code of every byte: xj [KB] fp32, b [KB, BN] int32 bytes.

    Binary: a code of -1 flips x's sign bit (one shift and one three-input logic op per weight, no multiply,
    no int-to-float conversion). Ternary: 2**23 + q as fp32 bits is exact, minus 2**23 + 1 gives q - 1."""
    if ENC == 1:
        xb = xj.to(tl.int32, bitcast=True)
        return (xb[:, None] ^ (~(b << (31 - j)) & -2147483648)).to(tl.float32, bitcast=True)
    else:
        q = (b >> (2 * j)) & 3
        c = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0
        return xj[:, None] * c


@triton.jit
def _codes_16(b, j: tl.constexpr, ENC: tl.constexpr, ONE: tl.constexpr):
    """The bits of the j-th code of every byte as a 16-bit float (ONE: the bits of 1.0 in that format),
    built with integer ops on the bit pattern: the sign bit is the code's."""
    if ENC == 1:
        v = ((b << (15 - j)) & 0x8000) ^ (ONE | 0x8000)
    else:
        # slot q = code + 1: its high bit is the sign as in the binary case (set: +1); its low bit means 0 and
        # multiplies the value away (a mask from it compiles to compare-and-select, slower here)
        v = (((b << (14 - 2 * j)) & 0x8000) ^ (ONE | 0x8000)) * (((b >> (2 * j)) & 1) ^ 1)
    return v.to(tl.int16)


@triton.jit
def _split_epilogue(acc, y_ptr, p_ptr, cnt_ptr, tile, offs, mask, pid_k, stride_os, SPLIT: tl.constexpr,
                    LAST_REDUCES: tl.constexpr):
    """Write a program's output tile: straight to y without a K split; else its fp32 partial, and (with
    LAST_REDUCES) the program of the tile that arrives last -- counted by an acq_rel atomic after a barrier, so
    every thread's partial is visible -- sums the SPLIT partials in split order (deterministic), writes y and
    re-arms the counter, which saves the second launch of `split_sum_kernel`."""
    if SPLIT == 1:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptr + pid_k * stride_os + offs, acc, mask=mask)
        if LAST_REDUCES:
            tl.debug_barrier()
            count = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if count == SPLIT - 1:
                tot = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT):
                    tot += tl.load(p_ptr + s * stride_os + offs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + offs, tot.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def packed_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, p_ptr, cnt_ptr, M, N, stride_xm, stride_os,
                       ENC: tl.constexpr, PER: tl.constexpr, GPS: tl.constexpr, SPLIT: tl.constexpr,
                       LAST_REDUCES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Few rows (M <= a handful): each program owns one row, BLOCK_N outputs and GPS groups of K (split K
    when GPS < K / 128). Each code byte is loaded once and expanded in registers, the group's 128 products
    summed in fp32 before its scale multiplies them. Row programs of one tile run side by side (axis 0), so
    the tile's bytes come from L2 after the first."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    KB: tl.constexpr = 128 // PER
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # The scale multiplies the group's [KB, BLOCK_N] partial sums element-wise (one FMA per 128 / KB weights)
    # and the sum over KB, which crosses warps, happens once after the K loop rather than once per group.
    acc = tl.zeros((KB, BLOCK_N), dtype=tl.float32)
    for i in range(0, GPS):
        g = pid_k * GPS + i
        offs_kb = g * KB + tl.arange(0, KB)
        b = tl.load(w_ptr + offs_kb[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0).to(tl.int32)
        part = tl.zeros((KB, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PER):
            xj = tl.load(x_ptr + m * stride_xm + offs_kb * PER + j).to(tl.float32)
            part += _x_times_codes(xj, b, j, ENC)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += part * s[None, :]
    acc = tl.sum(acc, axis=0)
    _split_epilogue(acc, y_ptr, p_ptr, cnt_ptr, m * tl.num_programs(1) + pid_n, m * N + offs_n, mask_n, pid_k,
                    stride_os, SPLIT, LAST_REDUCES)


@triton.jit
def _slots(x3, PER: tl.constexpr):
    """[R, KB, PER] -> the PER slices x3[:, :, j] in j order, by halving the last axis (tl.split). When the load
    puts that axis in one thread's registers the splits are register selects: Triton then hands each slice to
    the tensor cores in their operand layout, with no pass through shared memory."""
    r: tl.constexpr = x3.shape[0]
    kb: tl.constexpr = x3.shape[1]
    a, b = tl.split(tl.reshape(x3, (r, kb, PER // 2, 2)))  # j even / odd
    if PER == 4:
        s0, s2 = tl.split(a)
        s1, s3 = tl.split(b)
        return s0, s1, s2, s3
    else:
        a0, a1 = tl.split(tl.reshape(a, (r, kb, 2, 2)))  # j = 0, 4 / 2, 6
        b0, b1 = tl.split(tl.reshape(b, (r, kb, 2, 2)))  # j = 1, 5 / 3, 7
        s0, s4 = tl.split(a0)
        s2, s6 = tl.split(a1)
        s1, s5 = tl.split(b0)
        s3, s7 = tl.split(b1)
        return s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def packed_dot_kernel(x_ptr, w_ptr, s_ptr, y_ptr, p_ptr, cnt_ptr, M, N, stride_xm, stride_os,
                      ENC: tl.constexpr, PER: tl.constexpr, GPS: tl.constexpr, SPLIT: tl.constexpr,
                      LAST_REDUCES: tl.constexpr, ONE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, XSPLIT: tl.constexpr = False):
    """Up to 64 rows on tensor cores: per group, the [128 / PER, BLOCK_N] code bytes are loaded once and the
    j-th code of each byte is a [KB, BLOCK_N] operand against the activations x[:, PER * kb + j] (so no
    reshape of the expanded tile is needed); the group's partial product is fp32, then scaled.

    XSPLIT: the group's activations are one [BLOCK_M, KB, PER] load (contiguous, pipelined) split into the
    PER slot operands in registers, instead of PER strided loads staged through shared memory one by one."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    KB: tl.constexpr = 128 // PER
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, GPS):
        g = pid_k * GPS + i
        offs_kb = g * KB + tl.arange(0, KB)
        b = tl.load(w_ptr + offs_kb[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0).to(tl.int32)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if XSPLIT:
            offs_j = tl.arange(0, PER)
            x3 = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + offs_kb[None, :, None] * PER
                         + offs_j[None, None, :], mask=mask_m[:, None, None], other=0.0)
            xs = _slots(x3, PER)
            for j in tl.static_range(PER):
                c = _codes_16(b, j, ENC, ONE).to(x_ptr.dtype.element_ty, bitcast=True)
                part = tl.dot(xs[j], c, part)
        else:
            for j in tl.static_range(PER):
                xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_kb[None, :] * PER + j,
                             mask=mask_m[:, None], other=0.0)
                c = _codes_16(b, j, ENC, ONE).to(x_ptr.dtype.element_ty, bitcast=True)
                part = tl.dot(xj, c, part)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += part * s[None, :]
    _split_epilogue(acc, y_ptr, p_ptr, cnt_ptr, pid_m * tl.num_programs(0) + pid_n,
                    offs_m[:, None] * N + offs_n[None, :], mask_m[:, None] & mask_n[None, :], pid_k, stride_os,
                    SPLIT, LAST_REDUCES)


@triton.jit
def packed_dot_t_kernel(x_ptr, w_ptr, s_ptr, y_ptr, p_ptr, cnt_ptr, M, N, stride_xm, stride_os,
                        ENC: tl.constexpr, PER: tl.constexpr, GPS: tl.constexpr, SPLIT: tl.constexpr,
                        LAST_REDUCES: tl.constexpr, ONE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """`packed_dot` transposed: y^T [BLOCK_N, BLOCK_M] = codes [BLOCK_N, KB] @ x^T [KB, BLOCK_M] per code slot,
    so the codes are the product's first operand. On Hopper a BLOCK_N of 64 or more makes that a wgmma whose
    first operand comes from registers: the code bytes are decoded where they land (the operand's register
    layout) and only the small x^T tile is staged in shared memory, as wgmma's second operand must be."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    KB: tl.constexpr = 128 // PER
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(0, GPS):
        g = pid_k * GPS + i
        offs_kb = g * KB + tl.arange(0, KB)
        b = tl.load(w_ptr + offs_kb[None, :] * N + offs_n[:, None], mask=mask_n[:, None], other=0).to(tl.int32)
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(PER):
            xj = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_kb[:, None] * PER + j, mask=mask_m[None, :],
                         other=0.0)
            c = _codes_16(b, j, ENC, ONE).to(x_ptr.dtype.element_ty, bitcast=True)
            part = tl.dot(c, xj, part)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += part * s[:, None]
    _split_epilogue(acc, y_ptr, p_ptr, cnt_ptr, pid_m * tl.num_programs(0) + pid_n,
                    offs_m[None, :] * N + offs_n[:, None], mask_m[None, :] & mask_n[:, None], pid_k, stride_os,
                    SPLIT, LAST_REDUCES)


@triton.jit
def split_sum_kernel(p_ptr, y_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum over the SPLIT fp32 partial outputs, in split order (deterministic, no atomics)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_e4m3(v):
    """v (fp32, |v| <= 448) rounded to nearest-even on the e4m3 grid, as fp32.

    The hardware conversion does this too; doing it here first means the conversion that follows is exact,
    so Triton's interpreter (whose fp8 cast mis-rounds across powers of two) computes the GPU's bits."""
    vbits = v.to(tl.int32, bitcast=True)
    bits = vbits & 0x7FFFFFFF
    a = bits.to(tl.float32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = (bits + 0x7FFFF + lsb) & -1048576  # keep 3 mantissa bits
    sub = ((a + 16384.0) - 16384.0).to(tl.int32, bitcast=True)  # below 2**-6 the step is 2**-9, fp32's at 2**14
    r = tl.where(a < 0.015625, sub, normal)
    return (r | (vbits & -2147483648)).to(tl.float32, bitcast=True)  # the sign, zeros included


@triton.jit
def quantize_e4m3_kernel(x_ptr, q_ptr, sx_ptr, M, K, stride_xm, stride_sm, stride_sg, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = g * 128 + tl.arange(0, 128)
    mask = offs_m[:, None] < M
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    # Smallest power of two p with amax / p <= 448 = 1.75 * 2**8: from amax's exponent and mantissa.
    abits = amax.to(tl.int32, bitcast=True)
    e = ((abits >> 23) & 0xFF) - 127 - 8 + ((abits & 0x7FFFFF) > 0x600000).to(tl.int32)
    e = tl.where(amax > 0, tl.maximum(e, -126), 0)
    e = tl.minimum(e, 126)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    q = _round_e4m3(x * inv[:, None])
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q.to(tl.float8e4nv), mask=mask)
    tl.store(sx_ptr + offs_m * stride_sm + g * stride_sg, scale, mask=offs_m < M)


@triton.jit
def packed_fp8_matmul_kernel(q_ptr, sx_ptr, w_ptr, s_ptr, y_ptr, M, N, K: tl.constexpr, stride_sm, stride_sg, stride_ym,
                             ENC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             GROUP_M: tl.constexpr):
    # Grouped launch order: GROUP_M row tiles share each column tile's codes while they sit in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // 128):
        offs_k = g * 128 + tl.arange(0, 128)
        a = tl.load(q_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        c = _decode(w_ptr, offs_k, offs_n, N, mask_n[None, :], ENC)
        part = tl.dot(a, c.to(tl.float32).to(tl.float8e4nv), out_dtype=tl.float32)
        sa = tl.load(sx_ptr + offs_m * stride_sm + g * stride_sg, mask=mask_m, other=0.0)
        sw = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += part * sa[:, None] * sw[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def expand_e4m3_kernel(w_ptr, s_ptr, out_ptr, sw_ptr, N, K, ENC: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = g * 128 + tl.arange(0, 128)
    mask_n = offs_n < N
    c = _decode(w_ptr, offs_k, offs_n, N, mask_n[None, :], ENC)  # [128, BLOCK_N]
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], c.to(tl.float32).to(tl.float8e4nv),
             mask=mask_n[None, :])
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(sw_ptr + g * N + offs_n, s, mask=mask_n)


@triton.jit
def _e4m3_lanes_binary(b):
    """Four e4m3 codes in the byte lanes of an int32, from 4 code bits (bit i -> lane i): a multiply by
    1 + 2**7 + 2**14 + 2**21 moves bit i to bit 8i with no two partial products overlapping."""
    lanes = (((b & 0xF) ^ 0xF) * 0x204081) & 0x01010101  # 1 where the code is -1
    return 0x38383838 | (lanes << 7)  # 1.0 = 0x38, its sign bit 0x80


@triton.jit
def _e4m3_lanes_ternary(b):
    """Four e4m3 codes in the byte lanes of an int32 from four 2-bit slots q = code + 1. Each slot's two bits
    are moved to lane LSBs apart: bit 2i times 2**(6i) lands on bit 8i; the only overlapping partial
    products fall on bits 6, 12 and 18 and carry at most into 7, 13 and 19, never into a lane's bit."""
    lo = ((b & 0x55) * 0x41041) & 0x01010101  # q & 1: the code is 0
    hi = (((b >> 1) & 0x55) * 0x41041) & 0x01010101  # q & 2: the code is +1
    return (0x38383838 | ((hi ^ 0x01010101) << 7)) & ((lo ^ 0x01010101) * 0xFF)


@triton.jit
def expand_words_kernel(w_ptr, s_ptr, out_ptr, sw_ptr, N, K, ENC: tl.constexpr, PER: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Codes -> e4m3 [N, K] one code byte at a time: the byte's 8 binary (or 4 ternary) codes become one
    64-bit (32-bit) word of e4m3 bytes in K order, built with a few integer ops per four codes, and the tile
    is transposed on chip so each row n is written as 128 contiguous bytes per group."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    KB: tl.constexpr = 128 // PER
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kb = g * KB + tl.arange(0, KB)
    mask_n = offs_n < N
    b = tl.load(w_ptr + offs_kb[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0).to(tl.int32)
    dst = out_ptr + offs_n[:, None] * (K // PER) + offs_kb[None, :]
    if ENC == 1:
        lo = _e4m3_lanes_binary(b).to(tl.uint32).to(tl.int64)
        hi = _e4m3_lanes_binary(b >> 4).to(tl.uint32).to(tl.int64)
        tl.store(dst, tl.trans(lo | (hi << 32)), mask=mask_n[:, None])  # [BLOCK_N, KB]
    else:
        tl.store(dst, tl.trans(_e4m3_lanes_ternary(b)), mask=mask_n[:, None])
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(sw_ptr + g * N + offs_n, s, mask=mask_n)

"""Triton GroupNorm(+ReLU), forward and backward, NCHW and NHWC (bitfast.ops.group_norm, backend "triton").

Same algorithm as csrc/group_norm_cpu.cpp (its header has the math). In short, per (n, g) over M = C/G * S elements:
mean and M2 come from Chan merges of exact two-pass pieces of x - x0 (x0 an element of the same sample, so a large
common offset loses no bits); z = (x - mean) * (rstd * w) + b, y = relu(z). Backward: dz = dy masked by the
recomputed z > 0; per (n, c) sdz = sum dz, sdzxm = sum dz * (x - mean); dx = dz * rstd * w + (x - mean) * q + r.
dweight/dbias are reduced over n in order by one program per channel block: no atomics, bit-identical reruns.

NCHW, x (N, C, S): one program per (n, g) (its C/G * S elements are contiguous). A group of <= NCHW_TILE elements
is one register tile, read once (x, or x and dy); a larger one is read by tiles twice (statistics, then the output
pass, re-read from L2) by wider programs, so that fewer groups are in flight per SM (see NCHW_TILE).
NHWC, x (N, S, C) in memory: per chunk of samples whose x (backward: x and dy) fits L2_BYTES (as csrc/group_norm.cu),
tiles of (BLOCK_R rows, BLOCK_C channels), loaded once, coalesced along C:
  1. per tile, per-channel two-pass moments (backward: sums) -> partials (chunk samples, B, C);
  2. one program per (n, g) merges its channels' partials over the B row blocks, then the channels into the group;
  3. the output pass on the same tiles, re-reading the chunk from L2.
Element offsets: an int64 base per group (NCHW) or sample (NHWC), int32 offsets within it (fewer registers).
y and dx are written with streaming stores (cache_modifier ".cs", st.global.cs: evict-first), as csrc/group_norm.cu
does, so that the output stream does not evict the x (and dy) that the output pass is about to re-read from L2.
"""
import os

import torch
import triton
import triton.language as tl

from bitfast.kernels._common import div, eps_arg, guarded


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def _rsqrt(m2, count, eps, ACC: tl.constexpr):
    if ACC == tl.float64:  # eps arrives as a 1-element fp64 tensor: a float argument would be rounded to fp32
        return 1.0 / tl.sqrt(m2 / count + tl.load(eps))
    else:
        return div(1.0, tl.sqrt_rn(div(m2, count, ACC) + eps), ACC)  # tl.sqrt is the approximate one for fp32


@triton.jit
def _chan(cnt, mean, m2, nb, bm, bq, ACC: tl.constexpr):
    """Chan's merge of (count, mean, M2) with a piece of nb elements, mean bm and M2 bq."""
    tot = cnt + nb
    delta = bm - mean
    f = div(nb, tot, ACC)
    return tot, mean + delta * f, m2 + bq + delta * delta * cnt * f


# ------------------------------------------------------------------------------------------------ NCHW
@triton.jit
def _scale_shift(w_ptr, b_ptr, c, cm, rs, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Per-channel z = (x - mean) * k + h for channels c (mask cm): k = rstd * weight, h = bias."""
    k = tl.full([BLOCK], 1.0, ACC) * rs
    if HAS_W:
        k = k * tl.load(w_ptr + c, mask=cm, other=0.0)
    h = tl.zeros([BLOCK], ACC)
    if HAS_B:
        h = tl.load(b_ptr + c, mask=cm, other=0.0).to(ACC)
    return k, h


@triton.jit
def _weights(w_ptr, c, cm, HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_W:
        return tl.load(w_ptr + c, mask=cm, other=0.0)
    else:
        return tl.full([BLOCK], 1.0, ACC)


@triton.jit
def _nchw_fwd(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, G, D, S, eps, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, ONE: tl.constexpr, BLOCK: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    ng = tl.program_id(0).to(tl.int64)
    M = D * S
    xg = x_ptr + ng * M  # the group's int64 base; offsets inside it are int32 (M < 2^31: the launcher checks)
    yg = y_ptr + ng * M
    c0 = (ng % G) * D
    x0 = tl.load(xg).to(ACC)  # shift
    rd = tl.arange(0, BLOCK_D)
    rs_ = tl.arange(0, BLOCK_S)
    tile = rd[:, None] * S + rs_[None, :]  # (BLOCK_D channels, BLOCK_S positions), int32
    if ONE:  # the whole group is one tile: x is read once and normalized from registers
        dm = rd < D
        msk = dm[:, None] & (rs_ < S)[None, :]
        v = tl.where(msk, tl.load(xg + tile, mask=msk, other=0.0).to(ACC) - x0, 0.0)
        mean = div(tl.sum(tl.sum(v, 1), 0), tl.cast(M, ACC), ACC)
        d = tl.where(msk, v - mean, 0.0)
        rs = _rsqrt(tl.sum(tl.sum(d * d, 1), 0), tl.cast(M, ACC), eps, ACC)
        tl.store(mean_ptr + ng, x0 + mean)
        tl.store(rstd_ptr + ng, rs)
        k, h = _scale_shift(w_ptr, b_ptr, c0 + rd, dm, rs, HAS_W, HAS_B, ACC, BLOCK_D)
        z = d * k[:, None] + h[:, None]
        if RELU:
            z = tl.where(z < 0.0, 0.0, z)  # not tl.maximum: NaN stays NaN, as in torch.relu
        tl.store(yg + tile, z.to(y_ptr.dtype.element_ty), mask=msk, cache_modifier=".cs")
    else:  # stats over flat BLOCK pieces, then the output pass over (channels, positions) tiles (an L2 re-read)
        offs = tl.arange(0, BLOCK)
        cnt = x0 * 0  # ACC scalars (a float literal would be fp32 even for fp64 input)
        mean = x0 * 0
        m2 = x0 * 0
        for i0 in range(0, M, BLOCK):  # two-pass per BLOCK piece, Chan merge across pieces
            msk = i0 + offs < M
            v = tl.where(msk, tl.load(xg + i0 + offs, mask=msk, other=0.0).to(ACC) - x0, 0.0)
            nb = tl.cast(tl.minimum(M - i0, BLOCK), ACC)
            cm = div(tl.sum(v, 0), nb, ACC)
            d = tl.where(msk, v - cm, 0.0)
            cnt, mean, m2 = _chan(cnt, mean, m2, nb, cm, tl.sum(d * d, 0), ACC)
        mu = x0 + mean
        rs = _rsqrt(m2, tl.cast(M, ACC), eps, ACC)
        tl.store(mean_ptr + ng, mu)
        tl.store(rstd_ptr + ng, rs)
        for d0 in range(0, D, BLOCK_D):
            dm = d0 + rd < D
            k, h = _scale_shift(w_ptr, b_ptr, c0 + d0 + rd, dm, rs, HAS_W, HAS_B, ACC, BLOCK_D)
            for s0 in range(0, S, BLOCK_S):
                msk = dm[:, None] & (s0 + rs_ < S)[None, :]
                o = d0 * S + s0 + tile
                z = (tl.load(xg + o, mask=msk, other=0.0).to(ACC) - mu) * k[:, None] + h[:, None]
                if RELU:
                    z = tl.where(z < 0.0, 0.0, z)
                tl.store(yg + o, z.to(y_ptr.dtype.element_ty), mask=msk, cache_modifier=".cs")


@triton.jit
def _centered_grad(xg, dyg, o, msk, mu, k, h, RELU: tl.constexpr, ACC: tl.constexpr):
    """A (channels, positions) tile of x - mean and of dy, zeroed outside msk and where the recomputed ReLU was off."""
    xm = tl.load(xg + o, mask=msk, other=0.0).to(ACC) - mu
    dz = tl.load(dyg + o, mask=msk, other=0.0).to(ACC)
    if RELU:
        dz = tl.where(xm * k[:, None] + h[:, None] <= 0.0, 0.0, dz)
    return xm, tl.where(msk, dz, 0.0)


@triton.jit
def _nchw_bwd(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sdz_ptr, sdzxm_ptr, G, D, S,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, ONE: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    ng = tl.program_id(0).to(tl.int64)
    M = D * S
    xg = x_ptr + ng * M  # int64 bases, int32 offsets
    dyg = dy_ptr + ng * M
    dxg = dx_ptr + ng * M
    c0 = (ng % G) * D
    nc0 = (ng // G) * G * D + c0  # (n, c0) in the (N, C) sums
    mu = tl.load(mean_ptr + ng)
    rs = tl.load(rstd_ptr + ng)
    rd = tl.arange(0, BLOCK_D)
    rs_ = tl.arange(0, BLOCK_S)
    tile = rd[:, None] * S + rs_[None, :]
    if ONE:  # the whole group is one tile: x and dy are read once, dx computed from registers
        dm = rd < D
        msk = dm[:, None] & (rs_ < S)[None, :]
        k, h = _scale_shift(w_ptr, b_ptr, c0 + rd, dm, rs, HAS_W, HAS_B, ACC, BLOCK_D)
        xm, dz = _centered_grad(xg, dyg, tile, msk, mu, k, h, RELU, ACC)
        t0 = tl.sum(dz, 1)
        t1 = tl.sum(dz * xm, 1)
        tl.store(sdz_ptr + nc0 + rd, t0, mask=dm)
        tl.store(sdzxm_ptr + nc0 + rd, t1, mask=dm)
        wc = _weights(w_ptr, c0 + rd, dm, HAS_W, ACC, BLOCK_D)
        c1 = div(tl.sum(tl.where(dm, wc * t0, 0.0), 0), tl.cast(M, ACC), ACC)
        c2 = div(rs * tl.sum(tl.where(dm, wc * t1, 0.0), 0), tl.cast(M, ACC), ACC)
        dx = dz * k[:, None] + xm * (-rs * rs * c2) + (-rs * c1)
        tl.store(dxg + tile, dx.to(dx_ptr.dtype.element_ty), mask=msk, cache_modifier=".cs")
    else:
        gw = mu * 0  # ACC scalars
        gwxm = mu * 0
        for d0 in range(0, D, BLOCK_D):  # per-channel sums of dz and dz * (x - mean)
            dm = d0 + rd < D
            k, h = _scale_shift(w_ptr, b_ptr, c0 + d0 + rd, dm, rs, HAS_W, HAS_B, ACC, BLOCK_D)
            t0 = tl.zeros([BLOCK_D], ACC)
            t1 = tl.zeros([BLOCK_D], ACC)
            for s0 in range(0, S, BLOCK_S):  # row sums per tile: no (BLOCK_D, BLOCK_S) accumulators to hold
                msk = dm[:, None] & (s0 + rs_ < S)[None, :]
                xm, dz = _centered_grad(xg, dyg, d0 * S + s0 + tile, msk, mu, k, h, RELU, ACC)
                t0 += tl.sum(dz, 1)
                t1 += tl.sum(dz * xm, 1)
            tl.store(sdz_ptr + nc0 + d0 + rd, t0, mask=dm)
            tl.store(sdzxm_ptr + nc0 + d0 + rd, t1, mask=dm)
            wc = _weights(w_ptr, c0 + d0 + rd, dm, HAS_W, ACC, BLOCK_D)
            gw += tl.sum(tl.where(dm, wc * t0, 0.0), 0)
            gwxm += tl.sum(tl.where(dm, wc * t1, 0.0), 0)
        c1 = div(gw, tl.cast(M, ACC), ACC)
        c2 = div(rs * gwxm, tl.cast(M, ACC), ACC)
        q = -rs * rs * c2
        r = -rs * c1
        for d0 in range(0, D, BLOCK_D):
            dm = d0 + rd < D
            k, h = _scale_shift(w_ptr, b_ptr, c0 + d0 + rd, dm, rs, HAS_W, HAS_B, ACC, BLOCK_D)
            for s0 in range(0, S, BLOCK_S):
                msk = dm[:, None] & (s0 + rs_ < S)[None, :]
                o = d0 * S + s0 + tile
                xm, dz = _centered_grad(xg, dyg, o, msk, mu, k, h, RELU, ACC)
                dx = dz * k[:, None] + xm * q + r
                tl.store(dxg + o, dx.to(dx_ptr.dtype.element_ty), mask=msk, cache_modifier=".cs")


# ------------------------------------------------------------------------------------------------ NHWC
@triton.jit
def _nhwc_tile(pid, n0, S, C, NB, NCB, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program pid of the chunk from sample n0 -> (n, its partials row (i * NB + blk) * C, the sample's int64 base
    offset n * S * C, int32 element offsets (BLOCK_R, BLOCK_C) in the sample, tile mask, channels, channel mask)."""
    pid = pid.to(tl.int64)
    cb = (pid % NCB).to(tl.int32)
    blk = ((pid // NCB) % NB).to(tl.int32)
    i = pid // (NCB * NB)  # sample within the chunk
    rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    msk = (rows < S)[:, None] & cm[None, :]
    n = n0 + i
    return n, (i * NB + blk) * C, n * S * C, rows[:, None] * C + ch[None, :], msk, ch, cm


@triton.jit
def _nhwc_moments(x_ptr, pm_ptr, pq_ptr, n0, S, C, NB, NCB, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    n, prow, so, offs, msk, ch, cm = _nhwc_tile(pid, n0, S, C, NB, NCB, BLOCK_R, BLOCK_C)
    xs = x_ptr + so
    x0 = tl.load(xs + ch, mask=cm, other=0.0).to(ACC)  # row 0 of the sample: the shift
    v = tl.where(msk, tl.load(xs + offs, mask=msk, other=0.0).to(ACC) - x0[None, :], 0.0)
    blk = (pid // NCB) % NB
    cnt = tl.cast(tl.minimum(S - blk * BLOCK_R, BLOCK_R), ACC)
    mu = div(tl.sum(v, 0), cnt, ACC)
    d = tl.where(msk, v - mu[None, :], 0.0)
    o = prow + ch
    tl.store(pm_ptr + o, mu, mask=cm)
    tl.store(pq_ptr + o, tl.sum(d * d, 0), mask=cm)


@triton.jit
def _nhwc_group_stats(x_ptr, pm_ptr, pq_ptr, mean_ptr, rstd_ptr, n0, S, C, G, D, NB, eps, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    ng = n0 * G + tl.program_id(0).to(tl.int64)  # one program per (n, g) of the chunk
    n = ng // G
    c0 = (ng % G) * D
    rd = tl.arange(0, BLOCK_D)
    dm = rd < D
    cnt = tl.zeros([BLOCK_D], ACC)
    mean = tl.zeros([BLOCK_D], ACC)
    m2 = tl.zeros([BLOCK_D], ACC)
    for blk in range(0, NB):  # per channel, merge the row blocks in order
        o = ((n - n0) * NB + blk) * C + c0 + rd
        nb = tl.cast(tl.minimum(S - blk * BLOCK_R, BLOCK_R), ACC)
        bm = tl.load(pm_ptr + o, mask=dm, other=0.0)
        bq = tl.load(pq_ptr + o, mask=dm, other=0.0)
        cnt, mean, m2 = _chan(cnt, mean, m2, nb, bm, bq, ACC)
    x0 = tl.load(x_ptr + n * S * C + c0 + rd, mask=dm, other=0.0).to(ACC)
    ref = tl.load(x_ptr + n * S * C + c0).to(ACC)
    mean = tl.where(dm, mean + (x0 - ref), 0.0)  # channel means relative to ref
    gmean = div(tl.sum(mean, 0), tl.cast(D, ACC), ACC)  # channels hold S elements each: the group mean is their plain average
    dmean = tl.where(dm, mean - gmean, 0.0)
    gm2 = tl.sum(tl.where(dm, m2, 0.0), 0) + S * tl.sum(dmean * dmean, 0)
    tl.store(mean_ptr + ng, ref + gmean)
    tl.store(rstd_ptr + ng, _rsqrt(gm2, tl.cast(D * S, ACC), eps, ACC))


@triton.jit
def _nhwc_coefs(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, ch, cm, G, D, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                ACC: tl.constexpr):
    """Per-channel (mean, rstd * w, b) for sample n."""
    ng = n * G + ch // D
    mu = tl.load(mean_ptr + ng, mask=cm, other=0.0)
    k = tl.load(rstd_ptr + ng, mask=cm, other=0.0)
    if HAS_W:
        k = k * tl.load(w_ptr + ch, mask=cm, other=0.0)
    h = tl.zeros(ch.shape, ACC)
    if HAS_B:
        h = tl.load(b_ptr + ch, mask=cm, other=0.0).to(ACC)
    return mu, k, h


@triton.jit
def _nhwc_normalize(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, n0, S, C, G, D, NB, NCB, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    n, prow, so, offs, msk, ch, cm = _nhwc_tile(tl.program_id(0), n0, S, C, NB, NCB, BLOCK_R, BLOCK_C)
    mu, k, h = _nhwc_coefs(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, ch, cm, G, D, HAS_W, HAS_B, ACC)
    z = (tl.load(x_ptr + so + offs, mask=msk, other=0.0).to(ACC) - mu[None, :]) * k[None, :] + h[None, :]
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN
    tl.store(y_ptr + so + offs, z.to(y_ptr.dtype.element_ty), mask=msk, cache_modifier=".cs")


@triton.jit
def _nhwc_bwd_sums(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, p0_ptr, p1_ptr, n0, S, C, G, D, NB, NCB,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    n, prow, so, offs, msk, ch, cm = _nhwc_tile(tl.program_id(0), n0, S, C, NB, NCB, BLOCK_R, BLOCK_C)
    mu, k, h = _nhwc_coefs(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, ch, cm, G, D, HAS_W, HAS_B, ACC)
    xm = tl.load(x_ptr + so + offs, mask=msk, other=0.0).to(ACC) - mu[None, :]
    dz = tl.load(dy_ptr + so + offs, mask=msk, other=0.0).to(ACC)
    if RELU:
        dz = tl.where(xm * k[None, :] + h[None, :] <= 0.0, 0.0, dz)
    dz = tl.where(msk, dz, 0.0)
    o = prow + ch
    tl.store(p0_ptr + o, tl.sum(dz, 0), mask=cm)
    tl.store(p1_ptr + o, tl.sum(dz * xm, 0), mask=cm)


@triton.jit
def _nhwc_bwd_group(p0_ptr, p1_ptr, w_ptr, rstd_ptr, sdz_ptr, sdzxm_ptr, qr_ptr, n0, S, C, G, D, NB,
                    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    ng = n0 * G + tl.program_id(0).to(tl.int64)  # one program per (n, g) of the chunk
    n = ng // G
    c0 = (ng % G) * D
    rd = tl.arange(0, BLOCK_D)
    dm = rd < D
    t0 = tl.zeros([BLOCK_D], ACC)
    t1 = tl.zeros([BLOCK_D], ACC)
    for blk in range(0, NB):  # row blocks in order
        o = ((n - n0) * NB + blk) * C + c0 + rd
        t0 += tl.load(p0_ptr + o, mask=dm, other=0.0)
        t1 += tl.load(p1_ptr + o, mask=dm, other=0.0)
    tl.store(sdz_ptr + n * C + c0 + rd, t0, mask=dm)
    tl.store(sdzxm_ptr + n * C + c0 + rd, t1, mask=dm)
    wc = tl.full([BLOCK_D], 1.0, ACC)
    if HAS_W:
        wc = tl.load(w_ptr + c0 + rd, mask=dm, other=0.0)
    rs = tl.load(rstd_ptr + ng)
    M = tl.cast(D * S, ACC)
    c1 = div(tl.sum(wc * t0, 0), M, ACC)
    c2 = div(rs * tl.sum(wc * t1, 0), M, ACC)
    tl.store(qr_ptr + 2 * ng, -rs * rs * c2)
    tl.store(qr_ptr + 2 * ng + 1, -rs * c1)


@triton.jit
def _nhwc_bwd_dx(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, qr_ptr, n0, S, C, G, D, NB, NCB,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    n, prow, so, offs, msk, ch, cm = _nhwc_tile(tl.program_id(0), n0, S, C, NB, NCB, BLOCK_R, BLOCK_C)
    mu, k, h = _nhwc_coefs(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, ch, cm, G, D, HAS_W, HAS_B, ACC)
    ng = n * G + ch // D
    q = tl.load(qr_ptr + 2 * ng, mask=cm, other=0.0)
    r = tl.load(qr_ptr + 2 * ng + 1, mask=cm, other=0.0)
    xm = tl.load(x_ptr + so + offs, mask=msk, other=0.0).to(ACC) - mu[None, :]
    dz = tl.load(dy_ptr + so + offs, mask=msk, other=0.0).to(ACC)
    if RELU:
        dz = tl.where(xm * k[None, :] + h[None, :] <= 0.0, 0.0, dz)
    dx = dz * k[None, :] + xm * q[None, :] + r[None, :]
    tl.store(dx_ptr + so + offs, dx.to(dx_ptr.dtype.element_ty), mask=msk, cache_modifier=".cs")


@triton.jit
def _param_grads(rstd_ptr, a_ptr, b_ptr, dw_ptr, db_ptr, R, C, G, D, SLICE, SCALE: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Program (channel block, slice s) sums rows [s * SLICE, min(R, (s + 1) * SLICE)) of the (R, C) tables a, b in
    increasing order into row s of dw, db: SCALE: a = sdzxm weighted by rstd, b = sdz (rows: n); else the slices."""
    ch = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    s = tl.program_id(1)
    tw = tl.zeros([BLOCK_C], ACC)
    tb = tl.zeros([BLOCK_C], ACC)
    for r in range(s * SLICE, tl.minimum(R, (s + 1) * SLICE)):  # increasing order: deterministic
        v = tl.load(a_ptr + r * C + ch, mask=cm, other=0.0)
        if SCALE:
            v = v * tl.load(rstd_ptr + r * G + ch // D, mask=cm, other=0.0)
        tw += v
        tb += tl.load(b_ptr + r * C + ch, mask=cm, other=0.0)
    tl.store(dw_ptr + s * C + ch, tw, mask=cm)
    tl.store(db_ptr + s * C + ch, tb, mask=cm)


# ------------------------------------------------------------------------------------------------ launchers
def _p2(v):
    return triton.next_power_of_2(max(int(v), 1))


def _int32(v, what):
    """v, checked to fit the int32 offsets the kernels take inside one group or one sample (on an int64 base)."""
    if v >= 2**31:
        raise ValueError(f"group_norm (triton): {what} has {v} >= 2^31 elements")
    return v


def _geometry(x, num_groups):
    """(N, C, S, D, channels_last) of a dense x: contiguous is NCHW, anything else is channels_last (N, S, C)."""
    N, C = x.shape[:2]
    S = x.numel() // (N * C) if N * C else 0
    return N, C, S, C // num_groups, not x.is_contiguous()


# NCHW programs: int32 offsets on the group's int64 base. A group that fits one tile of NCHW_TILE elements (8 warps,
# 16 per thread) is read once, from registers (ONE). A larger one is read twice (statistics, then the output pass,
# an L2 re-read) by wider programs: fewer programs per SM keep fewer groups in flight, so that the re-read still
# finds its group in L2. Programs of 16 warps (at most 4 per SM), or of 32 (2 per SM) when the group's x (backward:
# x and dy) outgrows NCHW_WIDE_BYTES (BiT's 256x56^2 backward: 100 KB in bf16); 8 elements per thread, 4 backward
# at 16 warps (x and dy per tile). All <= 128 registers, no spills: >= 512 threads per SM at every BiT shape.
NCHW_TILE, NCHW_WARPS, NCHW_WIDE_BYTES = 4096, 8, 64 << 10
NCHW_BIG = {("fwd", 16): 4096, ("fwd", 32): 8192, ("bwd", 16): 2048, ("bwd", 32): 4096}  # (dir, warps) -> tile


def _nchw_blocks(D, S, nbytes, direction="fwd"):
    """(BLOCK_D, BLOCK_S, ONE, num_warps) for groups of D x S elements of nbytes (summed over x, dy) each."""
    def fit(tile):
        bs = min(_p2(S), tile)
        bd = min(_p2(D), max(1, tile // bs))
        return bd, bs, bd >= D and bs >= S

    bd, bs, one = fit(NCHW_TILE)
    if one:  # backward: x and dy of a tile over 2048 elements take 16 warps (128 registers at 8, 2048x7^2)
        return bd, bs, True, 2 * NCHW_WARPS if direction == "bwd" and bd * bs > NCHW_TILE // 2 else NCHW_WARPS
    warps = 32 if D * S * nbytes > NCHW_WIDE_BYTES else 16
    return fit(NCHW_BIG[direction, warps])[:2] + (False, warps)


# NHWC: samples per chunk such that a chunk's x (backward: x and dy) fits this many bytes of L2, so the output pass
# re-reads it from L2. The same knob and the same balanced chunks as csrc/group_norm.cu (BITFAST_GN_L2_BYTES there
# is a compile-time define; here the environment variable, read at import, or this attribute: tests lower it).
L2_BYTES = int(os.environ.get("BITFAST_GN_L2_BYTES", 24 << 20))


def chunk_samples(N, S_C, nbytes):
    """Samples per NHWC chunk: as many as fit L2_BYTES (at least 1), balanced: ceil(N / chunks), so that no 1-2
    sample tail chunk runs a fraction of a wave on its own."""
    cap = max(1, min(N, L2_BYTES // max(1, S_C * nbytes)))
    return -(-N // -(-N // cap))


NHWC_TILE, NHWC_WARPS = 8192, 8  # 32 elements per thread; 64 rows per tile at C >= 128: (N, S / 64, C) partials


def _nhwc_blocks(C):
    bc = min(_p2(C), 128)
    return max(1, NHWC_TILE // bc), bc  # (BLOCK_R, BLOCK_C)


def _flags(weight, bias, x):
    dummy = x.new_empty(1, dtype=_acc_torch(x.dtype))
    return (weight if weight is not None else dummy, bias if bias is not None else dummy,
            weight is not None, bias is not None)


@guarded
def group_norm_fwd(x, weight, bias, num_groups, eps, relu):
    """-> (y, mean, rstd). weight/bias: acc dtype, contiguous, or None. y keeps x's layout."""
    N, C, S, D, cl = _geometry(x, num_groups)
    G, acc_t = num_groups, _acc_torch(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty((N, G), dtype=acc_t, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    w, b, has_w, has_b = _flags(weight, bias, x)
    ACC, eps = _acc(x.dtype), eps_arg(eps, acc_t, x.device)
    if not cl:
        bd, bs, one, nw = _nchw_blocks(_int32(D * S, "a group") // S, S, x.element_size())
        _nchw_fwd[(N * G,)](x, y, w, b, mean, rstd, G, D, S, eps, has_w, has_b, relu, ACC, one,
                            BLOCK=min(_p2(D * S), bd * bs), BLOCK_D=bd, BLOCK_S=bs, num_warps=nw, num_stages=1)
        return y, mean, rstd
    br, bc = _nhwc_blocks(C)
    NB, NCB = triton.cdiv(S, br), triton.cdiv(C, bc)
    NS = chunk_samples(N, _int32(S * C, "a sample"), x.element_size())
    pm = torch.empty((NS, NB, C), dtype=acc_t, device=x.device)  # one chunk's partials, reused (stream order)
    pq = torch.empty_like(pm)
    for n0 in range(0, N, NS):  # x of a chunk is re-read by _nhwc_normalize from L2
        ns = min(NS, N - n0)
        tiles = (ns * NB * NCB,)
        _nhwc_moments[tiles](x, pm, pq, n0, S, C, NB, NCB, ACC, BLOCK_R=br, BLOCK_C=bc, num_warps=NHWC_WARPS)
        _nhwc_group_stats[(ns * G,)](x, pm, pq, mean, rstd, n0, S, C, G, D, NB, eps, ACC, BLOCK_R=br,
                                     BLOCK_D=_p2(D))
        _nhwc_normalize[tiles](x, y, w, b, mean, rstd, n0, S, C, G, D, NB, NCB, has_w, has_b, relu, ACC,
                               BLOCK_R=br, BLOCK_C=bc, num_warps=NHWC_WARPS)
    return y, mean, rstd


@guarded
def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, relu):
    """-> (dx, dweight, dbias); dy has x's layout; dweight/dbias are acc dtype (C,), always computed."""
    N, C, S, D, cl = _geometry(x, num_groups)
    G, acc_t = num_groups, _acc_torch(x.dtype)
    dx = torch.empty_like(x)
    dw = torch.zeros(C, dtype=acc_t, device=x.device)
    db = torch.zeros_like(dw)
    if x.numel() == 0:
        return dx, dw, db
    w, b, has_w, has_b = _flags(weight, bias, x)
    ACC = _acc(x.dtype)
    sdz = torch.empty((N, C), dtype=acc_t, device=x.device)
    sdzxm = torch.empty_like(sdz)
    if not cl:
        bd, bs, one, nw = _nchw_blocks(_int32(D * S, "a group") // S, S, 2 * x.element_size(), "bwd")
        _nchw_bwd[(N * G,)](dy, x, dx, w, b, mean, rstd, sdz, sdzxm, G, D, S, has_w, has_b, relu, ACC, one,
                            BLOCK_D=bd, BLOCK_S=bs, num_warps=nw, num_stages=1)
    else:
        br, bc = _nhwc_blocks(C)
        NB, NCB = triton.cdiv(S, br), triton.cdiv(C, bc)
        NS = chunk_samples(N, _int32(S * C, "a sample"), 2 * x.element_size())  # x and dy of a chunk fit L2
        p0 = torch.empty((NS, NB, C), dtype=acc_t, device=x.device)
        p1 = torch.empty_like(p0)
        qr = torch.empty((N, G, 2), dtype=acc_t, device=x.device)
        for n0 in range(0, N, NS):
            ns = min(NS, N - n0)
            tiles = (ns * NB * NCB,)
            _nhwc_bwd_sums[tiles](dy, x, w, b, mean, rstd, p0, p1, n0, S, C, G, D, NB, NCB, has_w, has_b, relu,
                                  ACC, BLOCK_R=br, BLOCK_C=bc, num_warps=NHWC_WARPS)
            _nhwc_bwd_group[(ns * G,)](p0, p1, w, rstd, sdz, sdzxm, qr, n0, S, C, G, D, NB, has_w, ACC,
                                       BLOCK_D=_p2(D))
            _nhwc_bwd_dx[tiles](dy, x, dx, w, b, mean, rstd, qr, n0, S, C, G, D, NB, NCB, has_w, has_b, relu, ACC,
                                BLOCK_R=br, BLOCK_C=bc, num_warps=NHWC_WARPS)
    _reduce_params(rstd, sdz, sdzxm, dw, db, N, C, G, D, ACC)
    return dx, dw, db


# dweight/dbias over n: P = ceil(N / PARAM_SLICE) slices summed in parallel, then the P slices in order (P > 1),
# as csrc/group_norm.cu's param_grads: one program's serial loop of N dependent loads (bench/budget.py models ~50 ns
# per n: 12.8 us at N = 256) becomes two of 16 and N / 16. Fixed slices, fixed order: bit-identical reruns.
PARAM_SLICE = 16


def _reduce_params(rstd, sdz, sdzxm, dw, db, N, C, G, D, ACC):
    bc, P = min(_p2(C), 256), triton.cdiv(N, PARAM_SLICE)
    grid = (triton.cdiv(C, bc), P)
    if P == 1:
        _param_grads[grid](rstd, sdzxm, sdz, dw, db, N, C, G, D, PARAM_SLICE, True, ACC, BLOCK_C=bc)
        return
    part = torch.empty((2, P, C), dtype=dw.dtype, device=dw.device)
    _param_grads[grid](rstd, sdzxm, sdz, part[0], part[1], N, C, G, D, PARAM_SLICE, True, ACC, BLOCK_C=bc)
    _param_grads[(grid[0], 1)](rstd, part[0], part[1], dw, db, P, C, G, D, P, False, ACC, BLOCK_C=bc)

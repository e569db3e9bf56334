"""Triton GroupNorm(+ReLU), forward and backward, NCHW and NHWC (bitfast.ops.group_norm, backend "triton").

Same algorithm as csrc/group_norm_cpu.cpp (its header has the math). In short, per (n, g) over M = C/G * S elements:
mean and M2 come from Chan merges of exact two-pass pieces of x - x0 (x0 an element of the same sample, so a large
common offset loses no bits); z = (x - mean) * (rstd * w) + b, y = relu(z). Backward: dz = dy masked by the
recomputed z > 0; per (n, c) sdz = sum dz, sdzxm = sum dz * (x - mean); dx = dz * rstd * w + (x - mean) * q + r.
dweight/dbias are reduced over n in order by one program per channel block: no atomics, bit-identical reruns.

NCHW, x (N, C, S): one program per (n, g) (its C/G * S elements are contiguous).
NHWC, x (N, S, C) in memory: tiles of (BLOCK_R rows, BLOCK_C channels), loaded once, coalesced along C:
  1. per tile, per-channel two-pass moments (backward: sums) -> partials (N, B, C);
  2. one program per (n, g) merges its channels' partials over the B row blocks, then the channels into the group;
  3. the output pass on the same tiles.
"""
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
def _nchw_fwd(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, G, D, S, eps, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    ng = tl.program_id(0).to(tl.int64)
    M = D * S
    base = ng * M
    x0 = tl.load(x_ptr + base).to(ACC)  # shift
    offs = tl.arange(0, BLOCK)
    cnt = x0 * 0  # ACC scalars (a float literal would be fp32 even for fp64 input)
    mean = x0 * 0
    m2 = x0 * 0
    for i0 in range(0, M, BLOCK):  # two-pass per BLOCK piece, Chan merge across pieces
        msk = i0 + offs < M
        v = tl.where(msk, tl.load(x_ptr + base + i0 + offs, mask=msk, other=0.0).to(ACC) - x0, 0.0)
        nb = tl.cast(tl.minimum(M - i0, BLOCK), ACC)
        cm = div(tl.sum(v, 0), nb, ACC)
        d = tl.where(msk, v - cm, 0.0)
        q = tl.sum(d * d, 0)
        n = cnt + nb
        delta = cm - mean
        f = div(nb, n, ACC)
        mean = mean + delta * f
        m2 = m2 + q + delta * delta * cnt * f
        cnt = n
    mu = x0 + mean
    rs = _rsqrt(m2, tl.cast(M, ACC), eps, ACC)
    tl.store(mean_ptr + ng, mu)
    tl.store(rstd_ptr + ng, rs)
    c0 = (ng % G) * D
    rd = tl.arange(0, BLOCK_D)
    rs_ = tl.arange(0, BLOCK_S)
    for d0 in range(0, D, BLOCK_D):  # (BLOCK_D channels, BLOCK_S positions) tiles
        dm = d0 + rd < D
        k, h = _scale_shift(w_ptr, b_ptr, c0 + d0 + rd, dm, rs, HAS_W, HAS_B, ACC, BLOCK_D)
        for s0 in range(0, S, BLOCK_S):
            msk = dm[:, None] & (s0 + rs_ < S)[None, :]
            o = base + (d0 + rd)[:, None] * S + (s0 + rs_)[None, :]
            z = (tl.load(x_ptr + o, mask=msk, other=0.0).to(ACC) - mu) * k[:, None] + h[:, None]
            if RELU:
                z = tl.where(z < 0.0, 0.0, z)  # not tl.maximum: NaN stays NaN, as in torch.relu
            tl.store(y_ptr + o, z.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _centered_grad(x_ptr, dy_ptr, o, msk, mu, k, h, RELU: tl.constexpr, ACC: tl.constexpr):
    """A (channels, positions) tile of x - mean and of dy, with dy zeroed where the recomputed ReLU was off."""
    xm = tl.load(x_ptr + o, mask=msk, other=0.0).to(ACC) - mu
    dz = tl.load(dy_ptr + o, mask=msk, other=0.0).to(ACC)
    if RELU:
        dz = tl.where(xm * k[:, None] + h[:, None] <= 0.0, 0.0, dz)
    return xm, dz


@triton.jit
def _nchw_bwd(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sdz_ptr, sdzxm_ptr, G, D, S,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    ng = tl.program_id(0).to(tl.int64)
    M = D * S
    base = ng * M
    c0 = (ng % G) * D
    nc0 = (ng // G) * G * D + c0  # (n, c0) in the (N, C) sums
    mu = tl.load(mean_ptr + ng)
    rs = tl.load(rstd_ptr + ng)
    rd = tl.arange(0, BLOCK_D)
    rs_ = tl.arange(0, BLOCK_S)
    gw = mu * 0  # ACC scalars
    gwxm = mu * 0
    for d0 in range(0, D, BLOCK_D):  # per-channel sums of dz and dz * (x - mean)
        dm = d0 + rd < D
        wc = tl.full([BLOCK_D], 1.0, ACC)
        if HAS_W:
            wc = tl.load(w_ptr + c0 + d0 + rd, mask=dm, other=0.0)
        h = tl.zeros([BLOCK_D], ACC)
        if HAS_B:
            h = tl.load(b_ptr + c0 + d0 + rd, mask=dm, other=0.0).to(ACC)
        k = wc * rs
        a0 = tl.zeros([BLOCK_D, BLOCK_S], ACC)
        a1 = tl.zeros([BLOCK_D, BLOCK_S], ACC)
        for s0 in range(0, S, BLOCK_S):
            msk = dm[:, None] & (s0 + rs_ < S)[None, :]
            o = base + (d0 + rd)[:, None] * S + (s0 + rs_)[None, :]
            xm, dz = _centered_grad(x_ptr, dy_ptr, o, msk, mu, k, h, RELU, ACC)
            dz = tl.where(msk, dz, 0.0)
            a0 += dz
            a1 += dz * xm
        t0 = tl.sum(a0, 1)
        t1 = tl.sum(a1, 1)
        tl.store(sdz_ptr + nc0 + d0 + rd, t0, mask=dm)
        tl.store(sdzxm_ptr + nc0 + d0 + rd, t1, mask=dm)
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
            o = base + (d0 + rd)[:, None] * S + (s0 + rs_)[None, :]
            xm, dz = _centered_grad(x_ptr, dy_ptr, o, msk, mu, k, h, RELU, ACC)
            dx = dz * k[:, None] + xm * q + r
            tl.store(dx_ptr + o, dx.to(dx_ptr.dtype.element_ty), mask=msk)


# ------------------------------------------------------------------------------------------------ NHWC
@triton.jit
def _nhwc_tile(pid, S, C, NB, NCB, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program pid -> (n, row block, element offsets (BLOCK_R, BLOCK_C), tile mask, channels, channel mask)."""
    pid = pid.to(tl.int64)
    cb = pid % NCB
    blk = (pid // NCB) % NB
    n = pid // (NCB * NB)
    rows = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    msk = (rows < S)[:, None] & cm[None, :]
    offs = n * S * C + rows[:, None] * C + ch[None, :]
    return n, blk, offs, msk, ch, cm


@triton.jit
def _nhwc_moments(x_ptr, pm_ptr, pq_ptr, S, C, NB, NCB, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    n, blk, offs, msk, ch, cm = _nhwc_tile(tl.program_id(0), S, C, NB, NCB, BLOCK_R, BLOCK_C)
    x0 = tl.load(x_ptr + n * S * C + ch, mask=cm, other=0.0).to(ACC)  # row 0 of the sample: the shift
    v = tl.where(msk, tl.load(x_ptr + offs, mask=msk, other=0.0).to(ACC) - x0[None, :], 0.0)
    cnt = tl.cast(tl.minimum(S - blk * BLOCK_R, BLOCK_R), ACC)
    mu = div(tl.sum(v, 0), cnt, ACC)
    d = tl.where(msk, v - mu[None, :], 0.0)
    o = (n * NB + blk) * C + ch
    tl.store(pm_ptr + o, mu, mask=cm)
    tl.store(pq_ptr + o, tl.sum(d * d, 0), mask=cm)


@triton.jit
def _nhwc_group_stats(x_ptr, pm_ptr, pq_ptr, mean_ptr, rstd_ptr, S, C, G, D, NB, eps, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    ng = tl.program_id(0).to(tl.int64)
    n = ng // G
    c0 = (ng % G) * D
    rd = tl.arange(0, BLOCK_D)
    dm = rd < D
    cnt = tl.zeros([BLOCK_D], ACC)
    mean = tl.zeros([BLOCK_D], ACC)
    m2 = tl.zeros([BLOCK_D], ACC)
    for blk in range(0, NB):  # per channel, merge the row blocks in order
        o = (n * NB + blk) * C + c0 + rd
        nb = tl.cast(tl.minimum(S - blk * BLOCK_R, BLOCK_R), ACC)
        bm = tl.load(pm_ptr + o, mask=dm, other=0.0)
        bq = tl.load(pq_ptr + o, mask=dm, other=0.0)
        tot = cnt + nb
        delta = bm - mean
        f = div(nb, tot, ACC)
        mean = mean + delta * f
        m2 = m2 + bq + delta * delta * cnt * f
        cnt = tot
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
def _nhwc_normalize(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, S, C, G, D, NB, NCB, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    n, blk, offs, msk, ch, cm = _nhwc_tile(tl.program_id(0), S, C, NB, NCB, BLOCK_R, BLOCK_C)
    mu, k, h = _nhwc_coefs(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, ch, cm, G, D, HAS_W, HAS_B, ACC)
    z = (tl.load(x_ptr + offs, mask=msk, other=0.0).to(ACC) - mu[None, :]) * k[None, :] + h[None, :]
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _nhwc_bwd_sums(dy_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, p0_ptr, p1_ptr, S, C, G, D, NB, NCB,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    n, blk, offs, msk, ch, cm = _nhwc_tile(tl.program_id(0), S, C, NB, NCB, BLOCK_R, BLOCK_C)
    mu, k, h = _nhwc_coefs(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, ch, cm, G, D, HAS_W, HAS_B, ACC)
    xm = tl.load(x_ptr + offs, mask=msk, other=0.0).to(ACC) - mu[None, :]
    dz = tl.load(dy_ptr + offs, mask=msk, other=0.0).to(ACC)
    if RELU:
        dz = tl.where(xm * k[None, :] + h[None, :] <= 0.0, 0.0, dz)
    dz = tl.where(msk, dz, 0.0)
    o = (n * NB + blk) * C + ch
    tl.store(p0_ptr + o, tl.sum(dz, 0), mask=cm)
    tl.store(p1_ptr + o, tl.sum(dz * xm, 0), mask=cm)


@triton.jit
def _nhwc_bwd_group(p0_ptr, p1_ptr, w_ptr, rstd_ptr, sdz_ptr, sdzxm_ptr, qr_ptr, S, C, G, D, NB,
                    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    ng = tl.program_id(0).to(tl.int64)
    n = ng // G
    c0 = (ng % G) * D
    rd = tl.arange(0, BLOCK_D)
    dm = rd < D
    t0 = tl.zeros([BLOCK_D], ACC)
    t1 = tl.zeros([BLOCK_D], ACC)
    for blk in range(0, NB):  # row blocks in order
        o = (n * NB + blk) * C + c0 + rd
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
def _nhwc_bwd_dx(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, qr_ptr, S, C, G, D, NB, NCB,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    n, blk, offs, msk, ch, cm = _nhwc_tile(tl.program_id(0), S, C, NB, NCB, BLOCK_R, BLOCK_C)
    mu, k, h = _nhwc_coefs(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, ch, cm, G, D, HAS_W, HAS_B, ACC)
    ng = n * G + ch // D
    q = tl.load(qr_ptr + 2 * ng, mask=cm, other=0.0)
    r = tl.load(qr_ptr + 2 * ng + 1, mask=cm, other=0.0)
    xm = tl.load(x_ptr + offs, mask=msk, other=0.0).to(ACC) - mu[None, :]
    dz = tl.load(dy_ptr + offs, mask=msk, other=0.0).to(ACC)
    if RELU:
        dz = tl.where(xm * k[None, :] + h[None, :] <= 0.0, 0.0, dz)
    dx = dz * k[None, :] + xm * q[None, :] + r[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _param_grads(rstd_ptr, sdz_ptr, sdzxm_ptr, dw_ptr, db_ptr, N, C, G, D, ACC: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    ch = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    tw = tl.zeros([BLOCK_C], ACC)
    tb = tl.zeros([BLOCK_C], ACC)
    for n in range(0, N):  # n in increasing order: deterministic
        rs = tl.load(rstd_ptr + n * G + ch // D, mask=cm, other=0.0)
        tw += rs * tl.load(sdzxm_ptr + n * C + ch, mask=cm, other=0.0)
        tb += tl.load(sdz_ptr + n * C + ch, mask=cm, other=0.0)
    tl.store(dw_ptr + ch, tw, mask=cm)
    tl.store(db_ptr + ch, tb, mask=cm)


# ------------------------------------------------------------------------------------------------ launchers
def _p2(v):
    return triton.next_power_of_2(max(int(v), 1))


def _geometry(x, num_groups):
    """(N, C, S, D, channels_last) of a dense x: contiguous is NCHW, anything else is channels_last (N, S, C)."""
    N, C = x.shape[:2]
    S = x.numel() // (N * C) if N * C else 0
    return N, C, S, C // num_groups, not x.is_contiguous()


def _nchw_blocks(D, S):
    bs = min(_p2(S), 1024)
    return min(_p2(D), max(1, 4096 // bs)), bs


def _nhwc_blocks(C):
    bc = min(_p2(C), 128)
    return max(1, 4096 // bc), bc  # (BLOCK_R, BLOCK_C): 4096 elements per tile


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
        bd, bs = _nchw_blocks(D, S)
        _nchw_fwd[(N * G,)](x, y, w, b, mean, rstd, G, D, S, eps, has_w, has_b, relu, ACC,
                            BLOCK=min(_p2(D * S), 4096), BLOCK_D=bd, BLOCK_S=bs)
        return y, mean, rstd
    br, bc = _nhwc_blocks(C)
    NB, NCB = triton.cdiv(S, br), triton.cdiv(C, bc)
    pm = torch.empty((N, NB, C), dtype=acc_t, device=x.device)
    pq = torch.empty_like(pm)
    tiles = (N * NB * NCB,)
    _nhwc_moments[tiles](x, pm, pq, S, C, NB, NCB, ACC, BLOCK_R=br, BLOCK_C=bc)
    _nhwc_group_stats[(N * G,)](x, pm, pq, mean, rstd, S, C, G, D, NB, eps, ACC, BLOCK_R=br, BLOCK_D=_p2(D))
    _nhwc_normalize[tiles](x, y, w, b, mean, rstd, S, C, G, D, NB, NCB, has_w, has_b, relu, ACC,
                           BLOCK_R=br, BLOCK_C=bc)
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
        bd, bs = _nchw_blocks(D, S)
        _nchw_bwd[(N * G,)](dy, x, dx, w, b, mean, rstd, sdz, sdzxm, G, D, S, has_w, has_b, relu, ACC,
                            BLOCK_D=bd, BLOCK_S=bs)
    else:
        br, bc = _nhwc_blocks(C)
        NB, NCB = triton.cdiv(S, br), triton.cdiv(C, bc)
        p0 = torch.empty((N, NB, C), dtype=acc_t, device=x.device)
        p1 = torch.empty_like(p0)
        qr = torch.empty((N, G, 2), dtype=acc_t, device=x.device)
        tiles = (N * NB * NCB,)
        _nhwc_bwd_sums[tiles](dy, x, w, b, mean, rstd, p0, p1, S, C, G, D, NB, NCB, has_w, has_b, relu, ACC,
                              BLOCK_R=br, BLOCK_C=bc)
        _nhwc_bwd_group[(N * G,)](p0, p1, w, rstd, sdz, sdzxm, qr, S, C, G, D, NB, has_w, ACC, BLOCK_D=_p2(D))
        _nhwc_bwd_dx[tiles](dy, x, dx, w, b, mean, rstd, qr, S, C, G, D, NB, NCB, has_w, has_b, relu, ACC,
                            BLOCK_R=br, BLOCK_C=bc)
    bc = min(_p2(C), 256)
    _param_grads[(triton.cdiv(C, bc),)](rstd, sdz, sdzxm, dw, db, N, C, G, D, ACC, BLOCK_C=bc)
    return dx, dw, db

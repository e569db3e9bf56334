"""Triton weight standardization (bitfast.ops.weight_standardize and weight_standardize_many).

Same math as csrc/weight_standardize_cpu.cpp: a weight is (O, K) rows, K contiguous per row (contiguous and
channels_last weights alike); per row (corrected two-pass) m0 = sum(w)/K, d = w - m0, c = sum(d)/K,
var = sum(d^2)/K - c^2, mean = m0 + c, rstd = 1/sqrt(var + eps), y = (d - c) * rstd.
Backward: dw = rstd * (dy - mean(dy) - yhat * mean(dy * yhat)), yhat = (w - mean) * rstd.
One program per row, looping over K in BLOCK chunks (a row of a real conv stays in L1/L2 between the passes).
Sums are per-lane fp32 (fp64 for fp64 weights) then a tree reduction.

The many-tensor launch standardizes a list of weights in one launch: a small int64 table gives, per weight, its
element offsets from the first weight / output / grad (all tensors live in one address space), its K and its first
row. A program finds its weight by counting the row0 entries <= its row.
"""
import torch
import triton
import triton.language as tl

from bitfast.kernels._common import div, eps_arg, guarded

# Many-tensor table columns (5): w offset, out offset, dy offset (elements, from the base tensors), K, row0.


@triton.jit
def _fwd_row(w_ptr, y_ptr, mean_ptr, rstd_ptr, K, eps, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    for k0 in range(0, K, BLOCK):
        acc += tl.load(w_ptr + k0 + offs, mask=k0 + offs < K, other=0.0).to(ACC)
    m0 = div(tl.sum(acc, 0), tl.cast(K, ACC), ACC)
    s1 = tl.zeros([BLOCK], ACC)  # sum(d), sum(d^2) with d = w - m0 (corrected two-pass)
    s2 = tl.zeros([BLOCK], ACC)
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        d = tl.where(m, tl.load(w_ptr + k0 + offs, mask=m, other=0.0).to(ACC) - m0, 0.0)
        s1 += d
        s2 += d * d
    c = div(tl.sum(s1, 0), tl.cast(K, ACC), ACC)
    var = tl.maximum(div(tl.sum(s2, 0), tl.cast(K, ACC), ACC) - c * c, 0.0)
    if ACC == tl.float64:  # eps arrives as a 1-element fp64 tensor: a float argument would be rounded to fp32
        rstd = 1.0 / tl.sqrt(var + tl.load(eps))
    else:
        rstd = div(1.0, tl.sqrt_rn(var + eps), ACC)  # tl.sqrt is the approximate one for fp32
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        x = tl.load(w_ptr + k0 + offs, mask=m, other=0.0).to(ACC)
        tl.store(y_ptr + k0 + offs, (((x - m0) - c) * rstd).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr, m0 + c)
    tl.store(rstd_ptr, rstd)


@triton.jit
def _bwd_row(dy_ptr, w_ptr, dw_ptr, mean, rstd, K, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a_dy = tl.zeros([BLOCK], ACC)
    a_dyx = tl.zeros([BLOCK], ACC)
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        g = tl.load(dy_ptr + k0 + offs, mask=m, other=0.0).to(ACC)
        xhat = (tl.load(w_ptr + k0 + offs, mask=m, other=0.0).to(ACC) - mean) * rstd
        a_dy += g
        a_dyx += g * xhat
    m_dy = div(tl.sum(a_dy, 0), tl.cast(K, ACC), ACC)
    m_dyx = div(tl.sum(a_dyx, 0), tl.cast(K, ACC), ACC)
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        g = tl.load(dy_ptr + k0 + offs, mask=m, other=0.0).to(ACC)
        xhat = (tl.load(w_ptr + k0 + offs, mask=m, other=0.0).to(ACC) - mean) * rstd
        dw = rstd * (g - m_dy - xhat * m_dyx)
        tl.store(dw_ptr + k0 + offs, dw.to(dw_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fwd_kernel(w_ptr, y_ptr, mean_ptr, rstd_ptr, K, eps, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _fwd_row(w_ptr + row * K, y_ptr + row * K, mean_ptr + row, rstd_ptr + row, K, eps, BLOCK, ACC)


@triton.jit
def _bwd_kernel(dy_ptr, w_ptr, dw_ptr, mean_ptr, rstd_ptr, K, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _bwd_row(dy_ptr + row * K, w_ptr + row * K, dw_ptr + row * K, tl.load(mean_ptr + row), tl.load(rstd_ptr + row),
             K, BLOCK, ACC)


@triton.jit
def _find_item(table_ptr, n, row, NP2: tl.constexpr):
    """(w offset, out offset, dy offset, K, first row) of the weight owning `row` (table sorted by row0). A row that
    no weight owns (the rows of an empty (O, 0) weight, before or between entries) gets K = 0: it touches no
    element and writes NaN statistics for its own row only."""
    i = tl.arange(0, NP2)
    row0s = tl.load(table_ptr + i * 6 + 4, mask=i < n, other=2**62)
    t = tl.maximum(tl.sum((row0s <= row).to(tl.int32), 0) - 1, 0).to(tl.int64)
    base = table_ptr + t * 6
    row0, O = tl.load(base + 4), tl.load(base + 5)
    K = tl.where((row >= row0) & (row - row0 < O), tl.load(base + 3), 0)
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), K, row0


@triton.jit
def _many_fwd_kernel(w_base, y_base, table_ptr, n, mean_ptr, rstd_ptr, eps, NP2: tl.constexpr,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    w_off, y_off, _dy_off, K, row0 = _find_item(table_ptr, n, row, NP2)
    off = (row - row0) * K
    _fwd_row(w_base + w_off + off, y_base + y_off + off, mean_ptr + row, rstd_ptr + row, K, eps, BLOCK, ACC)


@triton.jit
def _many_bwd_kernel(dy_base, w_base, dw_base, table_ptr, n, mean_ptr, rstd_ptr, NP2: tl.constexpr,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    w_off, dw_off, dy_off, K, row0 = _find_item(table_ptr, n, row, NP2)
    off = (row - row0) * K
    _bwd_row(dy_base + dy_off + off, w_base + w_off + off, dw_base + dw_off + off, tl.load(mean_ptr + row),
             tl.load(rstd_ptr + row), K, BLOCK, ACC)


# ------------------------------------------------------------------------------------------------ launchers
def _acc(dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


# One BLOCK/num_warps for every row: the single- and many-tensor kernels then sum in the same order, so their
# results (and gradients) are bitwise identical. Masked lanes on short rows cost little: WS is tiny next to a conv.
_BLOCK, _WARPS = 1024, 4


def _rows(w):
    return w.shape[0], (w.numel() // w.shape[0] if w.shape[0] else 0)


@guarded
def weight_standardize_fwd(w, eps, out_dtype):
    """w (O, ...) contiguous or channels_last -> [y like w in out_dtype (default w's), mean (O,), rstd (O,)]."""
    O, K = _rows(w)
    acc_t, acc_tl = _acc(w.dtype)
    y = torch.empty_like(w, dtype=out_dtype or w.dtype)  # keeps w's memory format, so rows stay (O, K)
    mean = torch.empty(O, dtype=acc_t, device=w.device)
    rstd = torch.empty_like(mean)
    if w.numel() == 0:
        return [y, mean, rstd]
    _fwd_kernel[(O,)](w, y, mean, rstd, K, eps_arg(eps, acc_t, w.device), BLOCK=_BLOCK, ACC=acc_tl, num_warps=_WARPS)
    return [y, mean, rstd]


@guarded
def weight_standardize_bwd(dy, w, mean, rstd):
    """dy (w's shape and layout, out dtype), w, mean, rstd -> dw (like w)."""
    O, K = _rows(w)
    dw = torch.empty_like(w)
    if w.numel() == 0:
        return dw
    _bwd_kernel[(O,)](dy, w, dw, mean, rstd, K, BLOCK=_BLOCK, ACC=_acc(w.dtype)[1], num_warps=_WARPS)
    return dw


def _table(ws, outs, dys):
    """Index b of the base tensors (the first non-empty weight), the int64 (n, 6) table on the weights' device, the
    row count and n (the number of non-empty weights). Empty weights get no entry, only rows."""
    keep = [i for i, w in enumerate(ws) if w.numel() > 0]
    b = keep[0] if keep else 0
    rows, entries = 0, []
    for i, w in enumerate(ws):
        O, K = _rows(w)
        if w.numel() > 0:
            d_off = _offset(dys[i], dys[b]) if dys is not None else 0
            entries += [_offset(w, ws[b]), _offset(outs[i], outs[b]), d_off, K, rows, O]
        rows += O
    return b, _device_table(entries, ws[0].device), rows, len(keep)


# Device copies of the tables, one per distinct table (a model's weights give the same table every step). An entry
# keeps its pinned staging tensor and its device tensor alive and never changes them, so a copy captured in a CUDA
# graph (torch.compile mode="reduce-overhead") replays from bytes that are still that table. Entries made or used
# while capturing are never evicted; the others go when the cache holds _MAX_TABLES. Same design as the C++ binding.
_TABLES, _CAPTURED, _MAX_TABLES = {}, set(), 64


def _device_table(entries, device):
    key = (str(device), tuple(entries))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if key not in _TABLES:
        if len(_TABLES) >= _MAX_TABLES:
            for k in [k for k in _TABLES if k not in _CAPTURED]:
                del _TABLES[k]
        host = torch.tensor(entries, dtype=torch.int64, pin_memory=device.type == "cuda")
        _TABLES[key] = (host, host.to(device, non_blocking=True))
    if capturing:
        _CAPTURED.add(key)
    return _TABLES[key][1]


def _offset(t, base):
    """Element offset of t's data from base's data (same dtype, one address space)."""
    diff = t.data_ptr() - base.data_ptr()
    assert diff % t.element_size() == 0, "tensors of one dtype are always element-aligned"
    return diff // t.element_size()


@guarded
def weight_standardize_many_fwd(ws, eps, out_dtype):
    """List of weights (one dtype and device) -> (ys, mean, rstd); mean/rstd concatenated over all rows."""
    acc_t, acc_tl = _acc(ws[0].dtype)
    ys = [torch.empty_like(w, dtype=out_dtype or w.dtype) for w in ws]
    b, table, rows, n = _table(ws, ys, None)
    mean = torch.empty(rows, dtype=acc_t, device=ws[0].device)
    rstd = torch.empty_like(mean)
    if n == 0:
        return ys, mean, rstd
    _many_fwd_kernel[(rows,)](ws[b], ys[b], table, n, mean, rstd, eps_arg(eps, acc_t, ws[0].device), NP2=triton.next_power_of_2(n),
                              BLOCK=_BLOCK, ACC=acc_tl, num_warps=_WARPS)
    return ys, mean, rstd


@guarded
def weight_standardize_many_bwd(dys, ws, mean, rstd):
    """Grads (each like its weight, one dtype), weights, concatenated mean/rstd -> dws."""
    dws = [torch.empty_like(w) for w in ws]
    b, table, rows, n = _table(ws, dws, dys)
    if n == 0:
        return dws
    _many_bwd_kernel[(rows,)](dys[b], ws[b], dws[b], table, n, mean, rstd, NP2=triton.next_power_of_2(n),
                              BLOCK=_BLOCK, ACC=_acc(ws[0].dtype)[1], num_warps=_WARPS)
    return dws

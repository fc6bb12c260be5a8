"""Fused attention with contextual iRPE terms, in Triton (flash-attention style).

Per batch ``b`` and head ``h`` (``q`` already multiplied by ``s = D**-0.5``)::

    logits[i, j] = q_i . k_j + q_i . Wk[:, ids[i, j]] + (s k_j) . Wq[:, ids[j, i]]
    logits[i, j] = -inf where key_padding_mask[b, j]
    P = softmax_j(logits);  P' = P * M / (1 - p),  M ~ Bernoulli(1 - p)
    out_i = sum_j P'_ij v_j + sum_j P'_ij Wv[ids[i, j], :]

Each table term is present only when its table is given; a table with a head dimension of 1 is
shared by all heads. A fully masked row gives ``out = 0`` and ``lse = -inf``.

The ``L x L`` matrices are never materialised. The per-bucket products ``QWk = q @ Wk`` and
``KWq = (s k) @ Wq`` (``(B, H, L, K)``, small) are computed with torch and gathered inside the
kernels; the value term needs the per-row bucket sums ``PB[i, k] = sum_j P'_ij [ids[i, j] = k]``,
which a second pass over the keys (after the softmax statistics are final) scatters with atomic
adds into rows that only the program at hand owns, so programs never race; ``out += PB @ Wv``
then runs in torch. The backward works the same way: one kernel over query blocks (``dq``, the
bucket sums of ``dS`` for ``dWk`` and of ``P'`` for ``dWv``), one over key blocks (``dk``, ``dv``,
the bucket sums of ``dS`` for ``dWq``); the table gradients are torch matmuls and sums over the
batch (and head), in a fixed order.

The scatters are atomic adds whose colliding updates (same row, same bucket, one tile) land in
no fixed order on a GPU, so results there are reproducible to rounding, not bitwise.

Dropout draws ``M[b, h, i, j]`` from ``tl.rand(seed, offset + ((b H + h) L + i) L + j)``: a
function of ``(seed, offset, b, h, i, j)`` only, so the backward (and :func:`dropout_keep_mask`)
regenerate the same mask whatever the block sizes.

Only torch and triton are needed (not the compiled ``irpe_ops._C``). On CPU tensors the kernels
run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dropout_keep_mask", "rpe_attention_backward", "rpe_attention_forward"]


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _keep(seed, offset, bh, L, i, j, dropout_p):
    """Dropout keep mask for query ids ``i`` and key ids ``j`` (broadcastable int tensors)."""
    counter = offset + (bh.to(tl.int64) * L + i.to(tl.int64)) * L + j.to(tl.int64)
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _logits(
    q,
    k,
    offs_m,
    offs_n,
    bh64,
    b,
    L,
    NB,
    IDS,
    QWK,
    KWQ,
    KPM,
    HAS_WK: tl.constexpr,
    HAS_WQ: tl.constexpr,
    HAS_KPM: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Logits tile ``(BLOCK_M, BLOCK_N)`` for queries ``offs_m`` and keys ``offs_n``.

    ``-inf`` where the key is padding or past ``L``. Rows past ``L`` hold junk (never stored).
    """
    m_ok = offs_m < L
    n_ok = offs_n < L
    mn = m_ok[:, None] & n_ok[None, :]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if HAS_WK:
        ids = tl.load(IDS + offs_m[:, None] * L + offs_n[None, :], mask=mn, other=0)
        s += tl.load(QWK + bh64 * L * NB + offs_m[:, None] * NB + ids, mask=mn, other=0.0)
    if HAS_WQ:
        ids_t = tl.load(IDS + offs_n[None, :] * L + offs_m[:, None], mask=mn, other=0)
        s += tl.load(KWQ + bh64 * L * NB + offs_n[None, :] * NB + ids_t, mask=mn, other=0.0)
    key_ok = n_ok
    if HAS_KPM:
        pad = tl.load(KPM + b * L + offs_n, mask=n_ok, other=1)
        key_ok = key_ok & (pad == 0)
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def _logits_t(
    k,
    q,
    offs_n,
    offs_m,
    bh64,
    b,
    L,
    NB,
    IDS,
    QWK,
    KWQ,
    KPM,
    HAS_WK: tl.constexpr,
    HAS_WQ: tl.constexpr,
    HAS_KPM: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Transposed logits tile ``(BLOCK_N, BLOCK_M)``: ``[j, i] = logits[i, j]``.

    ``-inf`` where the key is padding, or the key or the query is past ``L``.
    """
    m_ok = offs_m < L
    n_ok = offs_n < L
    nm = n_ok[:, None] & m_ok[None, :]
    s = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
    if HAS_WK:
        ids = tl.load(IDS + offs_m[None, :] * L + offs_n[:, None], mask=nm, other=0)
        s += tl.load(QWK + bh64 * L * NB + offs_m[None, :] * NB + ids, mask=nm, other=0.0)
    if HAS_WQ:
        ids_t = tl.load(IDS + offs_n[:, None] * L + offs_m[None, :], mask=nm, other=0)
        s += tl.load(KWQ + bh64 * L * NB + offs_n[:, None] * NB + ids_t, mask=nm, other=0.0)
    ok = nm
    if HAS_KPM:
        pad = tl.load(KPM + b * L + offs_n, mask=n_ok, other=1)
        ok = ok & (pad == 0)[:, None]
    return tl.where(ok, s, float("-inf"))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    IDS,
    QWK,
    KWQ,
    KPM,
    OUT,
    LSE,
    PB,
    H,
    L,
    D,
    NB,
    dropout_p,
    seed,
    offset,
    HAS_WK: tl.constexpr,
    HAS_WQ: tl.constexpr,
    HAS_WV: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    base = bh64 * L * D
    q = tl.load(
        Q + base + offs_m[:, None] * D + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    drop_scale = 1.0 / (1.0 - dropout_p)

    # Pass 1: online softmax, P' v.
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < L)[:, None] & d_ok[None, :]
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _logits(
            q,
            k,
            offs_m,
            offs_n,
            bh64,
            b,
            L,
            NB,
            IDS,
            QWK,
            KWQ,
            KPM,
            HAS_WK,
            HAS_WQ,
            HAS_KPM,
            DOT_PREC,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _keep(seed, offset, bh, L, offs_m[:, None], offs_n[None, :], dropout_p)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    tl.store(
        OUT + base + offs_m[:, None] * D + offs_d[None, :], out, mask=m_ok[:, None] & d_ok[None, :]
    )
    tl.store(LSE + bh64 * L + offs_m, lse, mask=m_ok)

    # Pass 2 (value table only): bucket sums of the final P' over this program's rows.
    if HAS_WV:
        lse_use = tl.where(empty, 0.0, lse)
        for start_n in range(0, L, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n < L)[:, None] & d_ok[None, :]
            k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _logits(
                q,
                k,
                offs_m,
                offs_n,
                bh64,
                b,
                L,
                NB,
                IDS,
                QWK,
                KWQ,
                KPM,
                HAS_WK,
                HAS_WQ,
                HAS_KPM,
                DOT_PREC,
            )
            p = tl.exp(s - lse_use[:, None])
            if HAS_DROPOUT:
                keep = _keep(seed, offset, bh, L, offs_m[:, None], offs_n[None, :], dropout_p)
                p = tl.where(keep, p * drop_scale, 0.0)
            mn = m_ok[:, None] & (offs_n < L)[None, :]
            ids = tl.load(IDS + offs_m[:, None] * L + offs_n[None, :], mask=mn, other=0)
            tl.atomic_add(
                PB + bh64 * L * NB + offs_m[:, None] * NB + ids, p, mask=mn, sem="relaxed"
            )


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DR,
    IDS,
    QWK,
    KWQ,
    G,
    KPM,
    DQ,
    DQWK,
    PB,
    H,
    L,
    D,
    NB,
    dropout_p,
    seed,
    offset,
    HAS_WK: tl.constexpr,
    HAS_WQ: tl.constexpr,
    HAS_WV: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Per query block: ``dq``, bucket sums of ``dS`` (for Wk) and of ``P'`` (for Wv)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < D
    base = bh64 * L * D
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + bh64 * L + offs_m, mask=m_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    dr = tl.load(DR + bh64 * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    drop_scale = 1.0 / (1.0 - dropout_p)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mn = m_ok[:, None] & (offs_n < L)[None, :]
        kv_mask = (offs_n < L)[:, None] & d_ok[None, :]
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _logits(
            q,
            k,
            offs_m,
            offs_n,
            bh64,
            b,
            L,
            NB,
            IDS,
            QWK,
            KWQ,
            KPM,
            HAS_WK,
            HAS_WQ,
            HAS_KPM,
            DOT_PREC,
        )
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ids = tl.load(IDS + offs_m[:, None] * L + offs_n[None, :], mask=mn, other=0)
        if HAS_WV:
            dp += tl.load(G + bh64 * L * NB + offs_m[:, None] * NB + ids, mask=mn, other=0.0)
        if HAS_DROPOUT:
            keep = _keep(seed, offset, bh, L, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * drop_scale, 0.0)
            pd = tl.where(keep, p * drop_scale, 0.0)
        else:
            pd = p
        ds = p * (dp - dr[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        if HAS_WK:
            tl.atomic_add(
                DQWK + bh64 * L * NB + offs_m[:, None] * NB + ids, ds, mask=mn, sem="relaxed"
            )
        if HAS_WV:
            tl.atomic_add(
                PB + bh64 * L * NB + offs_m[:, None] * NB + ids, pd, mask=mn, sem="relaxed"
            )
    tl.store(DQ + base + offs_m[:, None] * D + offs_d[None, :], dq, mask=qd_mask)


@triton.jit
def _bwd_dkv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DR,
    IDS,
    QWK,
    KWQ,
    G,
    KPM,
    DK,
    DV,
    DKWQ,
    H,
    L,
    D,
    NB,
    dropout_p,
    seed,
    offset,
    HAS_WK: tl.constexpr,
    HAS_WQ: tl.constexpr,
    HAS_WV: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Per key block (tiles transposed, ``[j, i]``): ``dk``, ``dv``, bucket sums of ``dS`` (Wq)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < D
    base = bh64 * L * D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    drop_scale = 1.0 / (1.0 - dropout_p)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        nm = n_ok[:, None] & m_ok[None, :]
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(LSE + bh64 * L + offs_m, mask=m_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        dr = tl.load(DR + bh64 * L + offs_m, mask=m_ok, other=0.0)
        st = _logits_t(
            k,
            q,
            offs_n,
            offs_m,
            bh64,
            b,
            L,
            NB,
            IDS,
            QWK,
            KWQ,
            KPM,
            HAS_WK,
            HAS_WQ,
            HAS_KPM,
            DOT_PREC,
        )
        pt = tl.exp(st - lse[None, :])
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        if HAS_WV:
            ids = tl.load(IDS + offs_m[None, :] * L + offs_n[:, None], mask=nm, other=0)
            dpt += tl.load(G + bh64 * L * NB + offs_m[None, :] * NB + ids, mask=nm, other=0.0)
        if HAS_DROPOUT:
            keep = _keep(seed, offset, bh, L, offs_m[None, :], offs_n[:, None], dropout_p)
            dpt = tl.where(keep, dpt * drop_scale, 0.0)
            pdt = tl.where(keep, pt * drop_scale, 0.0)
        else:
            pdt = pt
        dv += tl.dot(pdt.to(do.dtype), do, input_precision=DOT_PREC)
        dst = pt * (dpt - dr[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
        if HAS_WQ:
            ids_t = tl.load(IDS + offs_n[:, None] * L + offs_m[None, :], mask=nm, other=0)
            tl.atomic_add(
                DKWQ + bh64 * L * NB + offs_n[:, None] * NB + ids_t, dst, mask=nm, sem="relaxed"
            )
    tl.store(DK + base + offs_n[:, None] * D + offs_d[None, :], dk, mask=kv_mask)
    tl.store(DV + base + offs_n[:, None] * D + offs_d[None, :], dv, mask=kv_mask)


@triton.jit
def _keep_mask_kernel(OUT, H, L, dropout_p, seed, offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L * L
    keep = _keep(seed, offset, bh, L, offs // L, offs % L, dropout_p)
    tl.store(OUT + bh.to(tl.int64) * L * L + offs, keep.to(tl.int8), mask=ok)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _num_buckets(
    wq: torch.Tensor | None, wk: torch.Tensor | None, wv: torch.Tensor | None, H: int, D: int
) -> int:
    counts = set()
    for name, w, shape_of in (
        ("wk", wk, lambda w: (w.shape[1], w.shape[2])),
        ("wq", wq, lambda w: (w.shape[1], w.shape[2])),
        ("wv", wv, lambda w: (w.shape[2], w.shape[1])),
    ):
        if w is None:
            continue
        if w.dim() != 3 or w.shape[0] not in (1, H):
            raise ValueError(
                f"{name}: expected 3 dims with a head dimension of 1 or {H}, got {tuple(w.shape)}"
            )
        d, nb = shape_of(w)
        if d != D:
            raise ValueError(f"{name}: head size {d} does not match D = {D} ({tuple(w.shape)})")
        counts.add(nb)
    if len(counts) > 1:
        raise ValueError(f"tables disagree on the number of buckets: {sorted(counts)}")
    return counts.pop() if counts else 0


def _check(q, k, v, ids, key_padding_mask, dropout_p):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share one (B, H, L, D) shape, got {q.shape}, {k.shape}, {v.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raise ValueError(
            "q, k, v must share a float16/bfloat16/float32 dtype, "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    B, _, L, _ = q.shape
    if ids.shape != (L, L):
        raise ValueError(f"ids: expected ({L}, {L}), got {tuple(ids.shape)}")
    if key_padding_mask is not None and key_padding_mask.shape != (B, L):
        raise ValueError(
            f"key_padding_mask: expected ({B}, {L}), got {tuple(key_padding_mask.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _default_blocks(head_size: int, backward: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) that compile without register spills on sm_90 with 4 warps.

    From ``ptxas -v`` on the kernels with every table, padding and dropout (not from timings):
    the gathered logits terms and the Philox rounds make the tiles register-heavy.
    """
    if backward:
        return (32, 32) if head_size <= 64 else (32, 16)
    if head_size <= 32:
        return 64, 32
    return (32, 32) if head_size <= 64 else (32, 16)


def _launch_config(
    q: torch.Tensor, block_m: int | None, block_n: int | None, backward: bool
) -> tuple[int, int, int, str]:
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    default_m, default_n = _default_blocks(block_d, backward)
    block_m = block_m or default_m
    block_n = block_n or default_n
    smallest = 16 if q.is_cuda else 1  # tl.dot needs 16 x 16 tiles on a GPU
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < smallest or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= {smallest}, got {size}")
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return block_m, block_n, block_d, dot_prec


def _prepare(q, k, ids, wq, wk, key_padding_mask, num_buckets):
    """Contiguous ids/mask, the gathered per-bucket products and their flags."""
    D = q.shape[-1]
    scale = D**-0.5
    if num_buckets and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_buckets:
            raise ValueError(f"ids must lie in [0, {num_buckets}), got values in [{lo}, {hi}]")
    ids32 = ids.to(device=q.device, dtype=torch.int32).contiguous()
    qwk = torch.matmul(q.float(), wk.float()).contiguous() if wk is not None else None
    kwq = torch.matmul(k.float() * scale, wq.float()).contiguous() if wq is not None else None
    kpm = (
        key_padding_mask.to(device=q.device, dtype=torch.uint8).contiguous()
        if key_padding_mask is not None
        else None
    )
    return scale, ids32, qwk, kwq, kpm


def rpe_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ids: torch.Tensor,
    wq: torch.Tensor | None,
    wk: torch.Tensor | None,
    wv: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    seed: int,
    offset: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with contextual iRPE terms; returns ``(out (B, H, L, D), lse (B, H, L) float32)``.

    See the module docstring for the semantics. ``block_m``/``block_n`` (powers of two, >= 16 on
    a GPU), ``num_warps`` and ``num_stages`` are tuning knobs that do not change the result beyond
    rounding (the dropout mask does not depend on them).
    """
    _check(q, k, v, ids, key_padding_mask, dropout_p)
    B, H, L, D = q.shape
    nb = _num_buckets(wq, wk, wv, H, D)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _, ids32, qwk, kwq, kpm = _prepare(q, k, ids, wq, wk, key_padding_mask, nb)
    out = torch.empty((B, H, L, D), device=q.device, dtype=torch.float32)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    pb = (
        torch.zeros((B, H, L, nb), device=q.device, dtype=torch.float32) if wv is not None else None
    )
    bm, bn, bd, prec = _launch_config(q, block_m, block_n, False)
    dummy = out
    grid = (triton.cdiv(L, bm), B * H)
    _fwd_kernel[grid](
        q, k, v, ids32,
        qwk if qwk is not None else dummy,
        kwq if kwq is not None else dummy,
        kpm if kpm is not None else dummy,
        out, lse,
        pb if pb is not None else dummy,
        H, L, D, nb,
        float(dropout_p), int(seed), int(offset),
        HAS_WK=wk is not None, HAS_WQ=wq is not None, HAS_WV=wv is not None,
        HAS_KPM=kpm is not None, HAS_DROPOUT=dropout_p > 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC=prec,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if wv is not None:
        out = out + torch.matmul(pb, wv.float())
    return out.to(q.dtype), lse


def _table_grad(grad: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, H, a, c)`` per-(batch, head) gradients -> ``(heads, a, c)``, in a fixed order."""
    grad = grad.sum(0)
    return grad.sum(0, keepdim=True) if heads == 1 else grad


def rpe_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ids: torch.Tensor,
    wq: torch.Tensor | None,
    wk: torch.Tensor | None,
    wv: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    seed: int,
    offset: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor | None,
    torch.Tensor | None,
    torch.Tensor | None,
]:
    """Gradients ``(dq, dk, dv, dwq, dwk, dwv)`` of :func:`rpe_attention_forward`.

    ``out`` and ``lse`` are the forward's results; ``dq`` is w.r.t. the (already scaled) ``q``;
    ``None`` for the absent tables. The dropout mask is regenerated from ``(seed, offset)``.
    """
    _check(q, k, v, ids, key_padding_mask, dropout_p)
    B, H, L, D = q.shape
    nb = _num_buckets(wq, wk, wv, H, D)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    scale, ids32, qwk, kwq, kpm = _prepare(q, k, ids, wq, wk, key_padding_mask, nb)
    do = grad_out.to(q.dtype).contiguous()
    lse = lse.float().contiguous()
    dr = (grad_out.float() * out.float()).sum(-1).contiguous()
    g = (
        torch.matmul(grad_out.float(), wv.float().transpose(-1, -2)).contiguous()
        if wv is not None
        else None
    )
    dq = torch.empty((B, H, L, D), device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    zeros = lambda: torch.zeros((B, H, L, nb), device=q.device, dtype=torch.float32)  # noqa: E731
    dqwk = zeros() if wk is not None else None
    dkwq = zeros() if wq is not None else None
    pb = zeros() if wv is not None else None
    bm, bn, bd, prec = _launch_config(q, block_m, block_n, True)
    dummy = dq
    flags = dict(
        HAS_WK=wk is not None, HAS_WQ=wq is not None, HAS_WV=wv is not None,
        HAS_KPM=kpm is not None, HAS_DROPOUT=dropout_p > 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC=prec,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    common = (
        q, k, v, do, lse, dr, ids32,
        qwk if qwk is not None else dummy,
        kwq if kwq is not None else dummy,
        g if g is not None else dummy,
        kpm if kpm is not None else dummy,
    )  # fmt: skip
    scalars = (H, L, D, nb, float(dropout_p), int(seed), int(offset))
    _bwd_dq_kernel[(triton.cdiv(L, bm), B * H)](
        *common,
        dq,
        dqwk if dqwk is not None else dummy,
        pb if pb is not None else dummy,
        *scalars,
        **flags,
    )
    _bwd_dkv_kernel[(triton.cdiv(L, bn), B * H)](
        *common, dk, dv, dkwq if dkwq is not None else dummy, *scalars, **flags
    )
    dwq = dwk = dwv = None
    if wk is not None:
        dq = dq + torch.matmul(dqwk, wk.float().transpose(-1, -2))
        dwk = _table_grad(torch.matmul(q.float().transpose(-1, -2), dqwk), wk.shape[0]).to(wk.dtype)
    if wq is not None:
        dk = dk + scale * torch.matmul(dkwq, wq.float().transpose(-1, -2))
        dwq = _table_grad(torch.matmul(k.float().transpose(-1, -2) * scale, dkwq), wq.shape[0]).to(
            wq.dtype
        )
    if wv is not None:
        dwv = _table_grad(torch.matmul(pb.transpose(-1, -2), grad_out.float()), wv.shape[0]).to(
            wv.dtype
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dwq, dwk, dwv


def dropout_keep_mask(
    seed: int,
    offset: int,
    shape: tuple[int, int, int],
    dropout_p: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The dropout keep mask ``M`` (``(B, H, L, L)`` bool) the kernels draw for ``(seed, offset)``.

    ``shape`` is ``(B, H, L)``. Meant for tests and references; materialises ``L x L``.
    """
    B, H, L = shape
    out = torch.empty((B, H, L, L), device=device, dtype=torch.int8)
    block = 256
    _keep_mask_kernel[(triton.cdiv(L * L, block), B * H)](
        out, H, L, float(dropout_p), int(seed), int(offset), BLOCK=block
    )
    return out.bool()

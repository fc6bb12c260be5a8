"""irpe_ops.triton_attention against a naive float64 PyTorch reference (autograd for gradients).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (skipped otherwise when there is no GPU), so
the shapes are tiny; block sizes of 8 x 4 (the interpreter has no minimum dot size) give
several tiles per row and column with partial last tiles.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from ops_reference import detr_like_index

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"


def _load() -> ModuleType:
    """The module from this checkout's source (an installed irpe_ops may be another tree's)."""
    path = Path(__file__).resolve().parents[1] / "src" / "irpe_ops" / "triton_attention.py"
    spec = importlib.util.spec_from_file_location("irpe_ops_triton_attention_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ta = _load()

# Tiles of 8 queries x 4 keys: L = 12 gives 2 x 3 tiles, the last query tile partial.
SMALL_BLOCKS = {"block_m": 8, "block_n": 4}


def reference(q, k, v, ids, wq, wk, wv, kpm, keep=None, dropout_p=0.0):
    """The operator from its definition, einsum over gathered tables, no gather/scatter tricks."""
    B, H, _, D = q.shape
    s = D**-0.5
    ids = ids.long()
    logits = q @ k.transpose(-1, -2)
    if wk is not None:  # q_i . Wk[:, ids[i, j]]
        logits = logits + torch.einsum("bhid,hdij->bhij", q, wk.expand(H, -1, -1)[:, :, ids])
    if wq is not None:  # (s k_j) . Wq[:, ids[j, i]]
        logits = logits + torch.einsum(
            "bhjd,hdij->bhij", s * k, wq.expand(H, -1, -1)[:, :, ids.t()]
        )
    empty = torch.zeros(B, 1, 1, 1, dtype=torch.bool, device=q.device)
    if kpm is not None:
        logits = logits.masked_fill(kpm[:, None, None, :], float("-inf"))
        empty = kpm.all(-1)[:, None, None, None]
    lse = torch.logsumexp(logits.detach(), -1)
    p = torch.softmax(torch.where(empty, 0.0, logits), -1) * ~empty
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    out = p @ v
    if wv is not None:  # sum_j P'_ij Wv[ids[i, j], :]
        out = out + torch.einsum("bhij,hijd->bhid", p, wv.expand(H, -1, -1)[:, ids, :])
    return out, lse


def make_inputs(B, H, L, D, K, heads, *, dtype=torch.float32, seed=0):
    """q (scaled), k, v and tables ``{"wq": Hq or None, ...}`` (``heads`` maps name -> Hx)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g) * D**-0.5
    k = torch.randn(B, H, L, D, generator=g)
    v = torch.randn(B, H, L, D, generator=g)
    tables = {}
    for name, shape in (("wq", (D, K)), ("wk", (D, K)), ("wv", (K, D))):
        hx = heads.get(name)
        tables[name] = None if hx is None else torch.randn(hx, *shape, generator=g) * 0.5
    grad_out = torch.randn(B, H, L, D, generator=g)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), {n: cast(t) for n, t in tables.items()}, cast(grad_out)


def run_both(q, k, v, ids, tables, kpm, grad_out, dropout_p=0.0, seed=0, offset=0, **blocks):
    """(kernel forward, backward) and (reference forward, gradients) with the same dropout mask."""
    wq, wk, wv = tables["wq"], tables["wk"], tables["wv"]
    ids = ids.to(DEVICE)
    out, lse = ta.rpe_attention_forward(
        q, k, v, ids, wq, wk, wv, kpm, dropout_p, seed, offset, **blocks
    )
    grads = ta.rpe_attention_backward(
        grad_out, q, k, v, ids, wq, wk, wv, kpm, dropout_p, seed, offset, out, lse, **blocks
    )
    B, H, L, _ = q.shape
    keep = (
        ta.dropout_keep_mask(seed, offset, (B, H, L), dropout_p, DEVICE).double()
        if dropout_p
        else None
    )
    leaves = [t.double().requires_grad_() if t is not None else None for t in (q, k, v, wq, wk, wv)]
    ref_out, ref_lse = reference(*leaves[:3], ids, *leaves[3:], kpm, keep, dropout_p)
    wanted = [t for t in leaves if t is not None]
    ref_grads = iter(torch.autograd.grad(ref_out, wanted, grad_out.double()))
    ref_grads = [next(ref_grads) if t is not None else None for t in leaves]
    return (out, lse, grads), (ref_out, ref_lse, ref_grads)


def assert_matches(got, want, atol=2e-5, rtol=2e-5):
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = got, want
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)
    for name, g, r in zip(("dq", "dk", "dv", "dwq", "dwk", "dwv"), grads, ref_grads, strict=True):
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(
                g.double(), r, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
            )


CONFIGS = {
    # name: (table heads, per_axis of the 3 x 4 id table (K = per_axis**2), padded keys)
    "wk_only": ({"wk": 2}, 3, None),
    "all_per_head": ({"wq": 2, "wk": 2, "wv": 2}, 5, None),
    "all_shared": ({"wq": 1, "wk": 1, "wv": 1}, 3, None),
    "mixed_padded": ({"wq": 2, "wk": 1, "wv": 1}, 5, [[9, 10, 11], [0, 5]]),
    "no_tables_padded": ({}, 3, [[1], [2, 3, 4, 5, 6, 7, 8]]),
}


def padding_mask(B, L, padded):
    kpm = torch.zeros(B, L, dtype=torch.bool)
    if padded is not None:
        for b, cols in enumerate(padded):
            kpm[b, cols] = True
    return kpm.to(DEVICE)


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config: str) -> None:
    heads, per_axis, padded = CONFIGS[config]
    ids, K = detr_like_index(3, 4, per_axis)
    q, k, v, tables, grad_out = make_inputs(2, 2, 12, 16, K, heads)
    kpm = padding_mask(2, 12, padded) if padded is not None else None
    assert_matches(*run_both(q, k, v, ids, tables, kpm, grad_out, **SMALL_BLOCKS))


def test_default_blocks_and_odd_head_size() -> None:
    """One partial tile of the default block sizes; D = 12 pads the head dimension to 16."""
    ids, K = detr_like_index(3, 4, 3)
    q, k, v, tables, grad_out = make_inputs(1, 2, 12, 12, K, {"wq": 2, "wk": 1, "wv": 2}, seed=1)
    kpm = padding_mask(1, 12, [[3, 7]])
    assert_matches(*run_both(q, k, v, ids, tables, kpm, grad_out))


def test_dropout_matches_reference_with_the_same_mask() -> None:
    ids, K = detr_like_index(3, 4, 5)
    q, k, v, tables, grad_out = make_inputs(2, 2, 12, 16, K, {"wq": 2, "wk": 2, "wv": 1}, seed=2)
    kpm = padding_mask(2, 12, [[0], [4, 11]])
    got, want = run_both(q, k, v, ids, tables, kpm, grad_out, 0.3, 1234, 77, **SMALL_BLOCKS)
    assert_matches(got, want)
    # Same seed and offset -> bitwise the same output; another seed -> another one.
    ids = ids.to(DEVICE)
    args = (q, k, v, ids, tables["wq"], tables["wk"], tables["wv"], kpm, 0.3)
    again, _ = ta.rpe_attention_forward(*args, 1234, 77, **SMALL_BLOCKS)
    assert torch.equal(again, got[0])
    other, _ = ta.rpe_attention_forward(*args, 1235, 77, **SMALL_BLOCKS)
    assert not torch.allclose(other, got[0])
    # The mask does not depend on the tiling.
    retiled, _ = ta.rpe_attention_forward(*args, 1234, 77, block_m=4, block_n=8)
    torch.testing.assert_close(retiled, got[0], atol=1e-5, rtol=1e-5)


def test_dropout_mask_statistics() -> None:
    keep = ta.dropout_keep_mask(5, 0, (2, 2, 40), 0.3, DEVICE)
    assert keep.shape == (2, 2, 40, 40) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.7) < 0.03  # 6400 draws: sd 0.006
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep, ta.dropout_keep_mask(5, 1, (2, 2, 40), 0.3, DEVICE))
    assert torch.equal(keep, ta.dropout_keep_mask(5, 0, (2, 2, 40), 0.3, DEVICE))
    # A function of the global counter offset + ((b H + h) L + i) L + j: shifting the offset by
    # one row's worth shifts the mask by one row.
    shifted = ta.dropout_keep_mask(5, 40, (2, 2, 40), 0.3, DEVICE)
    assert torch.equal(shifted[0, 0, :-1], keep[0, 0, 1:])
    # Any int64 seed and a large offset (the counter is 64-bit).
    big = ta.dropout_keep_mask(-(2**62) + 5, 2**40, (2, 2, 40), 0.3, DEVICE)
    assert abs(big.float().mean().item() - 0.7) < 0.03 and not torch.equal(big, keep)
    assert torch.equal(big, ta.dropout_keep_mask(-(2**62) + 5, 2**40, (2, 2, 40), 0.3, DEVICE))


def test_fully_masked_row_gives_zeros() -> None:
    ids, K = detr_like_index(3, 4, 3)
    q, k, v, tables, grad_out = make_inputs(2, 2, 12, 16, K, {"wq": 1, "wk": 2, "wv": 2}, seed=3)
    kpm = padding_mask(2, 12, [list(range(12)), [2]])
    got, want = run_both(q, k, v, ids, tables, kpm, grad_out, 0.2, 9, 0, **SMALL_BLOCKS)
    out, lse, (dq, dk, dv, *_) = got
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all()
    for g in (dq, dk, dv):
        assert torch.equal(g[0], torch.zeros_like(g[0]))
    assert_matches(got, want)


def test_float16() -> None:
    ids, K = detr_like_index(3, 4, 3)
    q, k, v, tables, grad_out = make_inputs(
        1, 2, 12, 16, K, {"wq": 2, "wk": 2, "wv": 2}, dtype=torch.float16
    )
    got, want = run_both(q, k, v, ids, tables, None, grad_out, **SMALL_BLOCKS)
    assert got[0].dtype == torch.float16 and got[2][0].dtype == torch.float16
    assert_matches(got, want, atol=2e-2, rtol=2e-2)


def test_bad_input_is_refused() -> None:
    ids, K = detr_like_index(3, 4, 3)
    q, k, v, tables, _ = make_inputs(1, 2, 12, 16, K, {"wk": 2})
    ids = ids.to(DEVICE)
    with pytest.raises(ValueError, match="ids must lie"):
        ta.rpe_attention_forward(q, k, v, ids + 1, None, tables["wk"], None, None, 0.0, 0, 0)
    with pytest.raises(ValueError, match="head dimension"):
        ta.rpe_attention_forward(
            q, k, v, ids, None, tables["wk"][:1].expand(3, -1, -1), None, None, 0.0, 0, 0
        )
    with pytest.raises(ValueError, match="ids: expected"):
        ta.rpe_attention_forward(q, k, v, ids[:5], None, tables["wk"], None, None, 0.0, 0, 0)
    with pytest.raises(ValueError, match="dropout_p"):
        ta.rpe_attention_forward(q, k, v, ids, None, tables["wk"], None, None, 1.0, 0, 0)


_AOT_SCRIPT = """
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("ta", sys.argv[1])
ta = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ta)
ptrs = {"Q", "K", "V", "DO", "IDS", "KPM"}
for name, backward in (("_fwd_kernel", False), ("_bwd_dq_kernel", True), ("_bwd_dkv_kernel", True)):
    fn = getattr(ta, name)
    bm, bn = ta._default_blocks(32, backward)
    consts = dict(HAS_WK=True, HAS_WQ=True, HAS_WV=True, HAS_KPM=True, HAS_DROPOUT=True,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=32, DOT_PREC="tf32")
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in ("H", "L", "D", "NB"):
            sig[a] = "i32"
        elif a == "dropout_p":
            sig[a] = "fp32"
        elif a in ("seed", "offset"):
            sig[a] = "i64"
        else:
            sig[a] = {"IDS": "*i32", "KPM": "*u8"}.get(a, "*fp16" if a in ptrs else "*fp32")
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "num_stages": 2})
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """The interpreter runs the kernels as Python; this compiles them (to a cubin, no GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = Path(ta.__file__)
    result = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT, str(path)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]

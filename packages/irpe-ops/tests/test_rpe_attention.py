"""irpe_ops.rpe_attention (fused iRPE attention, CPU) against the naive reference."""

from __future__ import annotations

import math

import pytest
import torch
from ops_reference import detr_like_index, rpe_attention_reference

import irpe_ops

# (B, H, L, D): one tile; tiles with a ragged last block; a single query.
SIZES = ((2, 2, 20, 8), (1, 3, 70, 16), (2, 2, 130, 8), (1, 1, 1, 4))
# Which tables are given, and with how many heads (1 = shared, "H" = per head).
TABLES = (
    {},
    {"wk": 1},
    {"wq": "H"},
    {"wv": 1},
    {"wq": 1, "wk": "H", "wv": "H"},
    {"wq": "H", "wk": "H", "wv": 1},
)


@pytest.fixture(params=["per_plane", "two_pass"])
def backward_mode(request, monkeypatch) -> str:
    """Both backward schedules: one task per plane (each dS tile computed once) and the two
    passes over (plane, block) tasks; the kernel picks one by the number of planes per thread."""
    monkeypatch.setenv("IRPE_OPS_ATTENTION_BACKWARD", request.param)
    return request.param


def make_case(
    size: tuple[int, int, int, int],
    tables: dict[str, int | str],
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    K: int = 9,
    detr_ids: bool = False,
) -> dict[str, torch.Tensor | None]:
    B, H, L, D = size
    if detr_ids:  # a 10-row image grid, product buckets of clipped offsets
        assert L % 10 == 0
        ids, K = detr_like_index(10, L // 10)
    else:
        ids = torch.randint(0, K, (L, L), generator=generator)
    case: dict[str, torch.Tensor | None] = {
        "q": torch.randn(B, H, L, D, generator=generator) * D**-0.5,
        "k": torch.randn(B, H, L, D, generator=generator),
        "v": torch.randn(B, H, L, D, generator=generator),
        "ids": ids.to(torch.int32),
    }
    for name in ("wq", "wk", "wv"):
        heads = tables.get(name)
        if heads is None:
            case[name] = None
            continue
        heads = H if heads == "H" else heads
        shape = (heads, K, D) if name == "wv" else (heads, D, K)
        case[name] = torch.randn(*shape, generator=generator) * 0.5
    return {
        name: t.to(dtype) if t is not None and t.is_floating_point() else t
        for name, t in case.items()
    }


def fused(case: dict, **kwargs) -> torch.Tensor:
    return irpe_ops.rpe_attention(
        case["q"],
        case["k"],
        case["v"],
        case["ids"],
        wq=case["wq"],
        wk=case["wk"],
        wv=case["wv"],
        **kwargs,
    )


def reference(case: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    double = {
        name: t.double() if t is not None and t.is_floating_point() else t
        for name, t in case.items()
    }
    return rpe_attention_reference(**double, **kwargs)


def grad_inputs(case: dict) -> list[str]:
    return [name for name in ("q", "k", "v", "wq", "wk", "wv") if case[name] is not None]


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("tables", TABLES)
def test_forward_matches_reference(size, tables, generator: torch.Generator) -> None:
    case = make_case(size, tables, generator)
    out, lse = torch.ops.irpe_ops.rpe_attention(
        case["q"],
        case["k"],
        case["v"],
        case["ids"],
        case["wq"],
        case["wk"],
        case["wv"],
        None,
        0.0,
        0,
        0,
    )
    ref_out, ref_lse = reference(case)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_forward_detr_ids_all_tables(generator: torch.Generator) -> None:
    case = make_case((2, 2, 150, 8), {"wq": 1, "wk": 1, "wv": 1}, generator, detr_ids=True)
    torch.testing.assert_close(fused(case).double(), reference(case)[0], atol=1e-5, rtol=1e-5)


def test_forward_non_contiguous_inputs(generator: torch.Generator) -> None:
    case = make_case((2, 3, 70, 8), {"wq": 1, "wk": "H", "wv": 1}, generator)
    # (B, H, L, D) views of (B, L, H, D) tensors, as a multi-head attention's reshape makes.
    for name in ("q", "k", "v"):
        case[name] = case[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not case[name].is_contiguous()
    case["ids"] = case["ids"].t().contiguous().t()
    torch.testing.assert_close(fused(case).double(), reference(case)[0], atol=1e-5, rtol=1e-5)


def test_float64_forward(generator: torch.Generator) -> None:
    case = make_case((2, 2, 70, 8), {"wq": 1, "wk": "H", "wv": 1}, generator, torch.float64)
    out, lse = torch.ops.irpe_ops.rpe_attention(
        case["q"],
        case["k"],
        case["v"],
        case["ids"],
        case["wq"],
        case["wk"],
        case["wv"],
        None,
        0.0,
        0,
        0,
    )
    assert lse.dtype == torch.float64
    ref_out, ref_lse = reference(case)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def check_grads(
    case: dict,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> None:
    names = grad_inputs(case)
    leaves = {n: case[n].detach().clone().requires_grad_() for n in names}
    out = fused({**case, **leaves}, key_padding_mask=mask, dropout_p=dropout_p, seed=seed)
    grad = torch.randn(out.shape, generator=generator).to(out.dtype)
    got = torch.autograd.grad(out, [leaves[n] for n in names], grad)

    ref_leaves = {n: case[n].detach().double().requires_grad_() for n in names}
    ref_case = {
        n: ref_leaves.get(n, t.double() if t is not None and t.is_floating_point() else t)
        for n, t in case.items()
    }
    keep = None
    if dropout_p > 0.0:
        keep = torch.ops.irpe_ops._rpe_attention_keep_mask(case["q"], dropout_p, seed, 0)
    ref_out, _ = rpe_attention_reference(
        **ref_case, key_padding_mask=mask, keep=keep, dropout_p=dropout_p
    )
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    expected = torch.autograd.grad(ref_out, [ref_leaves[n] for n in names], grad.double())
    for name, g, e in zip(names, got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == case[name].dtype, name
        torch.testing.assert_close(g.double(), e, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("size", SIZES[:3])
@pytest.mark.parametrize("tables", TABLES)
@pytest.mark.usefixtures("backward_mode")
def test_backward_matches_reference(size, tables, generator: torch.Generator) -> None:
    check_grads(make_case(size, tables, generator), generator)


@pytest.mark.usefixtures("backward_mode")
def test_backward_detr_ids(generator: torch.Generator) -> None:
    case = make_case((2, 2, 150, 8), {"wq": 1, "wk": "H", "wv": 1}, generator, detr_ids=True)
    check_grads(case, generator)


@pytest.mark.usefixtures("backward_mode")
def test_gradcheck_float64(generator: torch.Generator) -> None:
    case = make_case((1, 2, 7, 4), {"wq": 1, "wk": "H", "wv": 1}, generator, torch.float64, K=5)
    mask = torch.tensor([[False, False, True, False, False, False, True]])
    names = grad_inputs(case)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return fused({**case, **dict(zip(names, tensors, strict=True))}, key_padding_mask=mask)

    inputs = tuple(case[n].detach().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.usefixtures("backward_mode")
def test_backward_is_deterministic(generator: torch.Generator) -> None:
    case = make_case((2, 3, 130, 8), {"wq": 1, "wk": 1, "wv": 1}, generator)
    names = grad_inputs(case)
    grad = torch.randn(2, 3, 130, 8, generator=generator)
    runs = []
    for _ in range(2):
        leaves = {n: case[n].detach().clone().requires_grad_() for n in names}
        out = fused({**case, **leaves}, dropout_p=0.2, seed=5)
        runs.append(torch.autograd.grad(out, list(leaves.values()), grad))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Key padding mask
# ---------------------------------------------------------------------------------------------


def random_mask(B: int, L: int, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(B, L, generator=generator) < 0.3
    mask[:, 0] = False  # at least one key per row
    return mask


@pytest.mark.parametrize("tables", [{}, {"wq": 1, "wk": "H", "wv": 1}])
@pytest.mark.usefixtures("backward_mode")
def test_key_padding_mask(tables, generator: torch.Generator) -> None:
    case = make_case((2, 2, 130, 8), tables, generator)
    mask = random_mask(2, 130, generator)
    ref_out, _ = reference(case, key_padding_mask=mask)
    torch.testing.assert_close(
        fused(case, key_padding_mask=mask).double(), ref_out, atol=1e-5, rtol=1e-5
    )
    check_grads(case, generator, mask=mask)


@pytest.mark.usefixtures("backward_mode")
def test_fully_masked_rows_give_zero(generator: torch.Generator) -> None:
    case = make_case((2, 2, 70, 8), {"wq": 1, "wk": 1, "wv": 1}, generator)
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[1] = True  # every key of batch 1 padded
    names = grad_inputs(case)
    leaves = {n: case[n].detach().clone().requires_grad_() for n in names}
    out, lse = torch.ops.irpe_ops.rpe_attention(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        case["ids"],
        leaves["wq"],
        leaves["wk"],
        leaves["wv"],
        mask,
        0.0,
        0,
        0,
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isinf(lse[1]).all() and torch.isfinite(lse[0]).all()
    torch.testing.assert_close(
        out[0:1].double(),
        reference({n: (t[0:1] if n in "qkv" else t) for n, t in case.items()})[0],
        atol=1e-5,
        rtol=1e-5,
    )
    grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[0][1], torch.zeros_like(grads[0][1]))  # dq of batch 1


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


def test_dropout_same_seed_is_bitwise_same(generator: torch.Generator) -> None:
    case = make_case((2, 2, 130, 8), {"wk": 1, "wv": 1}, generator)
    a = fused(case, dropout_p=0.3, seed=7, offset=2)
    b = fused(case, dropout_p=0.3, seed=7, offset=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, fused(case, dropout_p=0.3, seed=8, offset=2))
    assert not torch.equal(a, fused(case, dropout_p=0.3, seed=7, offset=3))
    assert not torch.equal(a, fused(case))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction(p: float) -> None:
    q = torch.empty(2, 4, 200, 1)
    keep = torch.ops.irpe_ops._rpe_attention_keep_mask(q, p, 123, 0)
    n = keep.numel()
    frac = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 6 * sigma
    # Neither rows nor columns share a pattern: per-row and per-column fractions vary.
    assert keep.double().mean(-1).std() > 0 and keep.double().mean(-2).std() > 0
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0], keep[1])


def test_dropout_zero_keeps_everything() -> None:
    keep = torch.ops.irpe_ops._rpe_attention_keep_mask(torch.empty(1, 2, 9, 1), 0.0, 1, 0)
    assert keep.all()


@pytest.mark.parametrize("tables", [{}, {"wq": 1, "wk": "H", "wv": 1}])
@pytest.mark.usefixtures("backward_mode")
def test_dropout_forward_backward_match_reference(tables, generator: torch.Generator) -> None:
    case = make_case((2, 2, 130, 8), tables, generator)
    check_grads(case, generator, mask=random_mask(2, 130, generator), dropout_p=0.25, seed=99)


# ---------------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------------


def test_bfloat16_forward_backward(generator: torch.Generator) -> None:
    case = make_case((2, 2, 130, 16), {"wq": 1, "wk": "H", "wv": 1}, generator, torch.bfloat16)
    check_grads(
        case,
        generator,
        mask=random_mask(2, 130, generator),
        dropout_p=0.1,
        seed=3,
        atol=3e-2,
        rtol=3e-2,
    )


def test_bfloat16_detr_ids(generator: torch.Generator) -> None:
    case = make_case((1, 2, 150, 8), {"wk": 1}, generator, torch.bfloat16, detr_ids=True)
    out = fused(case)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(case)[0], atol=2e-2, rtol=2e-2)


def test_bfloat16_is_float32_kernel_rounded(generator: torch.Generator) -> None:
    # bfloat16 runs the float32 kernels on exact float32 copies: the same results, rounded.
    case = make_case((1, 2, 70, 16), {"wq": 1, "wk": "H", "wv": 1}, generator, torch.bfloat16)
    args = [case[n] for n in ("q", "k", "v", "ids", "wq", "wk", "wv")]
    args32 = [a.float() if a is not None and a.is_floating_point() else a for a in args]
    out, lse = torch.ops.irpe_ops.rpe_attention(*args, None, 0.1, 5, 0)
    out32, lse32 = torch.ops.irpe_ops.rpe_attention(*args32, None, 0.1, 5, 0)
    assert torch.equal(out, out32.bfloat16())
    assert torch.equal(lse, lse32)
    grad = torch.randn(out.shape, generator=generator).bfloat16()
    grads = torch.ops.irpe_ops.rpe_attention_backward(grad, *args, None, out, lse, 0.1, 5, 0)
    grads32 = torch.ops.irpe_ops.rpe_attention_backward(
        grad.float(), *args32, None, out.float(), lse, 0.1, 5, 0
    )
    for g, g32 in zip(grads, grads32, strict=True):
        assert torch.equal(g, g32.bfloat16())


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------


def test_errors(generator: torch.Generator) -> None:
    case = make_case((1, 2, 5, 4), {"wk": 1}, generator, K=3)
    q, k, v, ids, wk = case["q"], case["k"], case["v"], case["ids"], case["wk"]
    with pytest.raises(RuntimeError, match="k must have q's shape"):
        irpe_ops.rpe_attention(q, k[:, :, :4], v, ids, wk=wk)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float64"):
        irpe_ops.rpe_attention(q.half(), k.half(), v.half(), ids, wk=wk)
    with pytest.raises(RuntimeError, match="ids must be int32"):
        irpe_ops.rpe_attention(q, k, v, ids.long(), wk=wk)
    with pytest.raises(RuntimeError, match=r"ids must be \(L, L\)"):
        irpe_ops.rpe_attention(q, k, v, ids[:4], wk=wk)
    with pytest.raises(RuntimeError, match=r"wk must be \(Hk, D, K\) with D = 4"):
        irpe_ops.rpe_attention(q, k, v, ids, wk=wk.transpose(1, 2))
    with pytest.raises(RuntimeError, match="1 \\(shared\\) or H = 2"):
        irpe_ops.rpe_attention(q, k, v, ids, wk=wk.expand(3, 4, 3))
    with pytest.raises(RuntimeError, match="agree on the number of buckets"):
        irpe_ops.rpe_attention(q, k, v, ids, wk=wk, wv=torch.randn(1, 4, 4))
    with pytest.raises(RuntimeError, match=r"index values must lie in \[0, 2\)"):
        irpe_ops.rpe_attention(q, k, v, ids, wk=wk[..., :2])
    with pytest.raises(RuntimeError, match="key_padding_mask must be bool"):
        irpe_ops.rpe_attention(q, k, v, ids, key_padding_mask=torch.zeros(1, 5))
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        irpe_ops.rpe_attention(q, k, v, ids, dropout_p=1.0, seed=0)
    with pytest.raises(RuntimeError, match="must have q's dtype"):
        irpe_ops.rpe_attention(q, k, v, ids, wk=wk.double())


def test_inside_an_autocast_region() -> None:
    """The kernel's own ATen calls are not re-cast by an enclosing torch.autocast."""
    q, k, v = torch.randn(3, 2, 4, 12, 8).bfloat16().unbind(0)
    ids = torch.randint(0, 9, (12, 12), dtype=torch.int32)
    wk = torch.randn(1, 8, 9).bfloat16().requires_grad_()
    expected = irpe_ops.rpe_attention(q, k, v, ids, wk=wk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = irpe_ops.rpe_attention(q, k, v, ids, wk=wk)
        out.float().sum().backward()
    assert torch.equal(out, expected) and wk.grad is not None


def test_backward_schedule_variable_is_checked(generator: torch.Generator, monkeypatch) -> None:
    case = make_case((1, 2, 5, 4), {"wk": 1}, generator, K=3)
    q = case["q"].requires_grad_()
    out = irpe_ops.rpe_attention(q, case["k"], case["v"], case["ids"], wk=case["wk"])
    monkeypatch.setenv("IRPE_OPS_ATTENTION_BACKWARD", "fast")
    with pytest.raises(RuntimeError, match="IRPE_OPS_ATTENTION_BACKWARD must be 'per_plane'"):
        out.sum().backward()

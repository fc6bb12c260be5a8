"""The operators inside torch.compile(fullgraph=True): no graph breaks, same values and grads.

The default test compiles with the "aot_eager" backend: it traces the ops through Dynamo and
AOTAutograd (fake kernels, autograd formulas, functionalisation) like "inductor" does, but skips
inductor's C++ code generation, which takes over a minute on a 2-core CI machine. The "inductor"
run of the same check is marked ``slow`` (deselected by default; run it with ``-m slow``).
"""

from __future__ import annotations

import pytest
import torch
from ops_reference import detr_like_index

import irpe_ops


def contextual_rpe_logits(
    q: torch.Tensor, table: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """A small caller as iRPE uses the op: per-bucket scores ``q @ table`` gathered per key.

    Shapes: q ``(B, H, L, D)``, table ``(D, K)``, index ``(L, L)`` -> ``(B, H, L, L)``.
    """
    scores = q @ table
    logits = irpe_ops.rpe_index(scores, index)
    return torch.softmax(logits, dim=-1)


def _check_compiled(backend: str, generator: torch.Generator) -> None:
    index, K = detr_like_index(3, 4)
    q = torch.randn(2, 2, 12, 8, generator=generator, requires_grad=True)
    table = torch.randn(8, K, generator=generator, requires_grad=True)
    grad = torch.randn(2, 2, 12, 12, generator=generator)

    eager = contextual_rpe_logits(q, table, index)
    eager_grads = torch.autograd.grad(eager, (q, table), grad)

    torch._dynamo.reset()
    compiled_fn = torch.compile(contextual_rpe_logits, fullgraph=True, backend=backend)
    compiled = compiled_fn(q, table, index)
    compiled_grads = torch.autograd.grad(compiled, (q, table), grad)

    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_compile_fullgraph_aot_eager(generator: torch.Generator) -> None:
    _check_compiled("aot_eager", generator)


@pytest.mark.slow
def test_compile_fullgraph_inductor(generator: torch.Generator) -> None:
    _check_compiled("inductor", generator)


def fused_attention_block(
    x: torch.Tensor, wk: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """A small attention as RPEMultiheadAttention uses the fused op: (B, L, H*D) -> same."""
    B, L, _ = x.shape
    H, D = 2, x.shape[-1] // 2
    heads = x.view(B, L, H, D).transpose(1, 2)
    out = irpe_ops.rpe_attention(
        heads * D**-0.5, heads, heads, ids, wk=wk, key_padding_mask=mask, dropout_p=0.1, seed=4
    )
    return out.transpose(1, 2).reshape(B, L, H * D)


def test_compile_fullgraph_rpe_attention(generator: torch.Generator) -> None:
    index, K = detr_like_index(3, 4)
    ids = index.to(torch.int32)
    x = torch.randn(2, 12, 8, generator=generator, requires_grad=True)
    wk = torch.randn(1, 4, K, generator=generator, requires_grad=True)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, -3:] = True
    grad = torch.randn(2, 12, 8, generator=generator)

    eager = fused_attention_block(x, wk, ids, mask)
    eager_grads = torch.autograd.grad(eager, (x, wk), grad)

    torch._dynamo.reset()
    compiled_fn = torch.compile(fused_attention_block, fullgraph=True, backend="aot_eager")
    compiled = compiled_fn(x, wk, ids, mask)
    compiled_grads = torch.autograd.grad(compiled, (x, wk), grad)

    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected)

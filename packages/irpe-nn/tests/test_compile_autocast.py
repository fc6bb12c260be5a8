"""torch.compile(fullgraph=True) and autocast."""

from __future__ import annotations

import pytest
import torch

import irpe_nn


def layer(spec: str, dtype=torch.float64) -> irpe_nn.RPEMultiheadAttention:
    torch.manual_seed(0)
    module = irpe_nn.RPEMultiheadAttention(16, 4, rpe_config=irpe_nn.parse_rpe_spec(spec))
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.5)
    return module.to(dtype)


def run(module, x, mask, hw):
    out, weights = module(x, x, x, key_padding_mask=mask, hw=hw)
    return out, weights


@pytest.mark.parametrize(
    ("spec", "compiler"),
    [("rpe-2.0-product-ctx-0-qkv", "aot_eager"), ("rpe-1.9-cross-bias-1-qk", "inductor")],
)
def test_compile_fullgraph_matches_eager(backend_name, spec, compiler):
    module = layer(spec)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, -2:] = True
    compiled = torch.compile(run, fullgraph=True, backend=compiler)
    x = torch.randn(12, 2, 16, dtype=torch.float64, requires_grad=True)
    out, weights = compiled(module, x, mask, (3, 4))
    ref_out, ref_weights = run(module, x, mask, (3, 4))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)
    params = [x, *module.parameters()]
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), params)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("spec", ["rpe-2.0-product-ctx-0-qkv", "rpe-2.0-euc-bias-0-qk"])
def test_autocast_bfloat16_cpu(backend_name, spec):
    module = layer(spec, torch.float32)
    x = torch.randn(12, 2, 16, requires_grad=True)
    ref_out, _ = module(x, x, x, hw=(3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = module(x, x, x, hw=(3, 4))
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits: compare relative to the output's scale.
    assert (out.float() - ref_out).norm() / ref_out.norm() < 0.02
    out.float().square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda(backend_name, dtype):
    module = layer("rpe-2.0-product-ctx-0-qkv", torch.float32).cuda()
    x = torch.randn(12, 2, 16, device="cuda", requires_grad=True)
    ref_out, _ = module(x, x, x, hw=(3, 4))
    with torch.autocast("cuda", dtype=dtype):
        out, _ = module(x, x, x, hw=(3, 4))
    assert out.dtype == dtype
    assert (out.float() - ref_out).norm() / ref_out.norm() < 0.02
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.needs_cuda
@pytest.mark.parametrize("spec", ["rpe-2.0-product-ctx-0-qkv", "rpe-1.9-cross-bias-1-qk"])
def test_cuda_matches_cpu(backend_name, spec):
    module = layer(spec)
    x = torch.randn(12, 2, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, -3:] = True
    out, weights = run(module, x, mask, (3, 4))
    grads = torch.autograd.grad(out.sum(), [x, *module.parameters()])
    module_cuda = module.cuda()
    x_cuda = x.detach().cuda().requires_grad_(True)
    out_cuda, weights_cuda = run(module_cuda, x_cuda, mask.cuda(), (3, 4))
    grads_cuda = torch.autograd.grad(out_cuda.sum(), [x_cuda, *module_cuda.parameters()])
    torch.testing.assert_close(out_cuda.cpu(), out)
    torch.testing.assert_close(weights_cuda.cpu(), weights)
    for got, want in zip(grads_cuda, grads, strict=True):
        torch.testing.assert_close(got.cpu(), want)

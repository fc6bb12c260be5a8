"""The Triton kernels (:mod:`irpe_ops.triton_attention`) as the CUDA implementation of
``irpe_ops::rpe_attention`` and its backward.

Registered when the package is imported on a machine with a CUDA device and Triton (Triton
ships with torch's CUDA builds); elsewhere nothing is registered and the op runs on CPU only.
The kernels' correctness tests run on CPU tensors under ``TRITON_INTERPRET=1``
(``tests/test_triton_attention.py``); their speed is measured on a GPU by ``ci/gpu_check.sh``.
"""

from __future__ import annotations

import torch

__all__ = ["register_cuda_kernels"]


def register_cuda_kernels() -> bool:
    """Register the Triton kernels for CUDA tensors; ``False`` when CUDA or Triton is absent."""
    if not torch.cuda.is_available():
        return False
    try:
        from irpe_ops import triton_attention
    except ImportError:
        return False

    @torch.library.register_kernel("irpe_ops::rpe_attention", "cuda")
    def _forward(q, k, v, ids, wq, wk, wv, key_padding_mask, dropout_p, seed, offset):
        return triton_attention.rpe_attention_forward(
            q, k, v, ids, wq, wk, wv, key_padding_mask, dropout_p, seed, offset
        )

    @torch.library.register_kernel("irpe_ops::rpe_attention_backward", "cuda")
    def _backward(grad_out, q, k, v, ids, wq, wk, wv, mask, out, lse, dropout_p, seed, offset):
        grads = triton_attention.rpe_attention_backward(
            grad_out, q, k, v, ids, wq, wk, wv, mask, dropout_p, seed, offset, out, lse
        )
        # The schema returns an empty tensor, not None, for an absent table.
        return tuple(q.new_empty(0) if g is None else g for g in grads)

    return True

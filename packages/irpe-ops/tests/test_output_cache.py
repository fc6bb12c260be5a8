"""The internal cache of large CPU output blocks: reuse, correctness of reused memory, limits.

Not public API: the tests reach it through the private ``irpe_ops._empty_cache`` and
``irpe_ops._cached_bytes``."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from ops_reference import bucket_sum_reference, rpe_index_reference
from ops_samples import make_index

import irpe_ops

# (B, H, L, L) float32 of 2 x 4 x 768 x 768 = 18 MiB: above the 4 MiB caching threshold.
B, H, L, K = 2, 4, 768, 49


def _inputs(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(B, H, L, K, generator=generator)
    return x, make_index(L, L, K, torch.int32, generator)


def test_a_released_output_is_reused_and_overwritten(generator: torch.Generator) -> None:
    irpe_ops._empty_cache()
    x, index = _inputs(generator)
    first = irpe_ops.rpe_index(x, index)
    pointer = first.data_ptr()
    first.fill_(float("nan"))  # garbage the next user of the block must not see
    del first
    assert irpe_ops._cached_bytes() >= B * H * L * L * 4

    y = torch.randn_like(x)
    second = irpe_ops.rpe_index(y, index)
    assert second.data_ptr() == pointer
    assert irpe_ops._cached_bytes() == 0
    assert torch.equal(second, rpe_index_reference(y, index))
    # The adjoint allocates through the same cache.
    expected = bucket_sum_reference(second, index, K)
    torch.testing.assert_close(irpe_ops.bucket_sum(second, index, K), expected.to(torch.float32))


def test_blocks_in_use_are_never_handed_out_twice(generator: torch.Generator) -> None:
    x, index = _inputs(generator)
    outputs = [irpe_ops.rpe_index(x * i, index) for i in range(4)]
    assert len({out.data_ptr() for out in outputs}) == 4
    for i, out in enumerate(outputs):
        assert torch.equal(out, rpe_index_reference(x * i, index))


def test_a_smaller_request_reuses_a_larger_block_within_bounds(
    generator: torch.Generator,
) -> None:
    irpe_ops._empty_cache()
    x, index = _inputs(generator)
    first = irpe_ops.rpe_index(x, index)
    pointer = first.data_ptr()
    del first
    # 3/4 of the rows: fits the cached block with little waste.
    smaller = irpe_ops.rpe_index(x[:, :, : 3 * L // 4], index[: 3 * L // 4])
    assert smaller.data_ptr() == pointer
    assert torch.equal(smaller, rpe_index_reference(x[:, :, : 3 * L // 4], index[: 3 * L // 4]))
    del smaller
    # 300 rows (7.0 MiB) would waste most of the 18 MiB block: fresh memory instead.
    part = irpe_ops.rpe_index(x[:, :, :300], index[:300])
    assert part.data_ptr() != pointer
    assert torch.equal(part, rpe_index_reference(x[:, :, :300], index[:300]))


def test_empty_cache_returns_the_memory(generator: torch.Generator) -> None:
    x, index = _inputs(generator)
    irpe_ops.rpe_index(x, index)  # released at once
    assert irpe_ops._cached_bytes() > 0
    released = irpe_ops._empty_cache()
    assert released > 0
    assert irpe_ops._cached_bytes() == 0
    assert irpe_ops._empty_cache() == 0


def _run_with_cache_setting(value: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import torch, irpe_ops\n"
        "x = torch.randn(2, 4, 512, 49)\n"
        "i = torch.randint(0, 49, (512, 512), dtype=torch.int32)\n"
        "irpe_ops.rpe_index(x, i)\n"
        "print(irpe_ops._cached_bytes())\n"
    )
    env = {**os.environ, "IRPE_OPS_CPU_CACHE_MB": value}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )


def test_the_cache_can_be_disabled_and_a_bad_setting_is_named() -> None:
    disabled = _run_with_cache_setting("0")
    assert disabled.returncode == 0, disabled.stderr
    assert disabled.stdout.strip() == "0"
    bad = _run_with_cache_setting("lots")
    assert bad.returncode != 0
    assert "IRPE_OPS_CPU_CACHE_MB" in bad.stderr and "'lots'" in bad.stderr

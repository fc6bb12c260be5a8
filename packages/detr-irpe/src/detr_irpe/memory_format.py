"""The memory format of the backbone under mixed precision (``--amp``).

Convolutions in reduced precision run faster on NHWC (``torch.channels_last``) tensors on CUDA
(tensor cores read channels innermost). Under ``--amp bf16``/``fp16`` the ResNet's weights and
its input batch are therefore made channels_last; what follows the backbone (the 1x1 input
projection, then the flattening into a sequence) takes either layout.

On the CPU it pays too: ``benchmarks/bench_channels_last.py`` (ResNet-50 forward + backward,
bf16 autocast, one 800x1066 image, 2 threads) takes 2.74-2.82 s instead of 3.02-3.11 s on the
2-core AVX512-BF16 Xeon (no AMX) of docs/benchmarks.md; :data:`CPU_CHANNELS_LAST` turns it off
for a CPU where it does not.

Without ``--amp`` nothing changes: another layout picks other convolution kernels, whose float32
sums are rounded differently, and the float32 path stays numerically the original's.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CPU_CHANNELS_LAST", "backbone_memory_format", "use_backbone_memory_format"]

# Whether channels_last pays on the CPU under bf16 autocast (see the module docstring).
CPU_CHANNELS_LAST = True


def backbone_memory_format(device: torch.device | str, amp: str) -> torch.memory_format:
    """``torch.channels_last`` where it pays for ``--amp amp`` on ``device``, else
    ``torch.contiguous_format`` (always for ``amp == "off"``)."""
    if amp == "off":
        return torch.contiguous_format
    device_type = torch.device(device).type
    if device_type == "cuda" or (device_type == "cpu" and CPU_CHANNELS_LAST):
        return torch.channels_last
    return torch.contiguous_format


def use_backbone_memory_format(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Put the ResNet weights of ``model`` (a :class:`~detr_irpe.models.DETR`) in
    ``memory_format``; its forward converts each input batch to the same format."""
    backbone = model.backbone[0]
    backbone.to(memory_format=memory_format)
    backbone.memory_format = memory_format

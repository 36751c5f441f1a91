"""Mixed precision on CUDA: bf16 autocast where the GPU computes bf16 natively (compute capability
8.0 and up: A100, H100, L4, RTX 30xx and later). Older GPUs (V100, T4) pass torch's bf16 check by
emulation and would run slower than fp32, so they run in fp32; the CPU always does."""
from __future__ import annotations

import torch


def uses_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def autocast(device: torch.device):
    """The forward passes' context: bf16 autocast on such a GPU, nothing elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))

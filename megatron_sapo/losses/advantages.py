"""Group-normalised advantages for group-based RL (GRPO / GSPO / SAPO).

    Â_i = (R_i − mean_j R_j) / (std_j R_j + eps)      over the G responses of one prompt

Responses of one prompt are contiguous in `rewards`.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Advantages `[N]` (fp32) for rewards `[N]` laid out as N/group_size contiguous groups.

    The std is the unbiased sample std (torch's default, as in verl and TRL); a group of one response
    has no spread and gets advantage 0. A group whose rewards are all equal gets 0 for every response.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(f"number of rewards ({n}) is not a multiple of group_size ({group_size})")
    # fp64: the mean of fp32 rewards is itself rounded, and (R - mean) / (std + eps) magnifies that.
    grouped = rewards.detach().to(torch.float64).view(-1, group_size)
    if group_size == 1:
        return torch.zeros(n, dtype=torch.float32)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    adv = (grouped - mean) / (std + eps)
    # Equal rewards carry no signal, but a rounded mean is 1 ulp off them and dividing by std + eps
    # (both ~0) turns that ulp into advantages of ~±0.06 (e.g. eight 0.7s in fp32): zero them exactly.
    equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return adv.masked_fill(equal, 0.0).to(torch.float32).view(-1)

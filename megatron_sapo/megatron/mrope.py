"""Qwen3-VL's multimodal RoPE: 3-D positions per token and the interleaved rotary frequencies (torch only).

    positions = rope_index(input_ids, image_grid_thw, image_token_id, spatial_merge_size)   # [3, T]
    rotary = InterleavedMRoPE(head_dim, rotary_base, mrope_section)(positions[:, None])      # [T, 1, 1, D]

No megatron import here: `batching.collate` builds micro-batch positions with `rope_index`, and
`vlm.Qwen3VLModel` rotates with `InterleavedMRoPE`.
Tests: `python -m pytest tests/unit/test_vlm.py -q` (both against transformers' own implementations)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class InterleavedMRoPE(nn.Module):
    """Qwen3-VL's M-RoPE: frequency k rotates with the temporal, height or width position, interleaved.

    Frequency k (of head_dim / 2) uses the height position when k % 3 == 1 and k < 3·section[1], the
    width position when k % 3 == 2 and k < 3·section[2], else the temporal one (transformers'
    `Qwen3VLTextRotaryEmbedding.recomposition_frequencies`). Output: megatron's rotary tensor
    `[T, B, 1, head_dim]` (non-interleaved halves, i.e. rotate_half).
    """

    def __init__(self, head_dim: int, rotary_base: float, mrope_section: list[int]) -> None:
        super().__init__()
        if sum(mrope_section) != head_dim // 2 or len(mrope_section) != 3:
            raise ValueError(
                f"mrope_section {mrope_section} must be 3 numbers summing to head_dim/2 = {head_dim // 2}"
            )
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        axis = torch.zeros(head_dim // 2, dtype=torch.long)
        for dim in (1, 2):
            axis[dim : 3 * mrope_section[dim] : 3] = dim
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axis", axis, persistent=False)

    def forward(
        self, position_ids: torch.Tensor, mrope_section: Any = None, cp_group: Any = None
    ) -> torch.Tensor:
        """`position_ids [3, B, T]` -> `[T, B, 1, head_dim]` fp32 angles (GPTModel's mrope call signature)."""
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"M-RoPE needs position_ids [3, B, T], got {tuple(position_ids.shape)}")
        chosen = position_ids[self.axis.to(position_ids.device)]  # [head_dim/2, B, T]
        freqs = chosen.permute(2, 1, 0).float() * self.inv_freq.to(position_ids.device)  # [T, B, head_dim/2]
        return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]


def rope_index(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int, spatial_merge_size: int
) -> torch.Tensor:
    """`[3, T]` M-RoPE positions of one sample's token ids `[T]` (images only; its grids `[n_img, 3]`).

    Text runs count up on all three axes; an image's `t·h·w / merge²` pad tokens get (t0, row, col) offset
    by the position where the image starts; the next text resumes at that start + max(h, w) / merge.
    ValueError when the image pad tokens and the grids disagree.
    """
    image_token, merge = image_token_id, spatial_merge_size
    ids = input_ids.tolist()
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw]
    out, pos, i, n_img = [], 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token:
            j = i
            while j < len(ids) and ids[j] != image_token:
                j += 1
            out.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        if n_img >= len(grids):
            raise ValueError(
                f"image tokens at position {i}: more images in the prompt than grids ({len(grids)})"
            )
        t, h, w = grids[n_img][0], grids[n_img][1] // merge, grids[n_img][2] // merge
        n = t * h * w
        if ids[i : i + n] != [image_token] * n:
            run = next((k for k in range(i, len(ids)) if ids[k] != image_token), len(ids)) - i
            raise ValueError(
                f"image {n_img}: grid {grids[n_img]} needs {n} image tokens, the prompt has {run} at position {i}"
            )
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        out.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos, i, n_img = pos + max(h, w), i + n, n_img + 1
    if n_img != len(grids):
        raise ValueError(f"{len(grids)} image grids but {n_img} images in the prompt")
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)

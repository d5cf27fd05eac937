"""Qwen3-VL and Qwen3-VL-MoE policies on megatron-core: a `GPTModel` language model plus a vision tower.

    from megatron_sapo.megatron.models import build_gpt_model       # dispatches VL configs here
    model = build_gpt_model(hf_config)                                # Qwen3VLModel on VL architectures
    positions = rope_index(input_ids, image_grid_thw, hf_config)      # [3, T] M-RoPE positions, per sample
    logits = model(input_ids, position_ids, mask, pixel_values=pv, image_grid_thw=grid)  # [B, T, V/tp]

`Qwen3VLModel` is a `GPTModel` (so every parameter of the language model keeps its megatron name and the
engine, bridge, checkpoints and routing replay treat it like a text policy) with three additions:
- `vision`: transformers' own `Qwen3VLVisionModel` (patch embedding, blocks, merger, deepstack mergers),
  on the first pipeline stage only, **replicated over TP** (its parameters keep their HF names under
  `vision.`). Why not megatron modules: megatron-core 0.16.1 has no Qwen vision tower, and the tower is
  small next to the language model, so sharding it would save little and add a second implementation to
  keep equal to the reference. Cost per first-stage rank, bf16 weights + fp32 main grads
  (+ Adam states sharded by the distributed optimizer): Qwen3-VL-30B-A3B's tower (27 blocks of width
  1152, 3 deepstack mergers) is ~0.58 B parameters, ~1.2 GB weights + ~2.3 GB grads; Qwen3-VL-235B-A22B's
  is the same tower. Against 30B-A3B's ~61 GB of bf16 weights (spread over TP×PP×EP) this is small, but
  it sits on stage 0 only: give that stage one or two fewer decoder layers
  (`num_layers_in_first_pipeline_stage`) at PP > 1 (see docs/multinode.md).
- M-RoPE positions `[3, B, T]` (temporal, height, width; built by `rope_index` as transformers'
  `get_rope_index` does) applied with Qwen3-VL's *interleaved* frequency layout (`InterleavedMRoPE`):
  megatron's `MultimodalRotaryEmbedding` assigns contiguous frequency blocks (Qwen2-VL's layout).
- Deepstack: the vision tower's intermediate features are added to the hidden states of the image
  positions after the first `len(deepstack_visual_indexes)` decoder layers (forward hooks on those
  layers; they must sit on the first pipeline stage, next to the tower — checked at build).
Samples without images run the language model alone (no vision pass).
Tests: `python -m pytest tests/unit/test_vlm.py tests/distributed/test_vlm_parallel.py -q`
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
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


def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, hf_config: Any) -> torch.Tensor:
    """`[3, T]` M-RoPE positions of one sample's token ids `[T]` (images only; its grids `[n_img, 3]`).

    Text runs count up on all three axes; an image's `t·h·w / merge²` pad tokens get (t0, row, col) offset
    by the position where the image starts; the next text resumes at that start + max(h, w) / merge.
    ValueError when the image pad tokens and the grids disagree.
    """
    image_token, merge = hf_config.image_token_id, hf_config.vision_config.spatial_merge_size
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


class Qwen3VLModel(GPTModel):
    """`GPTModel` with Qwen3-VL's vision tower (first stage), interleaved M-RoPE and deepstack (see module doc).

    `hf_config`: the HF `Qwen3VLConfig` / `Qwen3VLMoeConfig`; the other arguments are GPTModel's (built by
    `models.build_gpt_model` from the text config). `position_ids` passed to `forward` are `[3, B, T]`.
    """

    def __init__(self, hf_config: Any, **gpt_kwargs: Any) -> None:
        gpt_kwargs.update(position_embedding_type="mrope", scatter_embedding_sequence_parallel=False)
        super().__init__(**gpt_kwargs)
        rope = hf_config.text_config.rope_parameters
        self.rotary_pos_emb = InterleavedMRoPE(
            self.config.kv_channels, float(rope["rope_theta"]), self.mrope_section
        )
        self.image_token_id = hf_config.image_token_id
        self.deepstack_layers = len(hf_config.vision_config.deepstack_visual_indexes)
        self._deepstack: list[torch.Tensor] | None = None
        local = {layer.layer_number - 1: layer for layer in self.decoder.layers}
        wanted = set(range(self.deepstack_layers))
        if self.pre_process and self.config.recompute_granularity == "full":
            # a recomputed layer runs again in backward, after `forward` has dropped its deepstack features
            raise ValueError(
                f"{hf_config.model_type}: full activation recompute is not supported with deepstack"
            )
        if self.pre_process:
            missing = sorted(wanted - set(local))
            if missing:
                raise ValueError(
                    f"{hf_config.model_type}: deepstack adds vision features after decoder layers "
                    f"{sorted(wanted)}, which must be on the first pipeline stage with the vision tower; "
                    f"this stage holds layers {sorted(local)} (missing {missing}): use more layers per stage "
                    "or num_layers_in_first_pipeline_stage"
                )
            self.vision = _vision_tower(hf_config)
            for index in sorted(wanted):
                local[index].register_forward_hook(self._deepstack_hook(index))
        elif wanted & set(local):
            raise ValueError(
                f"{hf_config.model_type}: decoder layers {sorted(wanted & set(local))} take deepstack features "
                "but are not on the first pipeline stage (the vision tower's stage)"
            )

    def _deepstack_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._deepstack is None:
                return output
            hidden, *rest = output
            return (hidden + self._deepstack[index], *rest)

        return hook

    def _merge_vision(
        self,
        input_ids: torch.Tensor,
        embeddings: torch.Tensor,
        pixel_values: torch.Tensor,
        grid: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image features into the `[T, B, H]` embeddings at the image-pad positions; dense deepstack
        tensors `[T, B, H]` (zero off the image positions)."""
        vision_dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values.to(vision_dtype), grid_thw=grid, return_dict=True)
        features = out.pooler_output.to(embeddings.dtype)
        mask = (input_ids == self.image_token_id)[..., None]  # [B, T, 1]
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(
                f"{int(mask.sum())} image tokens in the batch but the images give {features.shape[0]} "
                f"features (grids {grid.tolist()})"
            )
        # masked_scatter fills in row-major order: do it batch-first, as the processor laid the images out
        merged = embeddings.transpose(0, 1).masked_scatter(mask, features).transpose(0, 1)
        deepstack = [
            torch.zeros_like(embeddings)
            .transpose(0, 1)
            .masked_scatter(mask, f.to(embeddings.dtype))
            .transpose(0, 1)
            for f in out.deepstack_features[: self.deepstack_layers]
        ]
        return merged, deepstack

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """GPTModel.forward with images: `pixel_values [N_patches, C·t·p·p]` and `image_grid_thw
        [n_img, 3]` of every image in the batch, in batch-then-position order (the processor's)."""
        deepstack = None
        if self.pre_process and decoder_input is None:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)
            if pixel_values is not None and pixel_values.numel():
                decoder_input, deepstack = self._merge_vision(
                    input_ids, decoder_input, pixel_values, image_grid_thw
                )
            elif torch.is_grad_enabled():
                # Text-only batch: touch the tower with a zero so every parameter gets a (zero) gradient;
                # megatron's overlapped DDP waits for each parameter of a bucket to be reduced.
                decoder_input = decoder_input + 0.0 * sum(p.sum() for p in self.vision.parameters())
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
                if deepstack is not None:
                    deepstack = [tensor_parallel.scatter_to_sequence_parallel_region(d) for d in deepstack]
        self._deepstack = deepstack
        try:
            return super().forward(
                input_ids, position_ids, attention_mask, decoder_input=decoder_input, **kwargs
            )
        finally:
            self._deepstack = None


def _vision_tower(hf_config: Any) -> nn.Module:
    from transformers import AutoModel

    # sdpa as transformers' default; under fp32 it matches eager to ~1e-7
    return AutoModel.from_config(hf_config.vision_config, attn_implementation="sdpa", dtype=torch.float32)

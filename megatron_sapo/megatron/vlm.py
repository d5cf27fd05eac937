"""Qwen3-VL and Qwen3-VL-MoE policies on megatron-core: a `GPTModel` language model plus a vision tower.

    from megatron_sapo.megatron.models import build_gpt_model       # dispatches VL configs here
    model = build_gpt_model(hf_config)                                # Qwen3VLModel on VL architectures
    positions = mrope.rope_index(input_ids, image_grid_thw, *model.mrope_tokens)  # [3, T], per sample
    logits = model(input_ids, position_ids, mask, pixel_values=pv, image_grid_thw=grid)  # [B, T, V/tp]

`Qwen3VLModel` is a `GPTModel` (so every parameter of the language model keeps its megatron name and the
engine, bridge, checkpoints and routing replay treat it like a text policy) with three additions:
- `vision`: transformers' own `Qwen3VLVisionModel` (patch embedding, blocks, merger, deepstack mergers),
  on the first pipeline stage only, **replicated over TP** (its parameters keep their HF names under
  `vision.`). Why not megatron modules: megatron-core 0.16.1 has no Qwen vision tower, and the tower is
  small next to the language model, so sharding it would save little and add a second implementation to
  keep equal to the reference. Cost per first-stage rank (counted from transformers' configs: 27 blocks of
  width 1152, merger + 3 deepstack mergers): Qwen3-VL-30B-A3B's tower has 0.539 B parameters, 1.08 GB of
  bf16 weights + 2.15 GB of fp32 main grads (Adam states sharded over DP by the distributed optimizer);
  Qwen3-VL-235B-A22B's 0.576 B (1.15 + 2.31 GB; only the merger outputs are wider). Next to 30B-A3B's
  ~61 GB of bf16 weights (spread over TP×PP×EP) this is small, but it all sits on stage 0: give that stage
  a decoder layer or two fewer (`num_layers_in_first_pipeline_stage`) at PP > 1 (docs/vlm.md).
- M-RoPE positions `[3, B, T]` (temporal, height, width; built by `rope_index` as transformers'
  `get_rope_index` does) applied with Qwen3-VL's *interleaved* frequency layout (`InterleavedMRoPE`):
  megatron's `MultimodalRotaryEmbedding` assigns contiguous frequency blocks (Qwen2-VL's layout).
- Deepstack: the vision tower's intermediate features are added to the hidden states of the image
  positions after the first `len(deepstack_visual_indexes)` decoder layers (forward hooks on those
  layers; they must sit on the first pipeline stage, next to the tower — checked at build).
Samples without images run the language model alone (no vision pass).
Tests: `python -m pytest tests/unit/test_vlm.py tests/distributed/test_vlm_parallel.py tests/distributed/test_vlm_engine.py -q`
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from torch import nn

from megatron_sapo.megatron.mrope import InterleavedMRoPE


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
        # what `mrope.rope_index` needs to place a sample's tokens (the engine's collate reads it)
        self.mrope_tokens = (hf_config.image_token_id, hf_config.vision_config.spatial_merge_size)
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
            # where and as what megatron made the language model's parameters (GPU: on the device, bf16)
            anchor = self.embedding.word_embeddings.weight
            self.vision = _vision_tower(hf_config).to(device=anchor.device, dtype=self.config.params_dtype)
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
        mask = (input_ids == self.mrope_tokens[0])[..., None]  # image pads, [B, T, 1]
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(
                f"{int(mask.sum())} image tokens in the batch but the images give {features.shape[0]} "
                f"features (grids {grid.tolist()})"
            )
        # masked_scatter fills in row-major order: do it batch-first, as the processor laid the images out
        # (contiguous again after: pipeline p2p sends need it, and a deepstack sum inherits the strides)
        merged = embeddings.transpose(0, 1).masked_scatter(mask, features).transpose(0, 1).contiguous()
        deepstack = [
            torch.zeros_like(merged)
            .transpose(0, 1)
            .masked_scatter(mask, f.to(merged.dtype))
            .transpose(0, 1)
            .contiguous()
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

"""An in-process transformers rollout engine with the SGLang engine's interface (`RolloutEngine`).

For fast unit tests and for machines without SGLang; not the default where SGLang is available. It runs
the Hugging Face model in this process (on the model's device) with its own batched decode loop: left
padding, a KV cache, fp32 log-probs. What it reports follows SGLang 0.5.23 so the two are interchangeable:

- `logprobs[i]` = log_softmax(logits / temperature)[token_i] in fp32 (raw logits when greedy), of the full
  distribution: top-p / top-k only restrict which token is drawn (sglang/srt/layers/sampler.py).
- `token_ids` run through the stop condition, inclusive, like SGLang's `output_ids`: an EOS or stop token
  is the last token (with its log-prob); a stop string ends the sample at the token that completed it.
- `text` is trimmed like SGLang's detokenizer: a matched stop token is dropped, a stop string and
  everything after it are cut, special tokens are skipped.
- Finish precedence per token: stop string, then EOS / stop token ("stop"), then max_new_tokens ("length").
  EOS ids are the union of the model config's, the generation config's and the tokenizer's.
- A text prompt is encoded with the tokenizer's defaults (no chat template), as SGLang does.
- Each sample draws from its own generator, seeded from (request seed or one drawn from the engine seed,
  prompt index, sample index): samples do not depend on batching, and the n samples of a prompt differ.
- `interrupt()` (from another thread) ends the `generate` call in flight before its next decoding step:
  unfinished samples return what they have, finish_reason "abort" (partial rollouts, `train/pipeline.py`);
  `max_new_tokens=[...]` gives each prompt its own budget.
- Next-token log-probs with a NaN (NaN / +inf logits: a diverged policy) raise `PolicyDiverged` naming
  the prompt, sample and token, instead of whatever torch.multinomial would make of them.

Weights are updated in place under Hugging Face checkpoint names (per-expert names for MoE), mapped onto
transformers 5's fused in-memory parameters through transformers' own save-time conversion
(`revert_weight_conversion`), so every architecture transformers can save is covered without a table.

    engine = TransformersEngine("/path/to/hf_dir")
    gens = engine.generate(["2 + 2 ="], SamplingParams(max_new_tokens=8, temperature=1.0), n=4)
    engine.update_weights_from_tensors(named_tensors, version="1")
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
)
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from megatron_sapo.bridge.safetensors_io import SafetensorsReader
from megatron_sapo.data.vision import ImagePrompt
from megatron_sapo.rollout.types import (
    Generation,
    PolicyDiverged,
    Prompt,
    RolloutError,
    SamplingParams,
    prompt_budgets,
)

logger = logging.getLogger(__name__)

_ROUTER_NAME = re.compile(r"layers\.(\d+)\.mlp\.gate$")


@dataclass(frozen=True)
class _Slot:
    """Where one checkpoint tensor lives in memory: a strided view of a parameter or buffer."""

    target: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass
class _Sample:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    generator: torch.Generator
    token_ids: list[int]
    logprobs: list[float]
    max_new_tokens: int
    finish_reason: str | None = None
    matched: str | int | None = None
    image: ImagePrompt | None = None


class TransformersEngine:
    """A `RolloutEngine` over an in-process transformers causal LM.

    The engine owns the model: it is cast to `dtype` (a path is loaded in it) and weight updates modify it
    in place; it runs on the model's device. Its version starts at `weight_version`.
    Without a tokenizer, prompts must be token ids, stop strings are refused and `text` is None.
    """

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel,
        *,
        tokenizer=None,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        max_batch_size: int = 32,
        weight_version: str = "0",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
            vision = hasattr(AutoConfig.from_pretrained(path), "vision_config")
            auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
            model = auto.from_pretrained(path, dtype=dtype)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        self.model = model.to(dtype).eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._version = str(weight_version)
        self._slots: dict[str, _Slot] | None = None
        self._aliases: dict[str, str] = {}
        self._expert_parts: dict[str, list[str]] = {}
        self._interrupted = threading.Event()

    @property
    def weight_version(self) -> str:
        return self._version

    def shutdown(self) -> None:
        """Nothing to release: the model lives in this process."""

    def release_memory(self) -> None:
        """Nothing to lend: an in-process CPU model that training never shares a device with."""

    def resume_memory(self) -> None:
        """Nothing was lent (see `release_memory`)."""

    def interrupt(self) -> None:
        """The `generate` call in flight (another thread's) stops before its next decoding step; its
        unfinished samples return what they have, finish_reason "abort"."""
        self._interrupted.set()

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams,
        *,
        n: int = 1,
        return_routed_experts: bool = False,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """n samples per prompt, ordered by (prompt_index, sample_index); see the module docstring.
        `max_new_tokens`: one budget per prompt instead of `sampling.max_new_tokens`."""
        self._interrupted.clear()
        if n < 1:
            raise RolloutError(f"TransformersEngine: n must be >= 1, got {n}")
        budgets = prompt_budgets(len(prompts), sampling, max_new_tokens)
        if sampling.stop and self.tokenizer is None:
            raise RolloutError("TransformersEngine: stop strings need a tokenizer")
        prompt_ids = [self._tokenize(p, i) for i, p in enumerate(prompts)]
        # One seed per request; each sample draws from its own generator so a sample does not depend on
        # how the request is batched.
        if sampling.seed is None:
            base = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        else:
            base = sampling.seed
        images = [p if isinstance(p, ImagePrompt) else None for p in prompts]
        if any(images) and not hasattr(self.model.config, "vision_config"):
            raise RolloutError(
                f"TransformersEngine: image prompts for {type(self.model).__name__}, a text model"
            )
        samples = [
            _Sample(
                i,
                j,
                ids,
                torch.Generator().manual_seed(_mix(base, i, j)),
                [],
                [],
                budgets[i],
                image=images[i],
            )
            for i, ids in enumerate(prompt_ids)
            for j in range(n)
        ]
        routers = self._routers() if return_routed_experts else None
        out: list[Generation] = []
        for start in range(0, len(samples), self.max_batch_size):
            chunk = samples[start : start + self.max_batch_size]
            routing = self._decode(chunk, sampling, routers)
            out += [self._finish(s, sampling, r) for s, r in zip(chunk, routing)]
        return out

    def _tokenize(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, ImagePrompt):
            ids = list(prompt.input_ids)
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise RolloutError(
                    f"TransformersEngine: prompt {index} is a string but there is no tokenizer"
                )
            # The tokenizer's defaults (special tokens included), as SGLang encodes a text prompt.
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise RolloutError(f"TransformersEngine: prompt {index} is empty")
        return ids

    def _stop_ids(self, sampling: SamplingParams) -> set[int]:
        ids = set(sampling.stop_token_ids)
        for source in (self.model.config, self.model.generation_config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        return ids

    def _decode(
        self, chunk: list[_Sample], sampling: SamplingParams, routers: list[torch.nn.Module] | None
    ) -> list[list[np.ndarray] | None]:
        """Fill `token_ids`, `logprobs`, `finish_reason` of each sample; return per-sample routing steps."""
        device = self.model.device
        batch, length = len(chunk), max(len(s.prompt_ids) for s in chunk)
        input_ids = torch.zeros(batch, length, dtype=torch.long, device=device)
        mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        for row, s in enumerate(chunk):
            input_ids[row, length - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[row, length - len(s.prompt_ids) :] = 1
        # Positions count real tokens only, so a left-padded row sees the positions of an unpadded one.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        vision, deltas = self._vision_inputs(chunk, input_ids, mask)
        stop_ids = self._stop_ids(sampling)
        captured: list[torch.Tensor] = []
        hooks = [
            r.register_forward_hook(lambda _m, _i, o: captured.append(_router_indices(o)))
            for r in routers or []
        ]
        routing: list[list[np.ndarray]] = [[] for _ in chunk]
        try:
            cache = DynamicCache(config=self.model.config)
            for step in range(max(s.max_new_tokens for s in chunk)):
                if self._interrupted.is_set():
                    for s in chunk:
                        s.finish_reason = s.finish_reason or "abort"
                    break
                if deltas is not None:  # M-RoPE: [text positions; t, h, w] as transformers' generate
                    rope = vision.pop("position_ids", None)
                    rope = rope if rope is not None else (positions + deltas)[None].expand(3, -1, -1)
                    step_positions = torch.cat([positions[None], rope])
                else:
                    step_positions = positions
                logits = self.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=step_positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **vision,
                ).logits[:, -1]
                vision = {}  # the images are in the cache after the prefill
                if routers:
                    self._collect_routing(captured, routing, mask, step == 0, length)
                logits = logits.float()
                logp = _logprobs(logits, sampling)
                self._check_finite(logp, chunk)
                tokens, logprobs = _sample(logits, logp, sampling, [s.generator for s in chunk])
                for row, s in enumerate(chunk):
                    if s.finish_reason is None:
                        s.token_ids.append(int(tokens[row]))
                        s.logprobs.append(float(logprobs[row]))
                        self._check_finished(s, sampling, stop_ids)
                if all(s.finish_reason is not None for s in chunk):
                    break
                input_ids = tokens[:, None].to(device)
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                positions = positions[:, -1:] + 1
        finally:
            for h in hooks:
                h.remove()
        return routing if routers else [None] * len(chunk)

    def _vision_inputs(
        self, chunk: list[_Sample], input_ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[dict, torch.Tensor | None]:
        """The prefill's image inputs and M-RoPE positions of a vision-language model ({} and None for a
        text model): every row's pixels in row order, its grids, the image-token types, and per row the
        offset `deltas` [B, 1] of the M-RoPE position from the text position (transformers' own
        `get_rope_index`, which skips the left padding)."""
        if not hasattr(self.model.config, "vision_config"):
            return {}, None
        rows = [s.image for s in chunk if s.image is not None and s.image.pixel_values is not None]
        image_token = self.model.config.image_token_id
        types = (input_ids == image_token).int()
        grid = torch.cat([r.image_grid_thw for r in rows]).to(input_ids.device) if rows else None
        rope, deltas = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask
        )
        rope = rope.masked_fill(mask[None] == 0, 1)  # pads: any position (masked out), as transformers
        inputs: dict = {"position_ids": rope}
        if rows:
            inputs.update(
                pixel_values=torch.cat([r.pixel_values for r in rows]).to(
                    self.model.device, self.model.dtype
                ),
                image_grid_thw=grid,
                mm_token_type_ids=types,
            )
        return inputs, deltas.reshape(-1, 1).to(input_ids.device)

    def _check_finite(self, logp: torch.Tensor, chunk: list[_Sample]) -> None:
        """PolicyDiverged when a row of next-token log-probs [B, V] is NaN somewhere: a NaN or +inf logit,
        or none finite. There is no distribution to draw from (torch.multinomial would fail on it)."""
        bad = logp.isnan().any(dim=-1)
        if bad.any():
            s = chunk[int(bad.nonzero()[0])]
            raise PolicyDiverged(
                f"TransformersEngine: non-finite next-token probabilities (weight version {self._version}, "
                f"prompt {s.prompt_index}, sample {s.sample_index}, response token {len(s.token_ids)}; "
                f"{int(bad.sum())} of {len(chunk)} samples in the batch)"
            )

    @staticmethod
    def _collect_routing(
        captured: list[torch.Tensor],
        routing: list[list[np.ndarray]],
        mask: torch.Tensor,
        prefill: bool,
        length: int,
    ) -> None:
        """Append this forward's routing ([T, layers, top_k] int32, real tokens only) to each row's list."""
        batch = mask.shape[0]
        steps = length if prefill else 1
        per_layer = torch.stack([c.reshape(batch, steps, -1) for c in captured], dim=2)  # [B, T, layers, k]
        captured.clear()
        for row in range(batch):
            keep = mask[row, -steps:].bool() if prefill else slice(None)
            routing[row].append(per_layer[row, keep].to(torch.int32).cpu().numpy())

    def _check_finished(self, s: _Sample, sampling: SamplingParams, stop_ids: set[int]) -> None:
        if sampling.stop:
            # SGLang matches stop strings in the raw decode (special tokens kept).
            tail = self.tokenizer.decode(s.token_ids)
            matched = next((stop for stop in sampling.stop if stop in tail), None)
            if matched is not None:
                s.finish_reason, s.matched = "stop", matched
                return
        if s.token_ids[-1] in stop_ids:
            s.finish_reason, s.matched = "stop", s.token_ids[-1]
        elif len(s.token_ids) >= s.max_new_tokens:
            s.finish_reason = "length"

    def _finish(self, s: _Sample, sampling: SamplingParams, routing: list[np.ndarray] | None) -> Generation:
        text = None
        if self.tokenizer is not None:
            ids = s.token_ids[:-1] if isinstance(s.matched, int) else s.token_ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if isinstance(s.matched, str) and s.matched in text:
                text = text[: text.index(s.matched)]
        routed = None
        if routing is not None:
            # The last sampled token was never fed back: [prompt + response - 1, layers, top_k].
            routed = np.concatenate(routing)[: len(s.prompt_ids) + len(s.token_ids) - 1]
        return Generation(
            prompt_index=s.prompt_index,
            sample_index=s.sample_index,
            prompt_ids=list(s.prompt_ids),
            token_ids=s.token_ids,
            logprobs=s.logprobs,
            finish_reason=s.finish_reason or "length",
            weight_version=self._version,
            text=text,
            routed_experts=routed,
        )

    def _routers(self) -> list[torch.nn.Module]:
        """The MoE router (`layers.{l}.mlp.gate`) of each layer, in layer order."""
        found = [
            (int(m[1]), mod) for name, mod in self.model.named_modules() if (m := _ROUTER_NAME.search(name))
        ]
        if not found:
            raise RolloutError(
                f"TransformersEngine: {type(self.model).__name__} has no MoE router, so there is no routing "
                "to return (return_routed_experts=True)"
            )
        return [mod for _, mod in sorted(found, key=lambda x: x[0])]

    # ---------------------------------------------------------------- weights

    @torch.no_grad()
    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: str
    ) -> None:
        """Copy full tensors, under checkpoint names, into the model; all validated before any is written.

        A partial set is fine (bucketed streaming). Tied embeddings: `lm_head.weight` of a tied model is
        accepted only when the same call carries an identical `model.embed_tokens.weight` (a checkpoint
        that stores both copies); alone or different it is refused, since it would silently rewrite the
        input embedding too. Dtypes must match the model's (no silent casts).
        """
        self._load(list(named_tensors), version=version, complete=False)

    def update_weights_from_disk(self, model_dir: str | os.PathLike, *, version: str) -> None:
        """Reload every weight from a Hugging Face dir (as `bridge.safetensors_io.SafetensorsReader` reads it)."""
        try:
            reader = SafetensorsReader(model_dir)
        except FileNotFoundError:
            raise RolloutError(
                f"TransformersEngine: no model.safetensors(.index.json) in {model_dir}"
            ) from None
        with reader:
            tensors = [(name, reader.read(name, ())) for name in reader.names()]
        slots = self._checkpoint_slots()
        for i, (name, tensor) in enumerate(tensors):
            slot = slots.get(name)
            # official Qwen3-VL-MoE files hold the fused experts with dims 1 and 2 swapped against what
            # transformers saves ([E, H, 2I] / [E, I, H]; bridge/fused_experts.py); a square one is read
            # as official (what our converters and exports write)
            swapped = (tensor.shape[0], tensor.shape[2], tensor.shape[1]) if tensor.dim() == 3 else None
            if name in self._expert_parts and slot is not None and swapped == slot.shape:
                tensors[i] = (name, tensor.transpose(1, 2))
        self._load(tensors, version=version, complete=True)

    def _load(self, tensors: list[tuple[str, torch.Tensor]], *, version: str, complete: bool) -> None:
        slots = self._checkpoint_slots()
        by_name: dict[str, torch.Tensor] = {}
        for name, tensor in tensors:
            if name in by_name:
                raise RolloutError(f"TransformersEngine: tensor {name!r} appears twice in one update")
            by_name[name] = tensor
        for name, tensor in by_name.items():
            slot = slots.get(self._aliases.get(name, name))
            if slot is None:
                raise RolloutError(
                    f"TransformersEngine: unknown checkpoint tensor {name!r} for {type(self.model).__name__}"
                )
            target = self.model.get_parameter_or_buffer(slot.target)
            if tuple(tensor.shape) != slot.shape:
                raise RolloutError(
                    f"TransformersEngine: tensor {name!r} has shape {tuple(tensor.shape)}, expected {slot.shape}"
                )
            if tensor.dtype != target.dtype:
                raise RolloutError(
                    f"TransformersEngine: tensor {name!r} has dtype {tensor.dtype}, expected {target.dtype}"
                )
        for alias, canonical in self._aliases.items():
            if alias in by_name and not (
                canonical in by_name and torch.equal(by_name[alias], by_name[canonical])
            ):
                raise RolloutError(
                    f"TransformersEngine: {alias!r} is tied to {canonical!r}; send {canonical!r} only "
                    "(or both, identical)"
                )
        given = by_name.keys() | {
            fused for fused, parts in self._expert_parts.items() if all(p in by_name for p in parts)
        }
        primary = slots.keys() - {p for parts in self._expert_parts.values() for p in parts}
        if complete and (missing := sorted(primary - given)):
            raise RolloutError(
                f"TransformersEngine: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}"
            )
        for name, tensor in by_name.items():
            if name in self._aliases:
                continue
            slot = slots[name]
            target = self.model.get_parameter_or_buffer(slot.target).data
            view = target.as_strided(slot.shape, slot.stride, target.storage_offset() + slot.offset)
            view.copy_(tensor.to(target.device))
        self._version = str(version)
        logger.info("TransformersEngine: loaded %d tensors, weight version %s", len(by_name), self._version)

    def _checkpoint_slots(self) -> dict[str, _Slot]:
        """Checkpoint name -> strided view of an in-memory tensor, learnt once from transformers' save path.

        `revert_weight_conversion` (what `save_pretrained` runs) copies, so it is run on a probe state dict
        whose values are global element indices; each reverted tensor then says which elements it holds.
        """
        if self._slots is not None:
            return self._slots
        state = self.model.state_dict()
        kept = remove_tied_weights_from_state_dict(dict(state), self.model)
        by_storage = {t.untyped_storage().data_ptr(): name for name, t in kept.items()}
        self._aliases = {
            name: by_storage[state[name].untyped_storage().data_ptr()] for name in state.keys() - kept.keys()
        }
        total = sum(t.numel() for t in kept.values())
        index_dtype = torch.int32 if total < 2**31 else torch.int64
        starts, names, probe, offset = [], [], {}, 0
        for name, tensor in kept.items():
            if not tensor.is_contiguous():
                raise RolloutError(f"TransformersEngine: in-memory tensor {name!r} is not contiguous")
            starts.append(offset)
            names.append(name)
            probe[name] = torch.arange(offset, offset + tensor.numel(), dtype=index_dtype).view(tensor.shape)
            offset += tensor.numel()
        slots = {}
        for ck_name, index in revert_weight_conversion(self.model, dict(probe)).items():
            owner = bisect.bisect_right(starts, int(index.min())) - 1
            begin, target = starts[owner], names[owner]
            unit = [tuple(int(d == k) for d in range(index.dim())) for k in range(index.dim())]
            stride = tuple(
                int(index[u] - index[(0,) * index.dim()]) if index.shape[k] > 1 else 1
                for k, u in enumerate(unit)
            )
            first = int(index.reshape(-1)[0]) - begin
            try:
                ok = torch.equal(probe[target].reshape(-1).as_strided(index.shape, stride, first), index)
            except RuntimeError:
                ok = False
            if not ok:
                raise RolloutError(
                    f"TransformersEngine: checkpoint tensor {ck_name!r} is not a view of {target!r}"
                )
            slots[ck_name] = _Slot(target, tuple(index.shape), stride, first)
        self._expert_parts = self._per_expert_slots(slots)
        self._slots = slots
        return slots

    def _per_expert_slots(self, slots: dict[str, _Slot]) -> dict[str, list[str]]:
        """Add per-expert slots (`...experts.{e}.gate_proj.weight` [I, H], up, down [H, I]: the names the
        bridge exports and SGLang takes) as views into fused expert tensors (transformers' in-memory
        `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`, or the official Qwen3-VL-MoE checkpoint
        orientation `[E, H, 2I]` / `[E, I, H]`); returns each fused name's per-expert names."""
        text = self.model.config.get_text_config()
        inter = getattr(text, "moe_intermediate_size", None)
        parts: dict[str, list[str]] = {}
        for name, slot in list(slots.items()):
            kind = next((k for k in ("gate_up_proj", "down_proj") if name.endswith(f".experts.{k}")), None)
            if kind is None or inter is None:
                continue
            prefix = name.removesuffix(f".{kind}")
            n_experts, a, b = slot.shape
            s0, s1, s2 = slot.stride
            # rows-first (in memory): gate_up [E, 2I, H], down [E, H, I]; else dims 1 and 2 swapped
            rows = a == 2 * inter if kind == "gate_up_proj" else b == inter
            if kind == "gate_up_proj" and 2 * inter == (b if rows else a) == (a if rows else b):
                raise RolloutError(f"TransformersEngine: cannot tell the orientation of {name} {slot.shape}")
            # the per-expert matrix: rows along dim 1 (in memory) or dim 2 (transposed)
            stride, (height, width) = ((s1, s2), (a, b)) if rows else ((s2, s1), (b, a))
            row_step = stride[0]
            projections = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
            height //= len(projections)
            parts[name] = []
            for e in range(n_experts):
                for j, proj in enumerate(projections):
                    expert = f"{prefix}.{e}.{proj}.weight"
                    offset = slot.offset + e * s0 + j * height * row_step
                    slots[expert] = _Slot(slot.target, (height, width), stride, offset)
                    parts[name].append(expert)
        return parts


def _router_indices(output) -> torch.Tensor:
    """transformers 5 top-k routers return (logits, weights, indices [tokens, top_k])."""
    if not (isinstance(output, tuple) and not output[-1].is_floating_point()):
        raise RolloutError("TransformersEngine: this model's router does not return top-k expert indices")
    return output[-1]


def _mix(base: int, prompt_index: int, sample_index: int) -> int:
    """A per-sample seed from the request seed (a fixed odd-multiplier hash, stable across runs)."""
    return (
        base * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB
    ) % 2**63


def _logprobs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """log_softmax(logits / temperature) [B, V] of fp32 logits [B, V] (of the raw logits when greedy)."""
    return torch.log_softmax(logits if sampling.temperature == 0 else logits / sampling.temperature, dim=-1)


def _sample(
    logits: torch.Tensor, logp: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probs [B] from fp32 logits [B, V] and their `_logprobs` [B, V]
    (SGLang's sampler semantics)."""
    if sampling.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    probs = logp.exp()
    if sampling.top_k > 0 or sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
        if sampling.top_k > 0:
            drop[:, sampling.top_k :] = True
        if sampling.top_p < 1:
            # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
            drop |= (sorted_probs.cumsum(-1) - sorted_probs) > sampling.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    tokens = torch.stack([torch.multinomial(p.cpu(), 1, generator=g)[0] for p, g in zip(probs, generators)])
    tokens = tokens.to(logits.device)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)

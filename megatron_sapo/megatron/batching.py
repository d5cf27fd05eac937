"""Rollout samples → mini-batches → token-budgeted micro-batches → padded model inputs (no process groups).

A `Sample` is one sequence, prompt + response, with its advantage and (optionally) the behaviour
policy's log-probs of the response tokens. The policy engine (`megatron_sapo.megatron.engine`) uses:

    shares = data_parallel_shares(samples, mini_batches=4, dp_size=dp)  # [Share] by DP rank (scatter)
    local = shard_for_data_parallel(samples, mini_batches=4, dp_rank=r, dp_size=dp)  # equal-count shards
    groups = pack_micro_batches([s.seq_len for s in mb], token_budget=4096)      # [[indices], ...]
    batch = collate([mb[i] for i in groups[0]], old_logprobs=[...])              # padded [B, T] tensors

Layout: for tokens ``x`` of length ``L`` the model reads ``x[:-1]`` and predicts ``x[1:]``; response
token ``x[t]`` (``t ≥ response_start``) is predicted at position ``t − 1``. Right padding is exact under
a causal mask (no real position attends to a later one). Tests: ``python -m pytest tests/unit/test_batching.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MicroBatch",
    "Sample",
    "Share",
    "assign_data_parallel",
    "collate",
    "data_parallel_shares",
    "pack_micro_batches",
    "shard_for_data_parallel",
    "split_mini_batches",
]


@dataclass
class Sample:
    """One rollout sequence."""

    tokens: torch.Tensor
    """`[L]` integer token ids, prompt followed by response."""
    response_start: int
    """Index in `tokens` of the first response token (1 ≤ response_start < L)."""
    advantage: float
    """Scalar advantage Â shared by every response token."""
    old_logprobs: torch.Tensor | None = None
    """`[L − response_start]` log π_old of the response tokens (fp32), if already known."""
    engine_logprobs: torch.Tensor | None = None
    """`[L − response_start]` log μ of the response tokens as the rollout engine reported them (fp32); read
    by the rollout correction (`LossConfig.rollout_correction`) only."""
    loss_mask: torch.Tensor | None = None
    """`[L − response_start]` bool, False on response tokens that must not count (e.g. tool output)."""
    routing: torch.Tensor | None = None
    """`[L_moe, L − 1 or L, k]` expert ids the rollout engine's MoE layers chose (R3 routing replay only).

    Row `p` is the routing of input token `tokens[p]` at position `p` (the one predicting `tokens[p+1]`),
    for every MoE layer of the model in order, top-k ids in any order. The trainer reads positions
    0..L−2 (`tokens[:-1]`); the last sampled token is never fed to a model, so rollout engines report
    L − 1 rows; a row L−1, if given, is ignored."""
    pixel_values: torch.Tensor | None = None
    """`[N_patches, C·t·p·p]` the prompt's images as the policy's processor flattened them (VL policies)."""
    image_grid_thw: torch.Tensor | None = None
    """`[n_images, 3]` each image's (t, h, w) patch grid, in prompt order; with `pixel_values`."""
    prompt_key: Any = None
    """The caller's key of the prompt, carried through `PolicyEngine.scatter` untouched. The RL loop keys a
    sample by its training record, and each rank renders its own share's images after the scatter, so
    pixels (~100x the bytes of the image files) never fan out from rank 0."""

    def __post_init__(self) -> None:
        n = self.tokens.numel()
        if self.tokens.dim() != 1 or not 1 <= self.response_start < n:
            raise ValueError(
                f"need tokens [L] and 1 <= response_start < L; got {self.tokens.shape}, "
                f"response_start={self.response_start}"
            )
        for name in ("old_logprobs", "engine_logprobs", "loss_mask"):
            value = getattr(self, name)
            if value is not None and value.shape != (self.num_response_tokens,):
                raise ValueError(f"{name} must be [{self.num_response_tokens}], got {tuple(value.shape)}")
        if self.routing is not None and (self.routing.dim() != 3 or self.routing.shape[1] not in (n - 1, n)):
            raise ValueError(
                f"routing must be [L_moe, {n - 1} or {n}, topk] for {n} tokens, got {tuple(self.routing.shape)}"
            )
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw come together (both or neither)")
        if self.image_grid_thw is not None:
            grid = self.image_grid_thw
            patches = int(grid.prod(-1).sum()) if grid.dim() == 2 and grid.shape[-1] == 3 else -1
            if patches != self.pixel_values.shape[0]:
                raise ValueError(
                    f"image_grid_thw {tuple(grid.shape)} (t·h·w summing to {patches}) does not match "
                    f"pixel_values {tuple(self.pixel_values.shape)}: one row per patch"
                )

    @property
    def seq_len(self) -> int:
        """Positions the model reads (L − 1)."""
        return self.tokens.numel() - 1

    @property
    def num_response_tokens(self) -> int:
        return self.tokens.numel() - self.response_start

    def response_mask(self) -> torch.Tensor:
        """`[L − response_start]` bool: the response tokens that enter the loss."""
        if self.loss_mask is None:
            return torch.ones(self.num_response_tokens, dtype=torch.bool)
        return self.loss_mask.bool()


def split_mini_batches(samples: list, mini_batches: int) -> list[list]:
    """Contiguous, near-equal mini-batches (sizes differ by at most one); needs ≥ 1 sample each."""
    if mini_batches < 1 or len(samples) < mini_batches:
        raise ValueError(f"cannot split {len(samples)} samples into {mini_batches} mini-batches")
    q, r = divmod(len(samples), mini_batches)
    out, start = [], 0
    for k in range(mini_batches):
        end = start + q + (k < r)
        out.append(samples[start:end])
        start = end
    return out


def shard_for_data_parallel(samples: list, *, mini_batches: int, dp_rank: int, dp_size: int) -> list:
    """This DP rank's samples, ordered so that its k-th local mini-batch is its share of global mini-batch k.

    Global mini-batch k is `split_mini_batches(samples, mini_batches)[k]`; rank r takes the r-th
    contiguous slice of it. Requires `len(samples)` divisible by `mini_batches · dp_size` (so every rank
    holds the same number of samples per mini-batch and the local split reproduces the shares).
    """
    if len(samples) % (mini_batches * dp_size):
        raise ValueError(
            f"{len(samples)} samples do not divide into {mini_batches} mini-batches x {dp_size} ranks"
        )
    per_rank = len(samples) // (mini_batches * dp_size)
    local = []
    for mb in split_mini_batches(samples, mini_batches):
        local.extend(mb[dp_rank * per_rank : (dp_rank + 1) * per_rank])
    return local


def assign_data_parallel(seq_lens: list[int], *, mini_batches: int, dp_size: int) -> list[list[list[int]]]:
    """Token-balanced data-parallel split: `out[r][k]` = global indices (ascending) rank r takes of
    global mini-batch k. A pure function of the lengths (every caller computes the same split).

    Global mini-batch k is `split_mini_batches(range(n), mini_batches)[k]`, as at DP1, so the optimizer
    steps are the DP1 ones. Its samples go longest first onto the rank with the fewest tokens (`seq_lens`)
    in this mini-batch so far; ties go to the rank with the fewest tokens in the whole step, then the lower
    rank. Bound (greedy LPT): in every mini-batch, every rank's tokens ≤ mean + longest, with mean = the
    mini-batch's tokens / dp_size and longest = its longest sample (the rank's last sample arrived when
    that rank held ≤ mean); over the step, ≤ total / dp_size + Σ_k longest_k. A rank may get no sample
    of a mini-batch (fewer samples than ranks): the engine then runs a masked filler.
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    out: list[list[list[int]]] = [[] for _ in range(dp_size)]
    step_load = [0] * dp_size
    for mb in split_mini_batches(list(range(len(seq_lens))), mini_batches):
        load = [0] * dp_size
        taken: list[list[int]] = [[] for _ in range(dp_size)]
        for i in sorted(mb, key=lambda i: -seq_lens[i]):  # stable: equal lengths keep index order
            r = min(range(dp_size), key=lambda r: (load[r], step_load[r], r))
            taken[r].append(i)
            load[r] += seq_lens[i]
            step_load[r] += seq_lens[i]
        for r in range(dp_size):
            out[r].append(sorted(taken[r]))
    return out


@dataclass
class Share:
    """One data-parallel rank's part of a step's samples (what `PolicyEngine.scatter` hands each rank)."""

    samples: list[Sample]
    """This rank's samples: its part of global mini-batch 0, then of mini-batch 1, … (global order)."""
    indices: list[int]
    """`indices[j]` is the position of `samples[j]` in the step's global list."""
    mini_batch_sizes: list[int]
    """How many of `samples` belong to each global mini-batch (0 allowed: the rank runs a masked filler)."""
    num_samples: int
    """Samples in the whole step, all ranks together."""


def data_parallel_shares(samples: list[Sample], *, mini_batches: int, dp_size: int) -> list[Share]:
    """Every DP rank's `Share` of `samples` (index = DP rank), split by `assign_data_parallel`."""
    plan = assign_data_parallel([s.seq_len for s in samples], mini_batches=mini_batches, dp_size=dp_size)
    shares = []
    for per_mb in plan:
        indices = [i for mb in per_mb for i in mb]
        shares.append(
            Share(
                samples=[samples[i] for i in indices],
                indices=indices,
                mini_batch_sizes=[len(mb) for mb in per_mb],
                num_samples=len(samples),
            )
        )
    return shares


def pack_micro_batches(
    seq_lens: list[int], token_budget: int, *, min_count: int = 1, multiple_of: int = 1
) -> list[list[int]]:
    """Group sample indices into micro-batches whose padded size (count × longest) fits `token_budget`.

    Longest first, greedy; a sample longer than the budget gets a micro-batch of its own. The count is
    then raised to at least `min_count` and to a multiple of `multiple_of` (data-parallel ranks that
    share expert all-to-alls must run the same number; interleaved pipelines need a multiple of PP) by
    halving the micro-batch with most samples, or, when every micro-batch holds one sample, by
    appending empty ones (`[]`: the engine runs them on a masked filler sample).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i])  # stable: ties keep input order
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * seq_lens[groups[-1][0]] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    target = max(len(groups), min_count, 1)
    target = -(-target // multiple_of) * multiple_of
    while len(groups) < target:
        big = max(range(len(groups)), key=lambda g: len(groups[g])) if groups else None
        if big is None or len(groups[big]) < 2:
            groups.append([])
            continue
        half = len(groups[big]) // 2
        groups[big : big + 1] = [groups[big][:half], groups[big][half:]]
    return groups


@dataclass
class MicroBatch:
    """Padded model inputs and loss targets for `B` samples of at most `T` positions."""

    input_ids: torch.Tensor
    """`[B, T]` int64 token ids (right-padded)."""
    position_ids: torch.Tensor
    """`[B, T]` int64 positions 0..T−1."""
    labels: torch.Tensor
    """`[B, T]` int64 next-token ids."""
    loss_mask: torch.Tensor
    """`[B, T]` bool, True on response tokens that count."""
    old_logprobs: torch.Tensor
    """`[B, T]` fp32 log π_old on response positions (0 elsewhere)."""
    advantages: torch.Tensor
    """`[B]` fp32."""
    spans: list[tuple[int, int]]
    """Per sample, the `[start, end)` positions holding its response tokens' predictions."""
    routing: torch.Tensor | None = None
    """`[L_moe, T*B, k]` expert ids to replay (token `s*B + b`; see `engine_routing`), or None."""
    pixel_values: torch.Tensor | None = None
    """`[N_patches, C·t·p·p]` every image of the rows, row after row (the order the model fills them in)."""
    image_grid_thw: torch.Tensor | None = None
    """`[n_images, 3]` their patch grids, same order."""
    engine_logprobs: torch.Tensor | None = None
    """`[B, T]` fp32 log μ (the rollout engine's) on response positions, 0 elsewhere; None when no row has
    them."""

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()}
        return MicroBatch(**moved)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword inputs beyond (input_ids, position_ids, mask): the images, when the rows have any."""
        if self.pixel_values is None:
            return {}
        return {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}

    def response_values(self, per_position: torch.Tensor) -> list[torch.Tensor]:
        """Split a `[B, T]` per-position tensor into per-sample `[n_response]` tensors."""
        return [per_position[b, s:e] for b, (s, e) in enumerate(self.spans)]


def collate(
    samples: list[Sample],
    old_logprobs: list[torch.Tensor] | None = None,
    *,
    pad_token_id: int = 0,
    shape: tuple[int, int] | None = None,
    seq_multiple_of: int = 1,
    mrope: tuple[int, int] | None = None,
) -> MicroBatch:
    """Right-pad `samples` into one `MicroBatch`; `old_logprobs[i]` is `[n_response_i]` (None: zeros).

    `shape = (B, T)` pads to at least that many rows (fully masked) and positions, for schedules that
    need one tensor shape for every micro-batch. `seq_multiple_of` rounds T up (sequence parallelism
    splits T over the TP ranks, so T must divide by TP). `mrope = (image_token_id, spatial_merge_size)`
    (a Qwen3-VL policy's `mrope_tokens`): positions are M-RoPE's `[3, B, T]` (`mrope.rope_index` per
    row, counting on past the row's end), and the rows' images are concatenated in row order.
    """
    b, t = len(samples), max((s.seq_len for s in samples), default=1)
    if shape is not None:
        b, t = max(b, shape[0]), max(t, shape[1])
    t = -(-t // seq_multiple_of) * seq_multiple_of
    if b == 0:
        raise ValueError("collate needs at least one sample or a shape")
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    labels = torch.full((b, t), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros(b, t, dtype=torch.bool)
    old = torch.zeros(b, t, dtype=torch.float32)
    engine = None if all(s.engine_logprobs is None for s in samples) else torch.zeros(b, t)
    advantages = torch.zeros(b, dtype=torch.float32)
    spans = []
    for i, s in enumerate(samples):
        tokens = s.tokens.long()
        input_ids[i, : s.seq_len] = tokens[:-1]
        labels[i, : s.seq_len] = tokens[1:]
        start, end = s.response_start - 1, s.seq_len
        loss_mask[i, start:end] = s.response_mask()
        if old_logprobs is not None:
            old[i, start:end] = old_logprobs[i].float()
        if engine is not None and s.engine_logprobs is not None:
            engine[i, start:end] = s.engine_logprobs.float()
        advantages[i] = float(s.advantage)
        spans.append((start, end))
    images = [s for s in samples if s.pixel_values is not None]
    if images and mrope is None:
        raise ValueError("samples with images need a vision-language policy (collate got no mrope tokens)")
    return MicroBatch(
        input_ids=input_ids,
        position_ids=_mrope_positions(samples, b, t, mrope)
        if mrope
        else torch.arange(t).expand(b, t).contiguous(),
        labels=labels,
        loss_mask=loss_mask,
        old_logprobs=old,
        advantages=advantages,
        spans=spans,
        pixel_values=torch.cat([s.pixel_values for s in images]) if images else None,
        image_grid_thw=torch.cat([s.image_grid_thw for s in images]).long() if images else None,
        engine_logprobs=engine,
    )


def _mrope_positions(samples: list[Sample], b: int, t: int, mrope: tuple[int, int]) -> torch.Tensor:
    from megatron_sapo.megatron.mrope import rope_index

    out = torch.arange(t).expand(3, b, t).clone()
    for i, s in enumerate(samples):
        rows = rope_index(s.tokens[:-1].long(), s.image_grid_thw, *mrope)
        out[:, i, : s.seq_len] = rows
        # padding continues after the row's last position (never attended to by a real token)
        out[:, i, s.seq_len :] = torch.arange(t - s.seq_len) + int(rows.max()) + 1 if s.seq_len else 0
    return out

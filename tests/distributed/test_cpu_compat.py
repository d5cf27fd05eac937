"""Real megatron-core on CPU under gloo, checked against a single-process (TP=PP=EP=1) reference run.

Covers `megatron_sapo.megatron.cpu` end to end: TP=2 forward (vocab-parallel logits) + DDP backward +
megatron's `get_grad_norm_fp32` over gloo; PP=2 forward-backward through `get_forward_backward_func`; a 4-expert top-2 MoE
(SequentialMLP, alltoall dispatcher) at EP=2. Weights are identical by construction: the reference
randomises a TP=1 model from a seeded generator and every sharded run loads slices of that state dict.

    python -m pytest tests/distributed/test_cpu_compat.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks

VOCAB, BATCH, SEQ, WEIGHT_SEED = 64, 2, 8, 7
TOL = 1e-5


def _batch(seed: int) -> dict[str, torch.Tensor]:
    from megatron_sapo.megatron.cpu import causal_attention_mask

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
    return dict(
        input_ids=tokens[:, :-1],
        labels=tokens[:, 1:],
        position_ids=torch.arange(SEQ).expand(BATCH, SEQ),
        attention_mask=causal_attention_mask(SEQ, BATCH),
    )


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, labels: bool = False) -> torch.Tensor:
    return model(
        batch["input_ids"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"] if labels else None,
    )


def _pipeline_losses(model: torch.nn.Module, num_microbatches: int) -> list[float]:
    """Per-microbatch mean token losses from megatron's schedule (last stage; [] elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(per_token_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        return _forward(model, next(data_iterator), labels=True), loss_func

    batches = iter([_batch(100 + i) for i in range(num_microbatches)])
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    return [float(m["loss"]) for m in out]


def _layer_grads(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Grads of decoder params by TP=PP=1 name (embeddings are tied across stages: not compared here)."""
    from megatron_sapo.megatron.testing import full_name, shard_offsets

    offsets = shard_offsets(model)
    return {
        full_name(n, **offsets): p.grad.numpy().copy()
        for n, p in model.named_parameters()
        if n.startswith("decoder.") and p.grad is not None
    }


def _reference(rank: int, world_size: int) -> dict:
    """Single process: dense logits, grad norm, pipeline losses/grads and MoE logits at TP=PP=EP=1."""
    from megatron_sapo.megatron.testing import (
        build_tiny_gpt,
        init_megatron_cpu,
        randomize_weights,
        tiny_gpt_config,
    )

    init_megatron_cpu()
    dense = build_tiny_gpt(tiny_gpt_config(), vocab_size=VOCAB)
    weights = randomize_weights(dense, WEIGHT_SEED)
    batch = _batch(0)
    with torch.no_grad():
        logits = _forward(dense.eval(), batch).numpy()
    _forward(dense.train(), batch, labels=True).mean().backward()
    grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in dense.parameters()]))

    dense.zero_grad(set_to_none=True)
    pipeline_losses = _pipeline_losses(dense, num_microbatches=2)
    pipeline_grads = _layer_grads(dense)

    moe = build_tiny_gpt(tiny_gpt_config(num_moe_experts=4), vocab_size=VOCAB)
    moe_weights = randomize_weights(moe, WEIGHT_SEED + 1)
    with torch.no_grad():
        moe_logits = [_forward(moe.eval(), _batch(200 + r)).numpy() for r in range(2)]
    return dict(
        weights={k: v.numpy() for k, v in weights.items()},
        logits=logits,
        grad_norm=grad_norm,
        pipeline_losses=pipeline_losses,
        pipeline_grads=pipeline_grads,
        moe_weights={k: v.numpy() for k, v in moe_weights.items()},
        moe_logits=moe_logits,
    )


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_on_ranks(_reference, world_size=1)[0]


def _tp2(rank: int, world_size: int, weights: dict[str, np.ndarray]) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from megatron_sapo.megatron.testing import (
        build_tiny_gpt,
        init_megatron_cpu,
        load_full_weights,
        tiny_gpt_config,
    )

    init_megatron_cpu(tp=2)
    config = tiny_gpt_config()
    model = build_tiny_gpt(config, vocab_size=VOCAB)
    full = {k: torch.from_numpy(v) for k, v in weights.items()}
    load_full_weights(model, full, tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=2)
    batch = _batch(0)
    with torch.no_grad():
        logits_shard = _forward(model.eval(), batch).numpy()  # [B, T, V/tp]

    # Megatron DDP puts grads in CPU grad buffers (param.main_grad); finalize_model_grads all-reduces
    # them over DP and sums the QK-norm grads over TP, as on GPU.
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model.train())
    ddp.zero_grad_buffer()
    _forward(ddp, batch, labels=True).mean().backward()
    finalize_model_grads([ddp])
    # each grad once: TP-replicated params (norms) on TP rank 0 only, like megatron's optimizer
    grads = [
        p.main_grad
        for p in model.parameters()
        if not getattr(p, "shared", False) and param_is_not_tensor_parallel_duplicate(p)
    ]
    grad_norm = get_grad_norm_fp32(grads, grad_stats_parallel_group=parallel_state.get_model_parallel_group())
    return dict(logits_shard=logits_shard, grad_norm=grad_norm)


def test_tp2_forward_and_grad_norm_match_single_process(reference: dict) -> None:
    results = run_on_ranks(_tp2, world_size=2, args=(reference["weights"],))
    logits = np.concatenate([r["logits_shard"] for r in results], axis=-1)  # vocab-parallel gather
    assert logits.shape == reference["logits"].shape == (BATCH, SEQ, VOCAB)
    assert np.abs(logits - reference["logits"]).max() <= TOL
    for r in results:
        assert r["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)


def _pp2(rank: int, world_size: int, weights: dict[str, np.ndarray]) -> dict:
    from megatron_sapo.megatron.testing import (
        build_tiny_gpt,
        init_megatron_cpu,
        load_full_weights,
        tiny_gpt_config,
    )

    init_megatron_cpu(pp=2)
    model = build_tiny_gpt(
        tiny_gpt_config(), vocab_size=VOCAB
    )  # tied embeddings: exercises the PP all-reduce
    load_full_weights(model, {k: torch.from_numpy(v) for k, v in weights.items()}, tp_rank=0, tp_size=1)
    losses = _pipeline_losses(model.train(), num_microbatches=2)
    return dict(losses=losses, grads=_layer_grads(model))


def test_pp2_forward_backward_matches_single_process(reference: dict) -> None:
    results = run_on_ranks(_pp2, world_size=2, args=(reference["weights"],))
    assert results[0]["losses"] == []  # only the last stage computes the loss
    np.testing.assert_allclose(results[1]["losses"], reference["pipeline_losses"], rtol=0, atol=TOL)
    stage_grads = {**results[0]["grads"], **results[1]["grads"]}
    assert set(stage_grads) == set(reference["pipeline_grads"])
    for name, grad in stage_grads.items():
        assert np.abs(grad - reference["pipeline_grads"][name]).max() <= TOL, name


def _ep2(rank: int, world_size: int, weights: dict[str, np.ndarray]) -> np.ndarray:
    from megatron_sapo.megatron.testing import (
        build_tiny_gpt,
        init_megatron_cpu,
        load_full_weights,
        tiny_gpt_config,
    )

    init_megatron_cpu(ep=2)
    model = build_tiny_gpt(tiny_gpt_config(num_moe_experts=4), vocab_size=VOCAB)
    load_full_weights(model, {k: torch.from_numpy(v) for k, v in weights.items()}, tp_rank=0, tp_size=1)
    with torch.no_grad():  # each rank routes its own batch; tokens cross ranks in the alltoall dispatch
        return _forward(model.eval(), _batch(200 + rank)).numpy()


def test_moe_ep2_forward_matches_single_process(reference: dict) -> None:
    results = run_on_ranks(_ep2, world_size=2, args=(reference["moe_weights"],))
    for rank, logits in enumerate(results):
        assert np.abs(logits - reference["moe_logits"][rank]).max() <= TOL


# Dist-checkpoint save/load (TP2 -> TP1 and other layouts) is tested with the project's in-process writer
# in tests/distributed/test_checkpoint.py.

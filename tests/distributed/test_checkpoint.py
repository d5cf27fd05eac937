"""Checkpoints (`megatron_sapo.megatron.checkpoint`) on CPU under gloo: exact round trip, resharding,
atomicity, and exact resume of a training run killed with SIGKILL.

References are independent of the code under test: the pre-save state and the continued run of the
same process (round trip), the gathered full tensors of the saving layout (resharding), and an
uninterrupted torchrun training run (resume). Models train with `PolicyEngine` (megatron DDP, distributed
Adam, LR schedule) with dropout on, so RNG states must come back too.

    python -m pytest tests/distributed/test_checkpoint.py -q
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sapo.utils.spawn import free_port, run_on_ranks

VOCAB, DENSE_LAYERS, MOE_LAYERS = 64, 4, 2
REPO = Path(__file__).resolve().parents[2]
RESUME_SCRIPT = Path(__file__).with_name("_resume_script.py")


def _init(**layout) -> None:
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu(**layout)


def _engine(*, moe: bool = False, dropout: float = 0.1):
    """A PolicyEngine on a tiny GPT; weights from a seeded generator, consistent across TP/PP ranks."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.testing import randomize_weights, tiny_gpt_config

    config = tiny_gpt_config(
        num_layers=MOE_LAYERS if moe else DENSE_LAYERS,
        num_moe_experts=4 if moe else None,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    )
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, qk_layernorm=True, normalization=config.normalization
    )

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None) -> GPTModel:
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=VOCAB,
            max_sequence_length=32,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=True,
            position_embedding_type="rope",
            vp_stage=vp_stage,
        )
        # Same draws on every rank: TP-replicated parameters agree; then re-tie the output layer of the
        # last pipeline stage to the first stage's embedding, as megatron does at construction.
        randomize_weights(model, seed=3)
        with torch.no_grad():
            model.setup_embeddings_and_output_layer()
        return model

    return PolicyEngine(
        provide,
        OptimConfig(lr=1e-2, warmup_steps=1, decay_steps=8, weight_decay=0.01),
        LossConfig(mini_batches=2, micro_batch_tokens=40),
    )


def _samples(seed: int) -> list:
    from megatron.core import parallel_state

    from megatron_sapo.megatron.batching import shard_for_data_parallel
    from megatron_sapo.megatron.testing import random_samples

    return shard_for_data_parallel(
        random_samples(8, vocab=VOCAB, seed=seed, lengths=(9, 20), prompts=(4, 5)),
        mini_batches=2,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def _local_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter (keyed by chunk and local name): the weight and the optimizer tensors this rank
    holds for it (Adam moments, fp32 main param, step), flattened as the distributed optimizer keeps them."""
    out = {}
    for c, chunk in enumerate(engine.model):
        names = {p: f"{c}/{n}" for n, p in chunk.module.named_parameters()}
        out.update({name: {"weight": p.detach().clone()} for p, name in names.items()})
        for opt in engine.optimizer.chained_optimizers:
            for param in opt.model_param_group_index_map:
                if param in names:
                    states = opt._get_main_param_and_optimizer_states(param)
                    out[names[param]].update({k: v.detach().clone() for k, v in states.items()})
    return out


def _objects(engine) -> dict:
    return dict(model_chunks=engine.model, optimizer=engine.optimizer, scheduler=engine.scheduler)


def _rng_states() -> dict:
    from megatron.core import tensor_parallel

    return dict(
        random=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state(),
        tracker=tensor_parallel.get_cuda_rng_tracker().get_states(),
    )


def _scramble_rng() -> None:
    from megatron_sapo.megatron.parallel import seed_all

    seed_all(4321)  # torch generator and megatron's tracker streams
    random.seed(99)
    np.random.seed(99)


def _differences(a: dict, b: dict) -> list[str]:
    """Keys (recursively) whose values are not exactly equal."""
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"keys {sorted(set(a) ^ set(b))}"]
        return [f"{k}.{d}" for k in a for d in _differences(a[k], b[k])]
    if isinstance(a, (tuple, list)):
        return [f"[{i}]{d}" for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y)]
    if torch.is_tensor(a):
        return [] if torch.equal(a, b) else ["tensor"]
    if isinstance(a, np.ndarray):
        return [] if np.array_equal(a, b) else ["array"]
    return [] if a == b else [f"{a!r} != {b!r}"]


def _round_trip(rank: int, world_size: int, root: str) -> dict:
    from megatron_sapo.megatron.checkpoint import load_checkpoint, save_checkpoint

    _init(tp=2)
    engine = _engine()
    engine.train_step(_samples(0))
    save_checkpoint(root, step=1, extra={"data_position": 8}, **_objects(engine))
    saved = dict(state=_local_state(engine), scheduler=engine.scheduler.state_dict(), rng=_rng_states())
    continued = engine.train_step(_samples(1))  # the reference for the step after a resume
    continued_state = _local_state(engine)

    fresh = _engine()
    _scramble_rng()
    step, extra = load_checkpoint(root, **_objects(fresh))
    loaded = dict(state=_local_state(fresh), scheduler=fresh.scheduler.state_dict(), rng=_rng_states())
    resumed = fresh.train_step(_samples(1))

    # Control: without the RNG states, dropout draws other masks and the step differs.
    control = _engine()
    load_checkpoint(root, **_objects(control))
    _scramble_rng()
    control.train_step(_samples(1))
    return dict(
        step=step,
        extra=extra,
        num_states=len(next(iter(saved["state"].values()))),
        load_diffs=_differences(saved, loaded),
        resume_diffs=_differences(continued_state, _local_state(fresh)),
        loss_diff=abs(resumed["loss"] - continued["loss"]),
        control_diffs=len(_differences(continued_state, _local_state(control))),
    )


def test_round_trip_at_tp2_is_exact(tmp_path: Path) -> None:
    for r in run_on_ranks(_round_trip, world_size=2, args=(str(tmp_path),)):
        assert (r["step"], r["extra"]) == (1, {"data_position": 8})
        assert r["num_states"] == 5  # weight, fp32 main param, exp_avg, exp_avg_sq, step
        assert r["load_diffs"] == []  # weights, optimizer, scheduler, RNG: bit-exact
        assert r["resume_diffs"] == [] and r["loss_diff"] == 0.0
        assert r["control_diffs"] > 0


# Saving layouts (2 ranks each) for the resharding test: (parallel layout, MoE).
LAYOUTS = {"tp2": (dict(tp=2), False), "pp2_vpp2": (dict(pp=2, vpp=2), False), "ep2": (dict(ep=2), True)}


def _full_names(engine) -> dict[str, str]:
    """`chunk/local name` -> name in the TP=PP=EP=1 model, for this rank's parameters."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_sapo.megatron.testing import full_name

    config = engine.model[0].config
    experts = (config.num_moe_experts or 0) // parallel_state.get_expert_model_parallel_world_size()
    out = {}
    for c, chunk in enumerate(engine.model):
        vp_stage = c if len(engine.model) > 1 else None
        offsets = dict(
            layer_offset=get_transformer_layer_offset(config, vp_stage=vp_stage),
            expert_offset=parallel_state.get_expert_model_parallel_rank() * experts,
        )
        for n, _ in chunk.module.named_parameters():
            out[f"{c}/{n}"] = full_name(n, **offsets)
    return out


def _model_space(engine) -> list[tuple[str, str, torch.Tensor, int | None, bool]]:
    """(full name, tensor kind, tensor shaped like the local param, TP partition dim, is GLU fc1) for the
    weights and for the optimizer tensors of parameters this rank's optimizer holds whole."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    params = {f"{c}/{n}": p for c, ch in enumerate(engine.model) for n, p in ch.module.named_parameters()}
    names = _full_names(engine)
    out = []
    for key, tensors in _local_state(engine).items():
        param = params[key]
        if names[key] == "output_layer.weight":
            continue  # the tied copy of the embedding on the last pipeline stage
        dim = param.partition_dim if tp > 1 and getattr(param, "tensor_model_parallel", False) else None
        for kind, value in tensors.items():
            if kind != "step" and value.numel() == param.numel():  # DP-sharded moments are skipped
                out.append((names[key], kind, value.reshape(param.shape), dim, ".linear_fc1." in key))
    return out


def _save_layout(rank: int, world_size: int, layout: str, root: str) -> list:
    from megatron.core import parallel_state

    from megatron_sapo.megatron.checkpoint import save_checkpoint

    parallel, moe = LAYOUTS[layout]
    _init(**parallel)
    engine = _engine(moe=moe)
    engine.train_step(_samples(0))
    save_checkpoint(root, step=1, **_objects(engine))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return [
        (name, kind, value.numpy(), tp_rank, dim, glu) for name, kind, value, dim, glu in _model_space(engine)
    ]


def _gather(results: list[list]) -> dict[tuple[str, str], np.ndarray]:
    """Full tensors from TP shards (GLU fc1 holds [gate_r; up_r] per rank); replicas must agree."""
    shards: dict[tuple[str, str], dict[int, tuple]] = {}
    for result in results:
        for name, kind, value, tp_rank, dim, glu in result:
            slot = shards.setdefault((name, kind), {})
            if tp_rank in slot:
                assert np.array_equal(slot[tp_rank][0], value), f"replicas of {name} {kind} differ"
            slot[tp_rank] = (value, dim, glu)
    full = {}
    for key, slot in shards.items():
        parts = [slot[r] for r in sorted(slot)]
        dim, glu = parts[0][1], parts[0][2]
        if dim is None:
            full[key] = parts[0][0]
        elif glu:
            halves = [np.split(v, 2, axis=dim) for v, _, _ in parts]
            full[key] = np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=dim)
        else:
            full[key] = np.concatenate([v for v, _, _ in parts], axis=dim)
    return full


def _load_single(rank: int, world_size: int, roots: dict[str, str]) -> dict:
    from megatron_sapo.megatron.checkpoint import load_checkpoint

    out = {}
    for layout, root in roots.items():
        _init()
        engine = _engine(moe=LAYOUTS[layout][1])
        step, _ = load_checkpoint(root, **_objects(engine))
        tensors = {(n, k): v.numpy() for n, k, v, _, _ in _model_space(engine)}
        adam_steps = {
            float(state["step"])
            for opt in engine.optimizer.chained_optimizers
            for state in opt.optimizer.state.values()
        }
        out[layout] = dict(
            step=step, tensors=tensors, num_steps=engine.scheduler.num_steps, adam_steps=adam_steps
        )
    return out


# slow: three 2-rank saves and one reload, ~1 min on 2 busy cores.
@pytest.mark.slow
def test_checkpoint_reshards_tp2_pp2_vpp2_ep2_to_single_rank(tmp_path: Path) -> None:
    roots = {layout: str(tmp_path / layout) for layout in LAYOUTS}
    saved = {
        layout: _gather(run_on_ranks(_save_layout, world_size=2, args=(layout, root)))
        for layout, root in roots.items()
    }
    loaded = run_on_ranks(_load_single, world_size=1, args=(roots,))[0]
    for layout, reference in saved.items():
        got = loaded[layout]
        assert got["step"] == 1 and got["num_steps"] == 2  # scheduler: 2 mini-batch steps
        weights = {k for k in got["tensors"] if k[1] == "weight"}
        assert weights == {k for k in reference if k[1] == "weight"}, layout
        # The optimizer reshards too, checked wherever the saving ranks held a parameter's state whole:
        # every parameter at DP=1 (tp2, pp2_vpp2); at ep2 the experts (expert-DP=1), not the DP-sharded rest.
        compared = [k for k in reference if k[1] != "weight"]
        must = [n for n, _ in weights if layout != "ep2" or ".local_experts." in n]
        assert must and all((n, kind) in reference for n in must for kind in ("param", "exp_avg")), layout
        assert got["adam_steps"] == {2.0}
        for key in weights | set(compared):
            np.testing.assert_array_equal(got["tensors"][key], reference[key], err_msg=f"{layout} {key}")


def _atomicity(rank: int, world_size: int, root: str) -> dict:
    from megatron_sapo.megatron import checkpoint

    _init()
    engine = _engine(dropout=0.0)
    objects = _objects(engine)
    weights = {}
    for step in (1, 2):
        engine.train_step(_samples(step))
        checkpoint.save_checkpoint(root, step=step, **objects)
        weights[step] = _local_state(engine)

    def crash(*args, **kwargs):  # a crash after every rank wrote its files, before the rename
        raise KeyboardInterrupt("simulated crash")

    engine.train_step(_samples(3))
    publish, checkpoint._publish = checkpoint._publish, crash
    try:
        checkpoint.save_checkpoint(root, step=3, **objects)
    except KeyboardInterrupt:
        pass
    finally:
        checkpoint._publish = publish
    out = dict(
        entries=sorted(p.name for p in Path(root).iterdir()),
        tracker=(Path(root) / checkpoint.TRACKER_FILE).read_text().strip(),
    )
    fresh = _engine(dropout=0.0)
    fresh_objects = _objects(fresh)
    out["latest_step"], _ = checkpoint.load_checkpoint(root, **fresh_objects)
    out["latest_diffs"] = _differences(weights[2], _local_state(fresh))
    errors = {}
    for name, call in {
        "incomplete": lambda: checkpoint.load_checkpoint(root, step=3, **fresh_objects),
        "missing_step": lambda: checkpoint.load_checkpoint(root, step=9, **fresh_objects),
        "missing_dir": lambda: checkpoint.load_checkpoint(root + "/nope", **fresh_objects),
    }.items():
        try:
            call()
        except FileNotFoundError as e:
            errors[name] = str(e)
    out["errors"] = errors
    checkpoint.save_checkpoint(root, step=3, keep_last=2, **objects)  # cleans the leftover, prunes step 1
    out["after"] = sorted(p.name for p in Path(root).iterdir())
    return out


def test_interrupted_save_is_never_loaded(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    r = run_on_ranks(_atomicity, world_size=1, args=(root,))[0]
    tracker = "latest_checkpointed_iteration.txt"
    assert r["entries"] == ["iter_0000001", "iter_0000002", "iter_0000003.tmp", tracker]
    assert r["tracker"] == "2"
    assert r["latest_step"] == 2 and r["latest_diffs"] == []
    assert "no complete checkpoint for step 3" in r["errors"]["incomplete"]
    assert "iter_0000003.tmp" in r["errors"]["incomplete"]  # the message names the ignored leftover
    assert "complete checkpoints: [1, 2]" in r["errors"]["missing_step"]
    assert "does not exist" in r["errors"]["missing_dir"]
    assert r["after"] == ["iter_0000002", "iter_0000003", tracker]


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(free_port()), str(RESUME_SCRIPT), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _outputs(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


# slow: five torchrun launches of 2 ranks (~10 s each on an idle 2-core machine).
@pytest.mark.slow
@pytest.mark.parametrize("kill", ["--kill-after-save", "--kill-mid-save"])
def test_resume_after_sigkill_is_exact(tmp_path: Path, kill: str, uninterrupted: list[dict]) -> None:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    # after-save: killed once the step-2 checkpoint is complete; mid-save: killed inside the step-3 save,
    # after step 3 ran and its files were written, so the resume redoes step 3 from the step-2 checkpoint.
    killed = _torchrun(
        "--ckpt", str(ckpt), "--out", str(out), "--steps", "3", kill, "2" if "after" in kill else "3"
    )
    assert killed.returncode != 0, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "iter_0000003.tmp").is_dir() == ("mid" in kill)  # the interrupted save, never loaded
    assert not out.exists()
    resumed = _torchrun("--ckpt", str(ckpt), "--out", str(out), "--steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for ref, got in zip(uninterrupted, _outputs(out)):
        assert list(got["losses"]) == [3]
        assert abs(got["losses"][3] - ref["losses"][3]) <= 1e-6
        for name, value in ref["params"].items():
            assert (got["params"][name] - value).abs().max() <= 1e-6, name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    base = tmp_path_factory.mktemp("uninterrupted")
    run = _torchrun("--ckpt", str(base / "ckpt"), "--out", str(base / "out"), "--steps", "3")
    assert run.returncode == 0, run.stderr[-4000:]
    outputs = _outputs(base / "out")
    assert len({round(x, 6) for x in outputs[0]["losses"].values()}) == 3  # the steps did train
    return outputs

"""`parallel.etp` reaches megatron's parallel state and the built model on 2 gloo ranks (tp=2).

etp=1 keeps each expert whole on every TP rank; unset etp follows tp and splits the experts' MLP width.
The trainer's path: `megatron.parallel.init_parallel` + `train.setup.model_config` + `build_gpt_model`.

    python -m pytest tests/distributed/test_parallel_etp.py -q
"""

from __future__ import annotations

from megatron_sapo.utils.spawn import run_on_ranks


def _rank_fn(rank: int, world_size: int) -> list[dict]:
    from megatron.core import parallel_state

    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.parallel import init_parallel
    from megatron_sapo.train import setup
    from megatron_sapo.train.config import TrainJobConfig
    from megatron_sapo.utils.typed_config import from_dict
    from tests.hf_reference import qwen3_moe_config

    hf_config = qwen3_moe_config()  # moe_intermediate_size 32
    out = []
    for etp in (1, None):
        cfg = from_dict(TrainJobConfig, {"parallel": {"tp": 2, "etp": etp}})
        init_parallel(cfg.parallel, seed=0)
        model = build_gpt_model(hf_config, config=setup.model_config(cfg, hf_config))
        fc2 = next(
            p for n, p in model.named_parameters() if ".experts." in n and n.endswith("linear_fc2.weight")
        )
        out.append(
            dict(
                state=parallel_state.get_expert_tensor_parallel_world_size(),
                tp=parallel_state.get_tensor_model_parallel_world_size(),
                config=model.config.expert_tensor_parallel_size,
                fc2_shape=tuple(fc2.shape),  # [hidden, moe_ffn / etp]
            )
        )
        parallel_state.destroy_model_parallel()
    return out


def test_etp_reaches_parallel_state_and_the_experts() -> None:
    for whole, split in run_on_ranks(_rank_fn, world_size=2):
        assert (whole["state"], whole["tp"], whole["config"]) == (1, 2, 1)
        assert (split["state"], split["tp"], split["config"]) == (2, 2, 2)
        assert whole["fc2_shape"][1] == 32 and split["fc2_shape"][1] == 16

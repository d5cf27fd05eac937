"""Megatron distributed-optimizer state in distributed checkpoints: the parts megatron-core leaves to
its training loop, and workarounds for megatron-core 0.16.1 with torch's Adam (no Apex / Transformer
Engine, as on CPU). Used by `megatron_sapo.megatron.checkpoint`.

The optimizer is saved with the "fully_reshardable" sharding: each Adam moment and fp32 main param in
model space (shaped like its parameter, keyed by the parameter's global name), gathered over DP (on CPU
onto DP rank 0 through the gloo group), so it reshards across TP / PP / VPP / EP / DP like the weights. ("fully_sharded_model_space" raises
"flattened_range is not supported" in 0.16.1; "dp_reshardable" reshards DP only.)

Tests: ``python -m pytest tests/distributed/test_checkpoint.py -q``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

__all__ = [
    "OPTIMIZER_SHARDING",
    "chain",
    "init_empty_optimizer_state",
    "load_optimizer_state",
    "refit_chain",
    "without_empty_param_state",
]

OPTIMIZER_SHARDING = "fully_reshardable"


def init_empty_optimizer_state(optimizer: Any) -> None:
    """Allocate Adam state on a never-stepped optimizer: megatron's `sharded_state_dict(is_loading=True)`
    reads `state_dict()`, which needs each torch Adam state's `step` (overwritten by the load)."""
    for opt in chain(optimizer):
        if len(opt.optimizer.state) == 0 and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def chain(optimizer: Any) -> list:
    """The DistributedOptimizers behind a (possibly chained) megatron optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def refit_chain(optimizer: Any, loaded: dict[str, Any], saved_common: dict[str, Any]) -> dict[str, Any]:
    """Loaded optimizer state for a different split into chained optimizers than at save time (MoE:
    dense + expert optimizers at EP>1, one optimizer at EP=1).

    The tensors (`param_state`) were loaded in the current structure (keys are parameter names); only
    the non-tensor part (per param-group hyperparameters) follows the saved one. Those are rebuilt from
    the current optimizer, with the saved Adam step count; lr and weight decay come from the scheduler.
    """
    saved = saved_common if "optimizer" in saved_common else None
    saved_parts = [saved] if saved is not None else [v for k, v in saved_common.items() if isinstance(k, int)]
    steps = {g.get("step") for part in saved_parts for g in part["optimizer"]["param_groups"]}
    if len(steps) != 1:
        raise ValueError(f"cannot refit optimizer groups with differing step counts {steps}")
    step = steps.pop()
    optimizers = chain(optimizer)
    out = {}
    for i, opt in enumerate(optimizers):
        part = loaded if len(optimizers) == 1 else loaded[i]
        groups = opt.state_dict()["optimizer"]["param_groups"]
        out[i] = dict(
            optimizer=dict(param_groups=[dict(g, step=step) for g in groups]),
            param_state=part["param_state"],
            param_state_sharding_type=OPTIMIZER_SHARDING,
        )
    return out[0] if len(optimizers) == 1 else out


@torch.no_grad()  # fp32 main params are views of the (leaf, requires-grad) model params
def load_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)`, working around two megatron 0.16.1 bugs with torch's Adam (no
    Apex/TE, as on CPU). Its model-space loader copies every key of the inner Adam state, "step" included,
    from tensors that never carry "step" (KeyError; "step" is restored from the param groups before).
    And it gives every parameter the *same* "step" tensor, which torch's Adam then increments once per
    parameter per step (wrong bias correction after a resume): each parameter gets its own copy."""
    optimizers = [o for o in chain(optimizer) if hasattr(o, _SET_STATES)]
    for opt in optimizers:
        setattr(opt, _SET_STATES, partial(_set_states_keeping_step, opt, getattr(opt, _SET_STATES)))
    try:
        optimizer.load_state_dict(state)
    finally:
        for opt in optimizers:
            delattr(opt, _SET_STATES)  # back to the class method
    for opt in chain(optimizer):
        for param_state in opt.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()


_SET_STATES = "_set_main_param_and_optimizer_states"


def _set_states_keeping_step(opt: Any, original: Any, model_param: Any, tensors: dict) -> None:
    if "step" not in tensors:
        group_index, group_order = opt.model_param_group_index_map[model_param]
        main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
        if "step" in opt.optimizer.state.get(main_param, {}):
            tensors = {**tensors, "step": opt.optimizer.state[main_param]["step"].clone()}
    original(model_param, tensors)


def without_empty_param_state(common: Any) -> Any:
    """The common state minus the optimizer's `param_state` where it is None: with the gather onto DP
    rank 0 the other DP ranks hold None there, which megatron's consistency check would report."""
    if not isinstance(common, dict):
        return common
    return {
        k: without_empty_param_state(v) for k, v in common.items() if not (k == "param_state" and v is None)
    }

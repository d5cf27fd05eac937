"""Policy-loss library: pure tensor math, no process groups, no megatron.

    from megatron_sapo.losses import compute_policy_loss, group_advantages
    adv = group_advantages(rewards, group_size=8)
    loss, metrics = compute_policy_loss("sapo", logp, old_logp, adv, mask, tau_pos=1.0, tau_neg=1.05)
    # rollout correction (TIS / MIS against the engine's log-probs): rollout_correction.py

Registered losses: "sapo" (sapo.py), "gspo" and "gspo_token" (gspo.py), "grpo" (grpo.py). A new loss
is one new file that uses `@register_loss`, imported below. Imports no other package of megatron_sapo
(the layer map is in megatron_sapo/__init__.py).
"""

from megatron_sapo.losses import grpo, gspo, sapo  # noqa: F401  (registers the losses)
from megatron_sapo.losses.advantages import group_advantages
from megatron_sapo.losses.aggregation import AGGREGATIONS, aggregate, count_for_normalizer
from megatron_sapo.losses.registry import LOSSES, compute_policy_loss, loss_parameters, register_loss
from megatron_sapo.losses.rollout_correction import MODES as ROLLOUT_CORRECTIONS
from megatron_sapo.losses.rollout_correction import rollout_correction_weights

__all__ = [
    "AGGREGATIONS",
    "LOSSES",
    "ROLLOUT_CORRECTIONS",
    "aggregate",
    "compute_policy_loss",
    "count_for_normalizer",
    "group_advantages",
    "loss_parameters",
    "register_loss",
    "rollout_correction_weights",
]

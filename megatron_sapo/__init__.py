"""megatron_sapo: SAPO (Soft Adaptive Policy Optimization) RL post-training on Megatron-Core + SGLang.

Loss math lives in `megatron_sapo.losses` (pure tensors); everything that touches megatron-core lives
in `megatron_sapo.megatron`. Importing the top-level package imports neither torch.distributed state
nor megatron-core.
"""

__version__ = "0.1.0"

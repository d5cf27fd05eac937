"""megatron_sapo: SAPO (Soft Adaptive Policy Optimization) RL post-training on Megatron-Core + SGLang.

The top level holds the CLI (`cli.py`) and packages only. Each package imports only the ones below it
(tests/unit/test_package_layers.py enforces this map):

    utils      typed config machinery, tiny offline models, local process spawning    (imports nothing)
    losses     SAPO / GSPO / GRPO math, advantages, diagnostics: pure tensors          (nothing)
    data       datasets, chat templates, the synthetic task                            (utils)
    rewards    reward functions and the batch runner                                   (data, utils)
    bridge     HF <-> Megatron mapping tables, sliced import, bucketed export, safetensors (utils)
    megatron   everything touching megatron-core: CPU compat, parallel state, models, train step,
               checkpoints, routing replay                                             (losses, bridge, utils)
    convert    checkpoint converters behind tools/                                     (megatron, bridge, utils)
    rollout    SGLang servers + client, in-process engine, weight sync         (data, bridge, utils)
    cluster    srun / torchrun launch, engine nodes                                    (rollout, megatron, utils)
    train      the RL run: loop, config root, set-up, eval, outputs                    (all of the above)

Importing the top-level package imports neither torch.distributed state nor megatron-core.
"""

__version__ = "0.1.0"

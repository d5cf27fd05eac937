"""The RL run behind `megatron-sapo train`: the loop and everything only a run needs.

    loop.py     run(cfg): rollout -> rewards -> advantages -> pi_old -> mini-batch updates -> sync -> log
    config.py   TrainJobConfig, the root of a run config (+ the `model`, `sft`, `run` sections)
    setup.py    process set-up (launch, torch.distributed, megatron parallel state) and the start model
    data.py     the run's prompts and batches; engines.py: rollout engine, rewards, eval
    guard.py    engine vs trainer log-probs after each weight sync; outputs.py, plots.py: what a run writes

May import every other package of megatron_sapo (it is the top layer; see megatron_sapo/__init__.py).
Tests: tests/e2e/test_trainer.py, tests/e2e/test_multirank.py, tests/unit/test_config.py.
"""

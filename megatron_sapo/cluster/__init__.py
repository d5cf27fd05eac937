"""Where the processes of a run go: srun / torchrun / nothing -> ranks, nodes, roles (launch.py), SGLang
engines on engine nodes or on every train node (engine_nodes.py), and the `cluster:` section (config.py).

May import megatron_sapo.rollout, megatron_sapo.megatron (for `ParallelConfig`) and megatron_sapo.utils;
never the run layer above it (megatron_sapo.train). Tests: tests/unit/test_launch.py,
tests/e2e/test_multirank.py, tests/slurm/.
"""

"""Shared utilities: typed_config.py (dataclasses <- YAML + dotted overrides, --help), tiny.py (offline
tokenizer + random-weight HF models), spawn.py (run a function on N local gloo ranks), disk.py (disk full as
one line).

The bottom layer: imports no other package of megatron_sapo (see megatron_sapo/__init__.py).
"""

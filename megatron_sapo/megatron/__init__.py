"""Everything that touches megatron-core: CPU compatibility layer, vocab-parallel log-probs, model glue.

`megatron_sapo.megatron.cpu` is never imported from here: callers enable it explicitly, and only when
no CUDA device is present.
"""

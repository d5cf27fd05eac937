"""Not vllm. A stand-in package put on PYTHONPATH of CPU SGLang server processes only (see `_custom_ops`)."""

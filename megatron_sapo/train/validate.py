"""What `megatron-sapo train` checks before it writes anything: the inputs a config names outside itself.

    check_inputs(cfg)   # cli.py, on every process, before <run.output_dir>/config.yaml is written

`model.path` must be a Hugging Face directory whose `model_type` has a table in bridge/arch/ (the
converters' own check, `convert.assets.load_hf_config`); `reward.name` must import and name a function
(`rewards.registry.get_reward`, user code run as it will be at the first step). Each problem is a
`ConfigError` naming the key, which the CLI prints as one line (exit 2).
Tests: tests/unit/test_train_inputs.py.
"""

from __future__ import annotations

from megatron_sapo.convert.assets import load_hf_config
from megatron_sapo.rewards import get_reward
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.utils.typed_config import ConfigError


def check_inputs(cfg: TrainJobConfig) -> None:
    """ConfigError naming `model.path` or `reward.name` when the run could not start from them."""
    if cfg.model.path is not None:
        try:
            load_hf_config(cfg.model.path)
        except (OSError, ValueError) as e:  # ConversionError, or transformers refusing the config
            raise ConfigError(str(e), key="model.path") from e
    try:
        get_reward(cfg.reward.name)
    except ValueError as e:
        raise ConfigError(str(e), key="reward.name") from e

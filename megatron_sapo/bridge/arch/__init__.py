"""The one architecture registry: every module of this package is one HF `model_type`, found by looking.

    from megatron_sapo.bridge.arch import architecture_of, mapping_table
    arch = architecture_of(hf_config)         # Architecture: megatron config facts + mapping entries
    table = mapping_table(hf_config)          # MappingTable bound to this config's dims
    text = language_config(hf_config)         # the config the GPT language model is built from
    sorted(ARCHITECTURES)                     # the supported model types

Each module here whose name does not start with `_` defines `ARCHITECTURE`, an `Architecture`
(`_architecture.py`); `megatron_sapo/megatron/models.py` builds the GPTModel from its facts and the
bridge converts weights with its table. `discover()` imports them all when this package is imported, so a
new architecture is one new file here and nothing else; a `model_type` defined twice is an error.
Tests: `python -m pytest tests/unit/test_bridge_mapping.py -q`
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from megatron_sapo.bridge.arch._architecture import Architecture
from megatron_sapo.bridge.mapping import MappingTable, ModelDims


def discover() -> dict[str, Architecture]:
    """`ARCHITECTURE` of every public module on this package's `__path__`, by `model_type`."""
    found: dict[str, Architecture] = {}
    where: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        arch: Architecture = module.ARCHITECTURE
        if arch.model_type in found:
            raise ValueError(
                f"model_type {arch.model_type!r} is defined twice: in {where[arch.model_type]} and "
                f"{module.__name__}"
            )
        found[arch.model_type], where[arch.model_type] = arch, module.__name__
    return found


ARCHITECTURES: dict[str, Architecture] = discover()


def architecture_of(hf_config: Any) -> Architecture:
    """The `Architecture` of `hf_config.model_type`; ValueError naming the supported model types."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture model_type={model_type!r} "
            f"(architectures={getattr(hf_config, 'architectures', None)}): no megatron_sapo/bridge/arch/*.py "
            f"defines model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


class _LanguageView:
    """A VL config's `text_config` read through: top-level `model_type` and `tie_word_embeddings` (which
    transformers ties on), plus the architecture's `text_defaults` for fields the config lacks."""

    def __init__(self, hf_config: Any, arch: Architecture) -> None:
        self._text = hf_config.text_config
        self._own = {
            "model_type": arch.model_type,
            "tie_word_embeddings": bool(hf_config.tie_word_embeddings),
        }
        self._defaults = dict(arch.text_defaults)

    def __getattr__(self, name: str) -> Any:
        if name in self._own:
            return self._own[name]
        try:
            return getattr(self._text, name)
        except AttributeError:
            if name in self._defaults:
                return self._defaults[name]
            raise


def language_config(hf_config: Any) -> Any:
    """The config megatron's language model is built from: `hf_config` itself for text models; for
    vision-language ones its `text_config`, seen with the top-level model type and embedding tying."""
    if isinstance(hf_config, _LanguageView):
        return hf_config
    arch = architecture_of(hf_config)
    return _LanguageView(hf_config, arch) if arch.vision else hf_config


def mapping_table(hf_config: Any) -> MappingTable:
    """The mapping table of `hf_config.model_type` bound to its dims; ValueError as `architecture_of`."""
    arch = architecture_of(hf_config)
    return MappingTable(arch.model_type, arch.mappings, ModelDims.from_hf(language_config(hf_config)))

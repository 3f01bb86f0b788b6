"""Method configs for the model-level API (``fastpeft.get_peft_model``): the shared base classes
and ``config_from_dict``.

Each method's config lives with its plug-in in ``fastpeft/methods/<method>.py`` and is
re-exported here (``from fastpeft.config import LoraConfig`` keeps working). Field names and
meanings follow Hugging Face PEFT where PEFT has the method (LoRA, prompt tuning, prefix
tuning), and ``to_dict()`` / ``from_dict()`` read and write PEFT's ``adapter_config.json``.
Adapters, VPT and BitFit are fastpeft-only (``peft_type`` "ADAPTER", "VPT", "BITFIT").

``from_dict`` is strict: an unknown ``peft_type``, a key neither fastpeft nor PEFT knows, or a PEFT
option fastpeft does not implement set to a non-default value is a ``ValueError`` naming it
(ignoring it silently would give different outputs than PEFT).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

__all__ = ["LoraConfig", "AdapterConfig", "PromptTuningConfig", "PrefixTuningConfig", "VPTConfig",
           "BitFitConfig", "config_from_dict", "PEFT_TYPES"]

#: keys PEFT writes that carry no behaviour (bookkeeping), accepted by every config
_META_KEYS = ("auto_mapping", "peft_version", "revision")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _jsonable(v):
    if isinstance(v, (set, tuple)):
        return sorted(v) if isinstance(v, set) else list(v)
    return v


@dataclass
class _Config:
    peft_type = ""  # class attribute, not a field
    #: PEFT keys read and ignored (no effect on the model)
    _peft_ignored = ()

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def _unsupported(cls) -> Dict[str, tuple]:
        """PEFT options fastpeft does not implement -> the values accepted (PEFT's defaults)."""
        return {}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "_Config":
        d = dict(d)
        pt = d.pop("peft_type", cls.peft_type)
        pt = getattr(pt, "value", pt)
        _check(pt == cls.peft_type, f"peft_type: expected {cls.peft_type!r} for {cls.__name__}, got {pt!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unsupported = cls._unsupported()
        for k, allowed in unsupported.items():
            if k in d and not any(d[k] == a for a in allowed):
                raise ValueError(f"{k}: fastpeft does not support PEFT's {k}={d[k]!r} (supported: {allowed[0]!r})")
        unknown = sorted(k for k in d if k not in names and k not in unsupported and k not in _META_KEYS
                         and k not in cls._peft_ignored)
        if unknown:
            raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                             f"{cls.__name__} (peft_type {cls.peft_type!r})")
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def is_prompt_learning(self) -> bool:
        return False


@dataclass
class _PromptConfig(_Config):
    """Fields shared by PEFT's prompt-learning configs (prompt tuning, prefix tuning)."""
    num_virtual_tokens: int = 20
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    task_type: Optional[str] = None
    inference_mode: bool = False
    modules_to_save: Optional[List[str]] = None
    base_model_name_or_path: Optional[str] = None

    def __post_init__(self):
        _check(isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens >= 1,
               f"num_virtual_tokens: expected a positive int, got {self.num_virtual_tokens!r}")
        _check(self.num_transformer_submodules in (None, 1),
               f"num_transformer_submodules: fastpeft supports 1 (encoder-only or decoder-only models), "
               f"got {self.num_transformer_submodules!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True


def __getattr__(name: str):
    """The method configs (defined with their plug-ins) and ``PEFT_TYPES``."""
    from fastpeft.methods.base import registered
    reg = registered()
    if name == "PEFT_TYPES":
        return {pt: m.config_class for pt, m in reg.items()}
    for m in reg.values():
        if m.config_class.__name__ == name:
            return m.config_class
    raise AttributeError(f"module 'fastpeft.config' has no attribute {name!r}")


def config_from_dict(d: Dict[str, Any], source: str = "config") -> _Config:
    """Build the right config from an ``adapter_config.json`` dict; errors name ``source``."""
    from fastpeft.methods.base import registered
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    types = {pt: m.config_class for pt, m in registered().items()}
    pt = d.get("peft_type")
    pt = getattr(pt, "value", pt)
    if pt not in types:
        raise ValueError(f"{source}: key 'peft_type': unknown peft_type {pt!r} (fastpeft knows {sorted(types)})")
    try:
        return types[pt].from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e

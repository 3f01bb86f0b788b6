"""Method configs for the model-level API (``fastpeft.get_peft_model``).

Field names and meanings follow Hugging Face PEFT where PEFT has the method (LoRA, prompt
tuning, prefix tuning), and ``to_dict()`` / ``from_dict()`` read and write PEFT's
``adapter_config.json``: a LoRA / prompt / prefix config saved by fastpeft loads with
``peft.PeftConfig.from_pretrained`` and vice versa. Adapters, VPT and BitFit are
fastpeft-only (``peft_type`` "ADAPTER", "VPT", "BITFIT").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

__all__ = ["LoraConfig", "AdapterConfig", "PromptTuningConfig", "PrefixTuningConfig", "VPTConfig",
           "BitFitConfig", "config_from_dict", "PEFT_TYPES"]

#: PEFT options fastpeft does not implement: loading a config that turns one on is refused
#: (silently ignoring it would give different outputs than PEFT).
_LORA_UNSUPPORTED = {
    "use_dora": (False, None), "fan_in_fan_out": (False, None), "layers_to_transform": (None,),
    "layers_pattern": (None,), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
    "lora_bias": (False, None), "exclude_modules": (None,), "layer_replication": (None,),
    "trainable_token_indices": (None,), "target_parameters": (None,), "use_qalora": (False, None),
    "alora_invocation_tokens": (None,), "use_bdlora": (None, False),
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class _Config:
    peft_type = ""  # class attribute, not a field

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["peft_type"] = self.peft_type
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "_Config":
        d = dict(d)
        pt = d.pop("peft_type", cls.peft_type)
        _check(pt == cls.peft_type, f"peft_type: expected {cls.peft_type!r} for {cls.__name__}, got {pt!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def is_prompt_learning(self) -> bool:
        return False


def _jsonable(v):
    if isinstance(v, (set, tuple)):
        return sorted(v) if isinstance(v, set) else list(v)
    return v


@dataclass
class LoraConfig(_Config):
    """LoRA (``W x + (alpha/r)·B A x``). Same fields and meanings as ``peft.LoraConfig``.

    target_modules: a list of module-name suffixes (``"q_proj"`` matches ``...attn.q_proj``), a
        regex string (full match against the module's full name), or ``"all-linear"`` (every
        nn.Linear except the output head). None: the model family's usual attention projections.
    bias: "none", "all" (train every bias of the model) or "lora_only" (biases of adapted layers).
    modules_to_save: names of extra modules trained fully and saved (e.g. a new classifier head).
    """
    peft_type = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[List[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[List[str]] = None
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None

    def __post_init__(self):
        _check(isinstance(self.r, int) and self.r >= 1, f"r: expected a positive int, got {self.r!r}")
        _check(0.0 <= float(self.lora_dropout) < 1.0, f"lora_dropout: expected [0, 1), got {self.lora_dropout!r}")
        _check(self.bias in ("none", "all", "lora_only"),
               f"bias: expected 'none', 'all' or 'lora_only', got {self.bias!r}")
        _check(self.init_lora_weights in (True, False) or (isinstance(self.init_lora_weights, str) and
               self.init_lora_weights.lower() == "gaussian"),
               f"init_lora_weights: expected True, False or 'gaussian', got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = list(self.target_modules)

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        # PEFT's defaults for the options fastpeft leaves off, so PEFT reads exactly this config
        d.update(fan_in_fan_out=False, use_dora=False, rank_pattern={}, alpha_pattern={}, lora_bias=False,
                 layers_to_transform=None, layers_pattern=None, exclude_modules=None)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LoraConfig":
        for k, allowed in _LORA_UNSUPPORTED.items():
            if k in d and not any(d[k] == a for a in allowed):
                raise ValueError(f"{k}: fastpeft does not support PEFT's {k}={d[k]!r} "
                                 f"(supported: {allowed[0]!r})")
        return super().from_dict(d)


@dataclass
class AdapterConfig(_Config):
    """Bottleneck adapters: ``kind`` "houlsby" (after attention and FFN outputs), "pfeiffer"
    (after the FFN output) or "parallel" / "adaptformer" (beside the MLP, reading the residual).

    bottleneck: m; or reduction_factor: m = hidden // reduction_factor (give one, not both;
        neither means 64). activation / scaling / dropout / init: see ``fastpeft.Adapter``;
        scaling None means the kind's default (1.0 sequential, 0.1 parallel).
    """
    peft_type = "ADAPTER"
    kind: str = "houlsby"
    bottleneck: Optional[int] = None
    reduction_factor: Optional[float] = None
    activation: str = "relu"
    scaling: Optional[float] = None
    dropout: float = 0.0
    init: str = "lora"
    modules_to_save: Optional[List[str]] = None

    def __post_init__(self):
        kinds = ("houlsby", "pfeiffer", "parallel", "adaptformer")
        _check(self.kind in kinds, f"kind: expected one of {kinds}, got {self.kind!r}")
        _check(self.bottleneck is None or self.reduction_factor is None,
               f"bottleneck / reduction_factor: give one, not both (got {self.bottleneck!r}, "
               f"{self.reduction_factor!r})")
        _check(self.bottleneck is None or (isinstance(self.bottleneck, int) and self.bottleneck >= 1),
               f"bottleneck: expected a positive int, got {self.bottleneck!r}")
        _check(self.reduction_factor is None or self.reduction_factor > 0,
               f"reduction_factor: expected > 0, got {self.reduction_factor!r}")
        _check(0.0 <= float(self.dropout) < 1.0, f"dropout: expected [0, 1), got {self.dropout!r}")

    def bottleneck_for(self, hidden: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        if self.reduction_factor is not None:
            return max(1, int(hidden // self.reduction_factor))
        return 64

    @property
    def placement(self) -> str:
        return "parallel" if self.kind == "adaptformer" else self.kind

    def module_scaling(self) -> float:
        if self.scaling is not None:
            return float(self.scaling)
        return 0.1 if self.placement == "parallel" else 1.0


@dataclass
class _PromptConfig(_Config):
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


@dataclass
class PromptTuningConfig(_PromptConfig):
    """Prompt tuning (Lester et al.): ``num_virtual_tokens`` learned embeddings prepended to the
    input embeddings. Only ``prompt_tuning_init="RANDOM"`` (PEFT's TEXT init needs a tokenizer)."""
    peft_type = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        _check(str(self.prompt_tuning_init).upper() == "RANDOM",
               f"prompt_tuning_init: fastpeft supports 'RANDOM', got {self.prompt_tuning_init!r}")


@dataclass
class PrefixTuningConfig(_PromptConfig):
    """Prefix tuning (Li & Liang): learned key/value prefixes for every attention layer.

    ``prefix_projection``: reparametrise through a 2-layer MLP of width ``encoder_hidden_size``
    while training; the checkpoint stores the projected prefixes (as PEFT does)."""
    peft_type = "PREFIX_TUNING"
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False


@dataclass
class VPTConfig(_Config):
    """Visual prompt tuning (Jia et al.) for fastpeft's ViT: ``num_prompts`` learned tokens
    after [CLS]; ``deep`` re-initialises them before every block (VPT-deep)."""
    peft_type = "VPT"
    num_prompts: int = 10
    deep: bool = False
    dropout: float = 0.0
    modules_to_save: Optional[List[str]] = None

    def __post_init__(self):
        _check(isinstance(self.num_prompts, int) and self.num_prompts >= 1,
               f"num_prompts: expected a positive int, got {self.num_prompts!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True


@dataclass
class BitFitConfig(_Config):
    """BitFit (Ben Zaken et al.): train only the biases (LayerNorm's β included), base weights
    frozen. The output head's bias is left out (count it in with ``modules_to_save``)."""
    peft_type = "BITFIT"
    modules_to_save: Optional[List[str]] = None


PEFT_TYPES = {c.peft_type: c for c in (LoraConfig, AdapterConfig, PromptTuningConfig, PrefixTuningConfig,
                                       VPTConfig, BitFitConfig)}


def config_from_dict(d: Dict[str, Any], source: str = "config") -> _Config:
    """Build the right config from an ``adapter_config.json`` dict; errors name ``source``."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    pt = d.get("peft_type")
    if pt not in PEFT_TYPES:
        raise ValueError(f"{source}: key 'peft_type': unknown peft_type {pt!r} "
                         f"(fastpeft knows {sorted(PEFT_TYPES)})")
    try:
        return PEFT_TYPES[pt].from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e

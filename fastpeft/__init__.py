"""fastpeft: parameter-efficient fine-tuning as fast as the frozen model underneath it.

Functional ops (``lora_linear``, ``dora_linear``, ``adapter``, ``prefix_attention``), drop-in layers
(``LoRALinear``, ``Adapter``, ...), a model-level API (``get_peft_model``, ...) and
``backends()`` / ``python -m fastpeft info`` to see which backends work here.

Public names are imported lazily (PEP 562), so ``import fastpeft`` stays cheap and never
fails because an optional part (a compiled backend, triton) is missing.
"""
from __future__ import annotations

import importlib

from fastpeft._backend import backends, info, select_backend

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    # LoRA
    "lora_linear": "fastpeft.ops.lora",
    "LoRALinearFunction": "fastpeft.ops.lora",
    "LoRALinear": "fastpeft.modules.lora",
    "LoRAEmbedding": "fastpeft.modules.lora_layers",
    "LoRAConv2d": "fastpeft.modules.lora_layers",
    # many LoRA adapters in one batch
    "multi_lora_linear": "fastpeft.ops.multi_lora",
    "MultiLoRALinearFunction": "fastpeft.ops.multi_lora",
    "stack_lora_weights": "fastpeft.ops.multi_lora",
    "MultiLoRALinear": "fastpeft.modules.multi_lora",
    # DoRA (LoRALinear(use_dora=True) at the layer level)
    "dora_linear": "fastpeft.ops.dora",
    "DoRALinearFunction": "fastpeft.ops.dora",
    # adapters
    "adapter": "fastpeft.ops.adapter",
    "AdapterFunction": "fastpeft.ops.adapter",
    "Adapter": "fastpeft.modules.adapter",
    "ParallelAdapter": "fastpeft.modules.adapter",
    # prompt-side methods
    "prefix_attention": "fastpeft.ops.prefix_attention",
    "PrefixAttentionFunction": "fastpeft.ops.prefix_attention",
    "PromptTuning": "fastpeft.modules.prompt",
    "VPT": "fastpeft.modules.vpt",
    "PrefixEncoder": "fastpeft.modules.prefix",
    "PTuningV2": "fastpeft.modules.prefix",
    # model-level API
    "LoraConfig": "fastpeft.config",
    "AdapterConfig": "fastpeft.config",
    "PromptTuningConfig": "fastpeft.config",
    "PrefixTuningConfig": "fastpeft.config",
    "VPTConfig": "fastpeft.config",
    "BitFitConfig": "fastpeft.config",
    "get_peft_model": "fastpeft.peft_model",
    "PeftModel": "fastpeft.peft_model",
    "patch_peft": "fastpeft.interop",
}

__all__ = ["backends", "info", "select_backend", *_LAZY]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None and name.endswith("Config") and not name.startswith("_"):
        mod = "fastpeft.config"  # configs of methods added as plug-ins (fastpeft/methods/)
        try:
            value = getattr(importlib.import_module(mod), name)
        except AttributeError:
            mod = None
        else:
            globals()[name] = value
            return value
    if mod is None:
        raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

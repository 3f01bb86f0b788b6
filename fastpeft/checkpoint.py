"""Reading and writing PEFT-format adapter checkpoints, with validation.

A checkpoint directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (the
layout of Hugging Face PEFT). Every problem is reported as a ``ValueError`` (or
``FileNotFoundError``) naming the file and, where there is one, the key; callers validate the
whole checkpoint before assigning anything, so a bad file leaves the model untouched.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Tuple

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "read_config", "read_weights", "write_checkpoint", "validate_state"]


def read_config(directory: str) -> Tuple[dict, str]:
    """``-> (dict, path)`` of ``directory/adapter_config.json``; errors name the file."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter config not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt adapter config (not valid JSON: {e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d, path


def read_weights(directory: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """``-> ({key: tensor}, path)`` of ``directory/adapter_model.safetensors`` (loaded on CPU)."""
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter weights not found")
    try:
        return load_file(path, device="cpu"), path
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e


def write_checkpoint(directory: str, config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    # safetensors refuses shared / non-contiguous storage: save independent contiguous copies
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def validate_state(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: str,
                   optional: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Check that ``tensors`` has exactly the keys of ``expected`` (plus any of ``optional``) with
    the same shapes, floating dtypes and finite values. Raises ``ValueError`` naming ``path`` and
    the first bad key."""
    optional = optional or {}
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in tensors if k not in expected and k not in optional]
    if unexpected:
        raise ValueError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all; "
                         "the checkpoint does not match this model/config)")
    for k, ref in {**expected, **{k: v for k, v in optional.items() if k in tensors}}.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: key {k!r}: expected shape {tuple(ref.shape)}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{path}: key {k!r}: expected a floating tensor, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: key {k!r}: contains NaN or inf values")

"""Reading and writing PEFT-format adapter checkpoints, with validation.

A checkpoint directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (the
layout of Hugging Face PEFT). Every problem is reported as a ``ValueError`` (or
``FileNotFoundError``) naming the file and, where there is one, the key; callers validate the
whole checkpoint before assigning anything, so a bad file leaves the model untouched.

Writes are atomic per file and ordered so that a crash at any point leaves either the previous
complete checkpoint, or one without ``adapter_config.json`` (which does not load: "adapter config
not found"), or the new complete one - never a half-written file that loads. Each file is written
under a temporary name in the same directory, flushed to disk, then renamed over the final name
(``os.replace`` is atomic on POSIX and Windows); an old config is removed before the new weights
are renamed in, and the new config is renamed in last.

The weights file carries a checksum of its tensors in its safetensors metadata
(``fastpeft.sha256``; PEFT ignores it), so corrupt bytes inside a tensor are reported as such
instead of loading as wrong weights. Files without it (written by PEFT) are checked structurally
only: safetensors' own header/length checks catch truncation.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, Mapping, Optional, Tuple

import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CHECKSUM_KEY = "fastpeft.sha256"

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "read_config", "read_weights", "write_checkpoint", "validate_state",
           "tensors_sha256", "atomic_write"]


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


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, raw bytes) of every tensor, in key order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_weights(directory: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """``-> ({key: tensor}, path)`` of ``directory/adapter_model.safetensors`` (loaded on CPU);
    verifies the fastpeft checksum when the file has one."""
    from safetensors import safe_open

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter weights not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e
    want = meta.get(CHECKSUM_KEY)
    if want is not None and tensors_sha256(tensors) != want:
        raise ValueError(f"{path}: corrupt safetensors file (tensor bytes do not match the {CHECKSUM_KEY} "
                         "checksum written with it)")
    return tensors, path


def _staged(path: str, write) -> str:
    """``write(tmp)`` to a fresh temporary file next to ``path``, flushed to disk; ``-> tmp``
    (removed again if ``write`` fails)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(directory: str) -> None:
    try:  # makes the renames themselves durable; not every platform / filesystem allows it
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, flush it to disk, then rename
    it over ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    tmp = _staged(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_checkpoint(directory: str, config: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``
    atomically (see the module docstring for the crash guarantees)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    # safetensors refuses shared / non-contiguous storage: save independent contiguous copies
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": "pt", CHECKSUM_KEY: tensors_sha256(flat)}
    text = json.dumps(config, indent=2, sort_keys=True)
    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    # 1. stage both files: a failure here (disk full, a bad tensor) leaves the old checkpoint whole
    w_tmp = _staged(w_path, lambda tmp: save_file(flat, tmp, metadata=meta))
    try:
        c_tmp = _staged(cfg_path, write_config)
    except BaseException:
        _remove_quietly(w_tmp)
        raise
    # 2. commit: old config out first, so that until the new config is renamed in (last) the
    #    directory does not load at all, rather than loading new weights under an old config
    try:
        if os.path.lexists(cfg_path):
            os.remove(cfg_path)
        os.replace(w_tmp, w_path)
        os.replace(c_tmp, cfg_path)
    except BaseException:
        _remove_quietly(w_tmp)
        _remove_quietly(c_tmp)
        raise
    _fsync_dir(directory)


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

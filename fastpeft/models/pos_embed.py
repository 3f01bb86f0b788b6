"""2-D interpolation of learned position embeddings (fine-tuning at a higher resolution).

A ViT built for a ``gh x gw`` patch grid has ``pos_embed`` of shape ``(1, n_prefix + gh*gw, D)``:
``n_prefix`` prefix rows ([CLS], distillation token, ...) followed by one row per patch in
row-major order. To feed a larger (or non-square) image, the patch rows are reshaped to a
``(D, gh, gw)`` image and resized bicubically to the new grid; prefix rows are not spatial and
are kept as they are.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from fastpeft._validate import check_tensor

__all__ = ["interpolate_pos_embed", "grid_size", "resize_pos_embed"]


def _pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(s, int) and s > 0 for s in v)):
        raise ValueError(f"{name}: expected a positive int or a pair of positive ints, got {v!r}")
    return int(v[0]), int(v[1])


def grid_size(image_size, patch_size) -> Tuple[int, int]:
    """Patch grid ``(rows, cols)`` of an image of ``image_size`` (int or (H, W)) cut into patches.

    Raises ValueError when the image does not divide into whole patches.
    """
    h, w = _pair(image_size, "image_size")
    ph, pw = _pair(patch_size, "patch_size")
    if h % ph or w % pw:
        raise ValueError(f"image_size: expected a multiple of patch_size {(ph, pw)}, got {(h, w)}")
    return h // ph, w // pw


def interpolate_pos_embed(pos_embed: torch.Tensor, old_grid, new_grid, n_prefix: int = 1,
                          mode: str = "bicubic") -> torch.Tensor:
    """Resize position embeddings from one patch grid to another.

    Args:
        pos_embed: ``(1, n_prefix + gh*gw, D)`` (a leading dim other than 1 is accepted too).
        old_grid: ``(gh, gw)`` (or an int for a square grid) the embeddings were learned for.
        new_grid: ``(nh, nw)`` the result is for.
        n_prefix: leading non-spatial rows ([CLS], ...) copied through untouched.
        mode: ``F.interpolate`` mode ("bicubic", "bilinear", "nearest", ...).

    Returns:
        ``(1, n_prefix + nh*nw, D)`` in ``pos_embed``'s dtype. The resize is computed in float32
        (bicubic in bf16/fp16 loses precision and is not implemented everywhere). When the grid
        is unchanged the input itself is returned, so the call is free and keeps autograd intact.
    """
    gh, gw = _pair(old_grid, "old_grid")
    nh, nw = _pair(new_grid, "new_grid")
    if not isinstance(n_prefix, int) or n_prefix < 0:
        raise ValueError(f"n_prefix: expected a non-negative int, got {n_prefix!r}")
    check_tensor("pos_embed", pos_embed, ndim=3)
    if pos_embed.shape[1] != n_prefix + gh * gw:
        raise ValueError(f"pos_embed: expected shape (*, {n_prefix + gh * gw}, *) for n_prefix={n_prefix} "
                         f"and grid {(gh, gw)}, got {tuple(pos_embed.shape)}")
    if (gh, gw) == (nh, nw):
        return pos_embed
    b, _, d = pos_embed.shape
    prefix, grid = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    # (B, gh*gw, D) -> (B, D, gh, gw): channels-first image for F.interpolate
    grid = grid.float().reshape(b, gh, gw, d).permute(0, 3, 1, 2)
    kw = {} if mode in ("nearest", "area", "nearest-exact") else {"align_corners": False}
    grid = F.interpolate(grid, size=(nh, nw), mode=mode, **kw)
    grid = grid.permute(0, 2, 3, 1).reshape(b, nh * nw, d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def resize_pos_embed(model, image_size):
    """Permanently resize a ViT's ``pos_embed`` for ``image_size`` (int or (H, W)); returns the model.

    For fine-tuning at a higher resolution: call before building the optimizer. Delegates to
    ``model.set_image_size`` (:class:`fastpeft.models.ViT`), which interpolates with
    :func:`interpolate_pos_embed` and keeps [CLS]'s row apart.
    """
    if not hasattr(model, "set_image_size"):
        raise ValueError(f"model: expected a fastpeft.models.ViT (with set_image_size), got {type(model).__name__}")
    model.set_image_size(image_size)
    return model

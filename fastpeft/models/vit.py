"""A plain Vision Transformer (ViT) with timm-style module names.

Names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.attn.qkv``,
``blocks.i.attn.proj``, ``blocks.i.mlp.fc1``/``fc2``, ``norm``, ``head``) so ``target_modules``
written for timm models work here. Two hooks exist for PEFT methods:

* ``Block.forward(x, prefix_kv=None)``: learned key/value prefixes (prefix tuning) are passed
  to the block's attention, which then runs the fused ``fastpeft.prefix_attention`` op.
* ``Block.parallel_adapter``: an optional module called as ``parallel_adapter(x, residual=h)``
  beside the MLP (AdaptFormer).

``num_prefix_tokens`` counts the tokens in front of the patch tokens (1 for [CLS]); VPT raises
it when it inserts prompt tokens so that mean pooling skips them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.models.pos_embed import grid_size, interpolate_pos_embed

__all__ = ["ViTConfig", "ViT", "Block", "Attention", "Mlp", "PatchEmbed"]

PrefixKV = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class ViTConfig:
    """Shape of a ViT. ``image_size`` may be an int or ``(H, W)``; ``pool`` is "cls" or "mean"."""

    image_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    pool: str = "cls"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool: expected 'cls' or 'mean', got {self.pool!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim: expected a multiple of heads={self.heads}, got {self.dim}")
        grid_size(self.image_size, self.patch_size)  # validates divisibility

    @property
    def grid(self) -> Tuple[int, int]:
        """Patch grid ``(rows, cols)`` of the image size the model is built for."""
        return grid_size(self.image_size, self.patch_size)

    @classmethod
    def tiny(cls, **kw) -> "ViTConfig":
        """ViT-Ti: dim 192, 3 heads, MLP 768, depth 12 (override any field with keywords)."""
        return cls(**{**dict(dim=192, heads=3, mlp_dim=768, depth=12), **kw})

    @classmethod
    def small(cls, **kw) -> "ViTConfig":
        """ViT-S: dim 384, 6 heads, MLP 1536, depth 12."""
        return cls(**{**dict(dim=384, heads=6, mlp_dim=1536, depth=12), **kw})

    @classmethod
    def base(cls, **kw) -> "ViTConfig":
        """ViT-B: dim 768, 12 heads, MLP 3072, depth 12."""
        return cls(**{**dict(dim=768, heads=12, mlp_dim=3072, depth=12), **kw})


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: ``(B, C, H, W) -> (B, H/p * W/p, dim)`` (row-major)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Returns the tokens ``(B, N, dim)`` and the patch grid ``(rows, cols)`` they came from."""
        x = self.proj(images)  # (B, dim, rows, cols)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    ``forward(x (B,T,dim), prefix_kv=None) -> (B,T,dim)``. ``prefix_kv = (prefix_k, prefix_v)``,
    each ``(Bp, heads, P, head_dim)`` with Bp 1 or B, are extra keys/values every query attends
    to (prefix tuning); they are never concatenated to k/v in memory.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, prefix_kv: Optional[PrefixKV] = None) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, 3*dim) -> 3 x (B, heads, T, head_dim)
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if prefix_kv is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # imported here: the op lives in another module and is only needed for prefix tuning
            from fastpeft.ops.prefix_attention import prefix_attention

            out = prefix_attention(q, k, v, prefix_kv[0], prefix_kv[1])
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``: dim -> hidden -> dim."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block.

    ``x = x + attn(norm1(x), prefix_kv)``; ``h = x + mlp(norm2(x))``; returns ``h``, or
    ``parallel_adapter(x, residual=h)`` when an AdaptFormer adapter is attached.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)
        self.parallel_adapter: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor, prefix_kv: Optional[PrefixKV] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), prefix_kv=prefix_kv)
        h = x + self.mlp(self.norm2(x))
        return h if self.parallel_adapter is None else self.parallel_adapter(x, residual=h)


class ViT(nn.Module):
    """Vision Transformer: ``images (B, C, H, W) -> logits (B, num_classes)``.

    Images larger (or differently shaped) than ``config.image_size`` work: the position
    embeddings are interpolated on the fly (bicubic, fp32). :meth:`set_image_size` makes such a
    resize permanent, which is what fine-tuning at a higher resolution wants.
    """

    #: rows of ``pos_embed`` in front of the patch rows ([CLS]); fixed, unlike num_prefix_tokens
    pos_embed_prefix_tokens = 1

    def __init__(self, config: Optional[ViTConfig] = None, **kw):
        super().__init__()
        config = replace(config, **kw) if config is not None else ViTConfig(**kw)
        self.config = config
        c = config
        self.grid = c.grid
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], c.dim))
        self.blocks = nn.ModuleList(
            Block(c.dim, c.heads, c.mlp_dim, c.qkv_bias, c.layer_norm_eps) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.dim, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """timm's init: truncated normal(0.02) for weights and pos_embed, zero biases, tiny [CLS]."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # patch embedding as a linear layer on flattened patches (as in timm / JAX ViT)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, 1 + N, dim)``: [CLS] + patch tokens, position embeddings added."""
        if images.dim() != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(f"images: expected shape (B, {self.config.in_chans}, H, W), "
                             f"got {tuple(images.shape)}")
        x, grid = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = interpolate_pos_embed(self.pos_embed, self.grid, grid, n_prefix=self.pos_embed_prefix_tokens)
        return x + pos

    def forward_features(self, images: torch.Tensor,
                         prefix_kv: Optional[Sequence[Optional[PrefixKV]]] = None) -> torch.Tensor:
        """``(B, C, H, W) -> (B, T, dim)`` after the final norm.

        ``prefix_kv``: optional per-block list of ``(prefix_k, prefix_v)`` (or None per block).
        """
        if prefix_kv is not None and len(prefix_kv) != len(self.blocks):
            raise ValueError(f"prefix_kv: expected one entry per block ({len(self.blocks)}), "
                             f"got {len(prefix_kv)}")
        x = self.embed(images)
        for i, blk in enumerate(self.blocks):
            x = blk(x, prefix_kv=None if prefix_kv is None else prefix_kv[i])
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim) -> (B, dim)``: the [CLS] token, or the mean of the tokens after the
        ``num_prefix_tokens`` prefix/prompt tokens."""
        if self.config.pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, dim) -> (B, num_classes)``."""
        return self.head(self.pool(tokens))

    def forward(self, images: torch.Tensor,
                prefix_kv: Optional[Sequence[Optional[PrefixKV]]] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(images, prefix_kv=prefix_kv))

    @torch.no_grad()
    def set_image_size(self, image_size: Union[int, Tuple[int, int]]) -> None:
        """Permanently resize ``pos_embed`` for ``image_size`` (bicubic interpolation, fp32).

        The parameter is replaced by a new ``nn.Parameter`` that keeps ``requires_grad``; build
        the optimizer after calling this.
        """
        new_grid = grid_size(image_size, self.config.patch_size)
        if new_grid == self.grid:
            self.config = replace(self.config, image_size=image_size)
            return
        old = self.pos_embed
        new = interpolate_pos_embed(old.detach(), self.grid, new_grid, n_prefix=self.pos_embed_prefix_tokens)
        self.pos_embed = nn.Parameter(new.clone(), requires_grad=old.requires_grad)
        self.grid = new_grid
        self.config = replace(self.config, image_size=image_size)

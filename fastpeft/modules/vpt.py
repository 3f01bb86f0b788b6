"""Visual Prompt Tuning (VPT, Jia et al. 2022) for :class:`fastpeft.models.ViT`.

``P`` learnable prompt tokens are inserted between [CLS] and the patch tokens, *after* the
position embeddings were added (prompts have no position). The token sequence a block sees is
``[CLS ; prompts ; patches]`` of length ``1 + P + N``.

* **shallow**: one prompt set ``(P, D)``, inserted before block 0, carried through every block.
* **deep**: one prompt set per block ``(depth, P, D)``; before block ``i`` the prompt slots are
  *replaced* by prompt set ``i`` (block ``i-1``'s prompt outputs are thrown away).

Pooling (``cls`` or ``mean``) never counts prompt tokens: ``vit.num_prefix_tokens`` is set to
``1 + P`` whenever the token sequence carries the prompts.

**Fast VPT-deep.** In deep VPT a prompt token's *output* from block ``i`` is discarded by block
``i+1``, so prompts matter only as keys/values of the attention in the block they enter. Block
``i`` therefore equals a prompt-free block whose attention also attends to the prefix

    prefix_k, prefix_v = K/V part of  attn.qkv(norm1(prompt_i))       each (Bp, heads, P, head_dim)

which is exactly ``Block.forward(x, prefix_kv=(prefix_k, prefix_v))`` with the fused
``fastpeft.prefix_attention`` op. The prompt tokens skip Q, the attention output projection, the
MLP and the attention-as-queries entirely, and without prompt dropout the prefix is computed once
per step for the whole batch (``Bp = 1``, never expanded; its gradient sums over the batch). With
prompt dropout every sample has its own prompts, so ``Bp = B``. The last block's prompt outputs
are excluded from pooling in the concatenation path, so dropping them is exact there too: the
fast path's tokens are ``[CLS ; patches]`` (``num_prefix_tokens = 1``) and pool to the same
vectors. The fast path matches the concatenation reference (``fast=False``) to fp32 rounding in
the logits and in every gradient (prompts, head and any other trainable parameter).

Prompt dropout is per sample (each sample draws its own mask over its ``(P, D)`` prompts) and uses
the counter-based hash of :mod:`fastpeft._dropout` with one seed per block per step, drawn in
block order from torch's generator, so both paths see identical masks for the same
``torch.manual_seed``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft._dropout import dropout_with_seed, new_seed
from fastpeft._validate import check_dropout

__all__ = ["VPT", "vpt_init_bound"]


def vpt_init_bound(patch_size: int, dim: int, in_chans: int = 3) -> float:
    """VPT's Xavier-uniform bound ``sqrt(6 / (in_chans·patch² + dim))`` (in_chans = 3 for RGB)."""
    return math.sqrt(6.0 / float(in_chans * patch_size * patch_size + dim))


class VPT(nn.Module):
    """A frozen ViT plus visual prompts; ``forward(images (B, C, H, W)) -> logits (B, classes)``.

    Args:
        vit: a :class:`fastpeft.models.ViT` (frozen here, in place; kept as ``self.vit``).
        num_prompts: P, prompt tokens per set.
        deep: one prompt set per block (deep) or one before block 0 (shallow).
        dropout: prompt dropout probability (per sample, training mode only).
        fast: deep only: run prompts as attention prefixes (see the module docstring) instead of
            concatenating tokens. Shallow VPT always concatenates (its prompt outputs are used).
        train_head: keep ``vit.head`` trainable (the usual VPT setting).

    Parameters: ``prompt_embeddings`` of shape ``(depth if deep else 1, P, D)``
    (ViT-B/16, deep, P=50: 12·50·768 = 460,800).
    """

    def __init__(self, vit: nn.Module, num_prompts: int, deep: bool = False, dropout: float = 0.0,
                 fast: bool = True, train_head: bool = True):
        super().__init__()
        if not isinstance(num_prompts, int) or isinstance(num_prompts, bool) or num_prompts < 1:
            raise ValueError(f"num_prompts: expected a positive int, got {num_prompts!r}")
        for attr in ("embed", "blocks", "norm", "head", "pool", "config"):
            if not hasattr(vit, attr):
                raise ValueError(f"vit: expected a fastpeft.models.ViT (missing {attr!r}), got {type(vit).__name__}")
        self.vit = vit
        self.num_prompts = num_prompts
        self.deep = bool(deep)
        self.dropout = check_dropout(dropout)
        vit.requires_grad_(False)
        if train_head:
            vit.head.requires_grad_(True)
        c = vit.config
        n_sets = len(vit.blocks) if self.deep else 1
        ref = vit.cls_token
        self.prompt_embeddings = nn.Parameter(
            torch.empty(n_sets, num_prompts, c.dim, device=ref.device, dtype=ref.dtype))
        self.reset_parameters()
        self._fast = False
        self.fast = fast  # the setter keeps vit.num_prefix_tokens in step

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``uniform(-v, v)``, ``v = sqrt(6 / (3·patch² + D))`` (VPT's init)."""
        c = self.vit.config
        v = vpt_init_bound(c.patch_size, c.dim, c.in_chans)
        nn.init.uniform_(self.prompt_embeddings, -v, v)

    # ---- configuration -------------------------------------------------------------------
    @property
    def fast(self) -> bool:
        return self._fast

    @fast.setter
    def fast(self, value: bool) -> None:
        self._fast = bool(value)
        # tokens after the blocks: [CLS ; prompts ; patches], or [CLS ; patches] on the fast deep path
        self.vit.num_prefix_tokens = self.num_prefix_tokens

    @property
    def uses_prefix_path(self) -> bool:
        """True when forward runs prompts as attention prefixes (fast deep VPT)."""
        return self.deep and self._fast

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patch tokens in :meth:`forward_features`' output."""
        return 1 if self.uses_prefix_path else 1 + self.num_prompts

    def num_prompt_parameters(self) -> int:
        return self.prompt_embeddings.numel()

    def extra_repr(self) -> str:
        return (f"num_prompts={self.num_prompts}, deep={self.deep}, dropout={self.dropout}, "
                f"fast={self._fast}")

    # ---- prompts -------------------------------------------------------------------------
    def prompts(self, i: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """Prompt set ``i`` as ``(Bp, P, D)``: Bp = 1 without dropout, else B per-sample dropped copies.

        Draws one dropout seed per call when dropout is active, so call it once per block in
        block order (both paths do).
        """
        p = self.prompt_embeddings[i].to(dtype)[None]  # (1, P, D)
        if self.training and self.dropout > 0.0:
            # per-sample masks: the hash runs over the logical (B*P, D) matrix of the expanded prompts
            p = dropout_with_seed(p.expand(batch, -1, -1), new_seed(), self.dropout)
        return p

    @staticmethod
    def prompt_kv(block: nn.Module, prompts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``prompts (Bp, P, D)`` -> ``(prefix_k, prefix_v)`` each ``(Bp, heads, P, head_dim)``.

        The keys/values the prompts have inside ``block``'s attention: ``norm1`` then the K/V rows
        of ``attn.qkv`` (a plain ``nn.Linear`` is sliced so Q is never computed; any other module,
        e.g. a LoRA-wrapped qkv, is called whole and its Q part dropped, so its own trainable
        parameters still get their exact gradients).
        """
        attn = block.attn
        h = block.norm1(prompts)
        bp, p, d = h.shape
        qkv = attn.qkv
        if type(qkv) is nn.Linear:
            kv = F.linear(h, qkv.weight[d:], None if qkv.bias is None else qkv.bias[d:])
        else:
            kv = qkv(h)[..., d:]
        # (Bp, P, 2D) -> 2 x (Bp, heads, P, head_dim); contiguous: tiny, and kernels like it
        k, v = kv.reshape(bp, p, 2, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        return k, v

    # ---- forward -------------------------------------------------------------------------
    def _features_concat(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: token concatenation. ``x (B, 1+N, D)`` embedded -> ``(B, 1+P+N, D)`` pre-norm."""
        b, P = x.shape[0], self.num_prompts
        for i, blk in enumerate(self.vit.blocks):
            if i == 0 or self.deep:
                p = self.prompts(i if self.deep else 0, b, x.dtype).expand(b, -1, -1)
                rest = x[:, 1:] if i == 0 else x[:, 1 + P:]  # deep: drop the previous prompt outputs
                x = torch.cat([x[:, :1], p, rest], dim=1)
            x = blk(x)
        return x

    def _features_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Fast deep path: ``x (B, 1+N, D)`` -> ``(B, 1+N, D)`` pre-norm; prompts only as K/V."""
        b = x.shape[0]
        for i, blk in enumerate(self.vit.blocks):
            x = blk(x, prefix_kv=self.prompt_kv(blk, self.prompts(i, b, x.dtype)))
        return x

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, T, D)`` after the final norm.

        T = 1 + P + N (prompts in the sequence), or 1 + N on the fast deep path; either way
        ``self.num_prefix_tokens`` tokens precede the N patch tokens.
        """
        x = self.vit.embed(images)
        x = self._features_prefix(x) if self.uses_prefix_path else self._features_concat(x)
        return self.vit.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, D)``: [CLS] or the mean of the patch tokens (never the prompts)."""
        return self.vit.pool(tokens)  # vit.num_prefix_tokens is kept in step by the ``fast`` setter

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.head(self.pool(self.forward_features(images)))

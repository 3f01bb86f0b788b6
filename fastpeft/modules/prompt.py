"""Prompt tuning (Lester et al. 2021): ``k`` learnable embeddings prepended to the input embeddings.

Layout matches HF PEFT's ``PromptEmbedding``: the learnable table is ``embedding: nn.Embedding(k, D)``,
so a PEFT checkpoint's ``prompt_embeddings`` tensor ``(k, D)`` is ``embedding.weight`` here
(PEFT saves it under the key ``prompt_embeddings``; the model-level API does that renaming).

Initialisation (PEFT's ``prompt_tuning_init``):

* ``"random"``: ``nn.Embedding``'s default, normal(0, 1)        (PEFT ``RANDOM``)
* ``"text"``:   rows copied from ``word_embeddings`` at ``init_token_ids`` (e.g. the tokenised
  class-label words), repeated then truncated to ``k`` rows       (PEFT ``TEXT``)
* ``"vocab"``:  rows copied from ``word_embeddings`` at ``k`` token ids drawn uniformly from the
  vocabulary                                                       (PEFT ``SAMPLE_VOCAB``)

:meth:`PromptTuning.prepend` builds the model inputs: prompt rows in front of ``inputs_embeds``,
ones in front of the attention mask (the prompt is always attended to), ``-100`` in front of
the labels (no loss on prompt positions). The model assigns positions ``0 .. k+S-1`` to the
prepended sequence, as PEFT does.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["PromptTuning", "Prepended"]

IGNORE_INDEX = -100


class Prepended(NamedTuple):
    """``inputs_embeds (B, k+S, D)``, ``attention_mask (B, k+S)`` or None, ``labels (B, k+S)`` or None."""

    inputs_embeds: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]


class PromptTuning(nn.Module):
    """``k`` learnable virtual-token embeddings of width ``token_dim``.

    Args:
        num_virtual_tokens: k.
        token_dim: D, the model's embedding width.
        init: "random", "text" or "vocab" (see the module docstring).
        word_embeddings: the model's (frozen) ``nn.Embedding`` (or its ``(V, D)`` weight); needed
            by "text" and "vocab".
        init_token_ids: token ids for "text" (a sequence of ints or a 1-D long tensor).
    """

    def __init__(self, num_virtual_tokens: int, token_dim: int, init: str = "random",
                 word_embeddings: Optional[Union[nn.Embedding, torch.Tensor]] = None,
                 init_token_ids: Optional[Union[Sequence[int], torch.Tensor]] = None):
        super().__init__()
        for name, val in (("num_virtual_tokens", num_virtual_tokens), ("token_dim", token_dim)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if init not in ("random", "text", "vocab"):
            raise ValueError(f"init: expected 'random', 'text' or 'vocab', got {init!r}")
        self.num_virtual_tokens, self.token_dim, self.init = num_virtual_tokens, token_dim, init
        weight = None
        if init != "random":
            if word_embeddings is None:
                raise ValueError(f"word_embeddings: expected the model's nn.Embedding for init={init!r}, got None")
            weight = word_embeddings.weight if isinstance(word_embeddings, nn.Embedding) else word_embeddings
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != token_dim:
                shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
                raise ValueError(f"word_embeddings: expected an nn.Embedding or weight of shape (V, {token_dim}), "
                                 f"got {shape}")
        kw = {} if weight is None else dict(device=weight.device, dtype=weight.dtype)
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **kw)
        if init == "text":
            self._init_from_ids(weight, self._text_ids(init_token_ids, weight.shape[0]))
        elif init == "vocab":
            if init_token_ids is not None:
                raise ValueError("init_token_ids: only used with init='text', got token ids with init='vocab'")
            ids = torch.randint(0, weight.shape[0], (num_virtual_tokens,), device=weight.device)
            self._init_from_ids(weight, ids)
        elif init_token_ids is not None:
            raise ValueError("init_token_ids: only used with init='text', got token ids with init='random'")

    def _text_ids(self, ids, vocab: int) -> torch.Tensor:
        if ids is None:
            raise ValueError("init_token_ids: expected token ids (e.g. the class-label words) for init='text', got None")
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("init_token_ids: expected at least one token id, got none")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"init_token_ids: expected ids in [0, {vocab}), got min {int(ids.min())} max {int(ids.max())}")
        k = self.num_virtual_tokens
        return ids.repeat(math.ceil(k / ids.numel()))[:k]  # repeat, then truncate to k (as PEFT)

    @torch.no_grad()
    def _init_from_ids(self, weight: torch.Tensor, ids: torch.Tensor) -> None:
        self.embedding.weight.copy_(weight.detach()[ids.to(weight.device)])

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}, init={self.init!r}"

    def forward(self, batch_size: Optional[int] = None) -> torch.Tensor:
        """The prompt: ``(k, D)``, or a ``(batch_size, k, D)`` expanded view."""
        w = self.embedding.weight
        return w if batch_size is None else w.unsqueeze(0).expand(batch_size, -1, -1)

    def prepend_ids(self, ids: torch.Tensor, value: int) -> torch.Tensor:
        """``(B, S) -> (B, k+S)`` with ``value`` in the k prompt positions (same dtype and device)."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids: expected a (B, S) tensor, got {shape}")
        pad = torch.full((ids.shape[0], self.num_virtual_tokens), value, dtype=ids.dtype, device=ids.device)
        return torch.cat([pad, ids], dim=1)

    def prepend(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> Prepended:
        """Prepend the prompt to a batch.

        Args:
            inputs_embeds: ``(B, S, D)`` (the prompt is cast to its dtype, as PEFT does).
            attention_mask: ``(B, S)`` (any dtype; 1/True = attend) or None -> ones prepended.
            labels: ``(B, S)`` token labels or None -> ``-100`` prepended.
        Returns:
            :class:`Prepended` ``(inputs_embeds (B, k+S, D), attention_mask (B, k+S) | None,
            labels (B, k+S) | None)``.
        """
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                or inputs_embeds.shape[-1] != self.token_dim:
            shape = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
            raise ValueError(f"inputs_embeds: expected shape (B, S, {self.token_dim}), got {shape}")
        b, s, _ = inputs_embeds.shape
        w = self.embedding.weight
        if inputs_embeds.device != w.device:
            raise ValueError(f"inputs_embeds: expected device {w.device} (the prompt's), got {inputs_embeds.device}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, s)):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape ({b}, {s}) to match inputs_embeds, got {shape}")
        prompt = self(b).to(inputs_embeds.dtype)
        embeds = torch.cat([prompt, inputs_embeds], dim=1)
        mask = None if attention_mask is None else self.prepend_ids(attention_mask, 1)
        lab = None if labels is None else self.prepend_ids(labels, IGNORE_INDEX)
        return Prepended(embeds, mask, lab)

"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): learned per-layer key/value prefixes.

Every attention layer attends to ``P`` extra keys/values ``(prefix_k, prefix_v)``, each
``(Bp, Hkv, P, head_dim)``, through the fused :func:`fastpeft.prefix_attention` op (the models'
``prefix_kv`` argument). The prefixes are never concatenated to the real keys/values and occupy no
positions: the real tokens keep position ids ``0 .. S-1``. With grouped-query attention the prefix
width is ``head_dim × num_kv_heads`` (not the model width).

Parameter layout (the same as HF PEFT's ``PrefixEncoder``, so checkpoints map key for key)::

    W = num_kv_heads * head_dim                      # PEFT's token_dim (PEFT shrinks it for GQA too)
    prefix_projection=False:
        embedding.weight   (P, num_layers * 2 * W)   # PEFT: prompt_encoder.<adapter>.embedding.weight
    prefix_projection=True (reparameterisation, training):
        embedding.weight   (P, token_dim)            # token_dim defaults to W, as in PEFT
        transform.0        Linear(token_dim, encoder_hidden_size)  + transform.1 Tanh
        transform.2        Linear(encoder_hidden_size, num_layers * 2 * W)
                                                     # PEFT: prompt_encoder.<adapter>.transform.{0,2}.{weight,bias}

A row of the flat ``(P, num_layers * 2 * W)`` table is read as ``(num_layers * 2, Hkv, head_dim)``:
layer ``l``'s keys are slot ``2l`` and its values slot ``2l + 1`` (PEFT's
``view(B, P, L*2, H, hd).permute(2, 0, 3, 1, 4).split(2)``). A saved PEFT prefix-tuning
checkpoint holds only ``prompt_embeddings`` ``(P, num_layers * 2 * W)``: the *output* table
(PEFT stores the projected prefixes), which loads into a folded (``prefix_projection=False``)
encoder's ``embedding.weight`` unchanged.

:meth:`PrefixEncoder.fold` computes ``transform(embedding.weight)`` once and replaces the
reparameterisation by that plain table, giving identical prefixes (no recomputation per step at
inference). One difference from PEFT + HF BERT: HF's BERT offsets the real tokens' position ids
by the cache length ``P`` when given ``past_key_values``; here positions are unaffected.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastpeft._validate import check_dropout

__all__ = ["PrefixEncoder", "PTuningV2"]

PrefixKV = Tuple[torch.Tensor, torch.Tensor]


def _pos_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return v


class PrefixEncoder(nn.Module):
    """Per-layer key/value prefixes, optionally reparameterised by an MLP.

    Args:
        num_layers: attention layers that get a prefix.
        num_kv_heads: key/value heads (Hkv; < query heads with grouped-query attention).
        head_dim: per-head width.
        num_virtual_tokens: P, prefix length (rows of ``embedding``).
        prefix_projection: reparameterise: ``Embedding(P, token_dim) -> Linear -> Tanh -> Linear``.
        encoder_hidden_size: the MLP's hidden width (512).
        token_dim: width of the reparameterisation's embedding; default ``num_kv_heads * head_dim``.

    ``forward()`` returns one ``(prefix_k, prefix_v)`` per layer, each ``(1, Hkv, P, head_dim)``.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int,
                 prefix_projection: bool = False, encoder_hidden_size: int = 512,
                 token_dim: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        self.num_layers = _pos_int("num_layers", num_layers)
        self.num_kv_heads = _pos_int("num_kv_heads", num_kv_heads)
        self.head_dim = _pos_int("head_dim", head_dim)
        self.num_virtual_tokens = _pos_int("num_virtual_tokens", num_virtual_tokens)
        self.prefix_width = num_kv_heads * head_dim
        self.token_dim = self.prefix_width if token_dim is None else _pos_int("token_dim", token_dim)
        self.encoder_hidden_size = _pos_int("encoder_hidden_size", encoder_hidden_size)
        self.prefix_projection = bool(prefix_projection)
        out = num_layers * 2 * self.prefix_width
        kw = dict(device=device, dtype=dtype)
        if self.prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, self.token_dim, **kw)
            self.transform = nn.Sequential(
                nn.Linear(self.token_dim, encoder_hidden_size, **kw),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, out, **kw),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out, **kw)
            self.transform = None

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"num_virtual_tokens={self.num_virtual_tokens}, prefix_projection={self.prefix_projection}")

    def table(self, prefix_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The flat prefixes: ``(1, P, num_layers*2*W)``, or ``(B, P', ...)`` for ``prefix_ids (B, P')``."""
        if prefix_ids is None:
            e = self.embedding.weight  # all rows in order: the shared prefix, Bp = 1
        else:
            if not isinstance(prefix_ids, torch.Tensor) or prefix_ids.dim() != 2 \
                    or prefix_ids.dtype not in (torch.int32, torch.int64):
                shape = (tuple(prefix_ids.shape), prefix_ids.dtype) if isinstance(prefix_ids, torch.Tensor) \
                    else type(prefix_ids).__name__
                raise ValueError(f"prefix_ids: expected a (B, P) integer tensor of rows in "
                                 f"[0, {self.num_virtual_tokens}), got {shape}")
            e = self.embedding(prefix_ids)
        t = self.transform(e) if self.prefix_projection else e
        return t if prefix_ids is not None else t.unsqueeze(0)

    def forward(self, batch_size: Optional[int] = None,
                prefix_ids: Optional[torch.Tensor] = None) -> List[PrefixKV]:
        """Per-layer ``(prefix_k, prefix_v)``, each ``(Bp, Hkv, P, head_dim)``.

        Args:
            batch_size: expand the shared prefix to ``Bp = batch_size`` (a view, no copy); by
                default ``Bp = 1``, which ``prefix_attention`` shares across the batch.
            prefix_ids: ``(B, P')`` rows of ``embedding`` per sample (e.g. one prefix per user with
                ``num_virtual_tokens = users * P``): per-sample prefixes, ``Bp = B``.
        """
        t = self.table(prefix_ids)
        bp, p = t.shape[0], t.shape[1]
        # (Bp, P, L*2*W) -> (L*2, Bp, Hkv, P, hd); one small copy so every layer's slice is contiguous
        kv = t.view(bp, p, self.num_layers * 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4).contiguous()
        if batch_size is not None:
            if prefix_ids is not None and batch_size != bp:
                raise ValueError(f"batch_size: expected {bp} (the rows of prefix_ids) or None, got {batch_size}")
            kv = kv.expand(-1, batch_size, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers)]

    @torch.no_grad()
    def fold(self) -> "PrefixEncoder":
        """Replace the reparameterisation by the plain table it produces (identical prefixes). In place."""
        if not self.prefix_projection:
            return self
        w = self.embedding.weight
        table = self.transform(w)  # (P, L*2*W)
        emb = nn.Embedding(self.num_virtual_tokens, table.shape[1], device=w.device, dtype=w.dtype)
        emb.weight.copy_(table)
        emb.weight.requires_grad_(w.requires_grad)
        self.embedding = emb
        self.transform = None
        self.prefix_projection = False
        return self


class PTuningV2(nn.Module):
    """P-tuning v2: deep prefixes on a frozen BERT-style encoder plus a trainable classification head.

    Args:
        model: a ``fastpeft.models.BertForSequenceClassification`` (its ``classifier`` is the head)
            or a ``BertModel`` (a new ``classifier: Linear(hidden, num_labels)`` is made; needs a pooler).
        num_virtual_tokens: P per layer.
        prefix_projection / encoder_hidden_size: see :class:`PrefixEncoder`.
        prefix_dropout: dropout on the prefixes in training (per sample, as P-tuning v2 does).
        num_labels: classes, for a ``BertModel``.

    ``forward(input_ids, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> logits
    (B, num_labels)``; the encoder is frozen (including its pooler); trainable: ``prefix_encoder``
    and ``classifier``. Padding masks cover the real tokens only; prefixes are always attended to.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int, prefix_projection: bool = False,
                 encoder_hidden_size: int = 512, prefix_dropout: float = 0.0, num_labels: Optional[int] = None):
        super().__init__()
        from fastpeft.models.bert import BertForSequenceClassification, BertModel

        self.model = model
        if isinstance(model, BertForSequenceClassification):
            if num_labels is not None and num_labels != model.num_labels:
                raise ValueError(f"num_labels: expected None or the model's {model.num_labels}, got {num_labels}")
        elif isinstance(model, BertModel):
            if model.pooler is None:
                raise ValueError("model: expected a BertModel with a pooler (add_pooling_layer=True), got none")
            c = model.config
            n = c.num_labels if num_labels is None else _pos_int("num_labels", num_labels)
            w = model.embeddings.word_embeddings.weight
            # registered here (not on the model) so the model's own state dict stays untouched
            self.dropout = nn.Dropout(c.classifier_dropout if c.classifier_dropout is not None
                                      else c.hidden_dropout_prob)
            self.classifier = nn.Linear(c.hidden_size, n, device=w.device, dtype=w.dtype)
            nn.init.normal_(self.classifier.weight, std=0.02)
            nn.init.zeros_(self.classifier.bias)
        else:
            raise ValueError(f"model: expected a fastpeft.models BertModel or BertForSequenceClassification, "
                             f"got {type(model).__name__}")
        model.requires_grad_(False)
        self.head.requires_grad_(True)
        c = self.encoder.config
        w = self.encoder.embeddings.word_embeddings.weight
        self.prefix_encoder = PrefixEncoder(
            c.num_hidden_layers, c.num_attention_heads, c.hidden_size // c.num_attention_heads,
            num_virtual_tokens, prefix_projection, encoder_hidden_size, device=w.device)
        self.prefix_dropout = check_dropout(prefix_dropout)

    @property
    def encoder(self) -> nn.Module:
        """The (frozen) ``BertModel``."""
        return self.model.bert if hasattr(self.model, "bert") else self.model

    @property
    def head(self) -> nn.Linear:
        """The trainable classifier: the model's own ``classifier``, or the one made here."""
        return self.model.classifier if hasattr(self.model, "classifier") else self.classifier

    def prefixes(self, batch: int, dtype: torch.dtype) -> List[PrefixKV]:
        """Per-layer prefixes in the model's dtype: ``Bp = 1``, or ``Bp = B`` with prefix dropout."""
        if self.training and self.prefix_dropout > 0.0:
            kv = self.prefix_encoder(batch_size=batch)
            return [(F.dropout(k.to(dtype), self.prefix_dropout, True),
                     F.dropout(v.to(dtype), self.prefix_dropout, True)) for k, v in kv]
        return [(k.to(dtype), v.to(dtype)) for k, v in self.prefix_encoder()]

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("input_ids / inputs_embeds: expected exactly one of them, got neither")
        dtype = self.encoder.embeddings.word_embeddings.weight.dtype
        kv = self.prefixes(ref.shape[0], dtype)
        if hasattr(self.model, "classifier"):  # BertForSequenceClassification: its pooler, dropout, classifier
            return self.model(input_ids, attention_mask, token_type_ids, inputs_embeds, prefix_kv=kv)
        out = self.model(input_ids, attention_mask, token_type_ids, inputs_embeds, prefix_kv=kv)
        return self.classifier(self.dropout(out.pooler_output))

"""Few-shot fine-tuning with prototypical networks (Snell et al. 2017).

A class prototype is the mean feature of its support examples; a query's logits are minus its
distances to the prototypes (squared Euclidean, or scaled cosine similarity). Training on
N-way K-shot episodes (:func:`sample_episode`) with :func:`prototypical_loss` fine-tunes the
backbone (or its adapters) for the task family; :class:`PrototypicalHead` classifies with
prototypes computed once from a support set.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["prototypes", "prototypical_logits", "prototypical_loss", "PrototypicalHead", "Episode", "sample_episode"]

METRICS = ("sqeuclidean", "cosine")


def prototypes(support: torch.Tensor, labels: torch.Tensor, n_way: Optional[int] = None) -> torch.Tensor:
    """``support (Ns, D)``, ``labels (Ns,)`` in ``[0, n_way)`` -> class means ``(n_way, D)``."""
    if support.dim() != 2 or labels.shape != support.shape[:1]:
        raise ValueError(f"support / labels: expected (N, D) and (N,), got {tuple(support.shape)} and "
                         f"{tuple(labels.shape)}")
    n_way = int(labels.max()) + 1 if n_way is None else n_way
    counts = torch.bincount(labels, minlength=n_way)
    if (counts[:n_way] == 0).any() or counts.numel() > n_way:
        raise ValueError(f"labels: expected every class 0..{n_way - 1} in the support set (and no other), "
                         f"got counts {counts.tolist()}")
    sums = torch.zeros(n_way, support.shape[1], dtype=support.dtype, device=support.device)
    sums = sums.index_add(0, labels, support)
    return sums / counts[:n_way].to(support.dtype).unsqueeze(1)


def prototypical_logits(query: torch.Tensor, protos: torch.Tensor, metric: str = "sqeuclidean",
                        scale: float = 1.0) -> torch.Tensor:
    """``query (Nq, D)``, ``protos (n_way, D)`` -> logits ``(Nq, n_way)``: ``-scale·‖q - c‖²`` or
    ``scale·cos(q, c)``."""
    if metric == "sqeuclidean":
        return -scale * torch.cdist(query.float(), protos.float()).pow(2).to(query.dtype)
    if metric == "cosine":
        return scale * F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).t()
    raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")


def prototypical_loss(query: torch.Tensor, query_labels: torch.Tensor, support: torch.Tensor,
                      support_labels: torch.Tensor, metric: str = "sqeuclidean", scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the queries against the support set's prototypes (one episode)."""
    protos = prototypes(support, support_labels)
    return F.cross_entropy(prototypical_logits(query, protos, metric, scale), query_labels)


class PrototypicalHead(nn.Module):
    """A head whose classes are prototypes: :meth:`fit` stores the support set's class means (a
    buffer, no gradient), ``forward(features (B, D)) -> logits (B, n_way)``."""

    def __init__(self, metric: str = "sqeuclidean", scale: float = 1.0):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        self.metric, self.scale = metric, float(scale)
        self.register_buffer("protos", None)

    @torch.no_grad()
    def fit(self, support: torch.Tensor, labels: torch.Tensor, n_way: Optional[int] = None) -> "PrototypicalHead":
        self.protos = prototypes(support.detach(), labels, n_way)
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.protos is None:
            raise RuntimeError("PrototypicalHead: call fit(support_features, labels) first")
        return prototypical_logits(features, self.protos, self.metric, self.scale)


class Episode(NamedTuple):
    """Indices into the dataset and episode labels ``0..n_way-1`` (``classes[i]`` is label i)."""
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor


def sample_episode(labels: torch.Tensor, n_way: int, k_shot: int, n_query: int,
                   generator: Optional[torch.Generator] = None) -> Episode:
    """An N-way K-shot episode from ``labels (N,)``: ``n_way`` random classes, ``k_shot`` support
    and ``n_query`` query examples of each (disjoint), relabelled ``0..n_way-1``."""
    classes = torch.unique(labels)
    counts = torch.stack([(labels == c).sum() for c in classes])
    ok = classes[counts >= k_shot + n_query]
    if len(ok) < n_way:
        raise ValueError(f"labels: expected {n_way} classes with at least {k_shot + n_query} examples each, "
                         f"got {len(ok)}")
    chosen = ok[torch.randperm(len(ok), generator=generator)[:n_way]]
    s, sl, q, ql = [], [], [], []
    for i, c in enumerate(chosen):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)[:k_shot + n_query]]
        s.append(idx[:k_shot])
        q.append(idx[k_shot:])
        sl.append(torch.full((k_shot,), i, dtype=torch.long))
        ql.append(torch.full((n_query,), i, dtype=torch.long))
    return Episode(torch.cat(s), torch.cat(sl), torch.cat(q), torch.cat(ql), chosen)

"""Linear (or MLP-k) probing of a frozen backbone, and a feature cache that runs it only once
(and can be saved to disk and reloaded)."""
from __future__ import annotations

import os
from typing import Callable, Iterable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fastpeft.strategies.freezing import freeze

__all__ = ["pool_tokens", "tokens_of", "LinearProbe", "FeatureCache"]

POOLS = ("cls", "mean", "last")


def pool_tokens(tokens: torch.Tensor, pool: str = "cls", num_prefix_tokens: int = 1,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, T, D) -> (B, D)``.

    ``"cls"``: token 0. ``"mean"``: mean of ``tokens[:, num_prefix_tokens:]``, so [CLS] and
    prompt tokens never count; ``mask`` ``(B, T - num_prefix_tokens)`` (1 = real token) restricts
    the mean to real tokens (text padding). ``"last"``: the last real token of each row (decoder-only
    models: the token that has seen the whole input); ``mask`` ``(B, T)`` or ``(B, T -
    num_prefix_tokens)`` marks real tokens (left or right padding), none means the last position.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens: expected shape (B, T, D), got {tuple(tokens.shape)}")
    if pool == "cls":
        return tokens[:, 0]
    if pool == "last":
        if mask is None:
            return tokens[:, -1]
        B, T = tokens.shape[:2]
        if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] not in (T, T - num_prefix_tokens):
            raise ValueError(f"mask: expected shape ({B}, {T}) or ({B}, {T - num_prefix_tokens}), got "
                             f"{tuple(mask.shape)}")
        real = mask.to(torch.bool)
        if real.shape[1] != T:  # prefix / prompt tokens in front are never padding
            real = torch.cat([real.new_ones(B, T - real.shape[1]), real], 1)
        if not real.any(1).all():
            raise ValueError("mask: every row needs at least one real token")
        last = T - 1 - real.flip(1).to(torch.int8).argmax(1)
        return tokens[torch.arange(B, device=tokens.device), last.to(tokens.device)]
    if pool != "mean":
        raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
    body = tokens[:, num_prefix_tokens:]
    if body.shape[1] == 0:
        raise ValueError(f"num_prefix_tokens: expected fewer than T={tokens.shape[1]} tokens, got {num_prefix_tokens}")
    if mask is None:
        return body.mean(dim=1)
    if tuple(mask.shape) != tuple(body.shape[:2]):
        raise ValueError(f"mask: expected shape {tuple(body.shape[:2])} (tokens after the "
                         f"{num_prefix_tokens} prefix tokens), got {tuple(mask.shape)}")
    m = mask.to(body.dtype).unsqueeze(-1)
    return (body * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def tokens_of(backbone: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The backbone's token features: ``forward_features`` (fastpeft / timm ViT), else
    ``last_hidden_state`` (fastpeft BERT, HF models; a HF model with a task head, e.g.
    ``LlamaForCausalLM``, runs its ``base_model``), else its first output."""
    if hasattr(backbone, "forward_features"):  # fastpeft / timm ViT: normed tokens
        return backbone.forward_features(*args, **kwargs)
    inner = getattr(backbone, "base_model", None)
    if isinstance(inner, nn.Module) and inner is not backbone and hasattr(backbone, "get_input_embeddings") \
            and type(backbone).__module__.startswith("transformers"):
        backbone = inner  # skip the task head: its hidden states are what probing wants
    out = backbone(*args, **kwargs)
    if hasattr(out, "last_hidden_state"):  # fastpeft BERT, HF models
        return out.last_hidden_state
    return out[0] if isinstance(out, (tuple, list)) else out


_default_tokens = tokens_of


class LinearProbe(nn.Module):
    """A frozen backbone + a trainable head on its pooled features.

    Args:
        backbone: model returning tokens ``(B, T, D)`` from ``forward_features`` (ViT) or as
            ``last_hidden_state`` / first output (BERT, HF); frozen and kept in eval mode.
        num_classes: outputs of the default head, a zero-initialised ``nn.Linear(dim, num_classes)``.
        pool: ``"cls"``, ``"mean"`` or ``"last"`` (decoder-only models; see :func:`pool_tokens`).
        num_prefix_tokens: tokens before the content skipped by mean pooling; None reads
            ``backbone.num_prefix_tokens`` at every call (VPT raises it), else 0.
        head: a head module to use instead (e.g. :class:`MLPHead` for MLP-k probing).
        dim: feature width; read from ``backbone.config`` (``dim`` / ``hidden_size``) when None.
        tokens_fn: ``tokens_fn(backbone, *args, **kwargs) -> (B, T, D)`` to override the above.

    ``forward(*args, **kwargs)`` passes its arguments to the backbone; an ``attention_mask``
    keyword also masks mean pooling.
    """

    def __init__(self, backbone: nn.Module, num_classes: Optional[int] = None, pool: str = "cls",
                 num_prefix_tokens: Optional[int] = None, head: Optional[nn.Module] = None,
                 dim: Optional[int] = None, tokens_fn: Optional[Callable[..., torch.Tensor]] = None):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
        self.backbone = backbone
        self.pool, self._num_prefix_tokens = pool, num_prefix_tokens
        self.tokens_fn = tokens_fn or _default_tokens
        if head is None:
            if num_classes is None:
                raise ValueError("num_classes: expected an int when no head is given, got None")
            if dim is None:
                cfg = getattr(backbone, "config", None)
                dim = getattr(cfg, "dim", None) or getattr(cfg, "hidden_size", None)
                if dim is None:
                    raise ValueError("dim: cannot be read from backbone.config; pass dim=")
            ref = next(backbone.parameters(), None)
            head = nn.Linear(dim, num_classes, device=None if ref is None else ref.device)
            with torch.no_grad():
                head.weight.zero_()
                head.bias.zero_()
        self.head = head
        freeze(backbone)
        backbone.eval()

    @property
    def num_prefix_tokens(self) -> int:
        if self._num_prefix_tokens is not None:
            return self._num_prefix_tokens
        return int(getattr(self.backbone, "num_prefix_tokens", 0))

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()  # frozen features: no dropout, ever
        return self

    @torch.no_grad()
    def features(self, *args, **kwargs) -> torch.Tensor:
        """Pooled backbone features ``(B, D)`` (no autograd graph: the backbone is frozen)."""
        mask = kwargs.get("attention_mask") if self.pool in ("mean", "last") else None
        tokens = self.tokens_fn(self.backbone, *args, **kwargs)
        n = self.num_prefix_tokens
        if self.pool == "last":
            return pool_tokens(tokens, "last", n, mask)
        if mask is not None and mask.shape[1] != tokens.shape[1] - n:
            mask = None if mask.shape[1] != tokens.shape[1] else mask[:, n:]
        return pool_tokens(tokens, self.pool, n, mask)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.head(self.features(*args, **kwargs))


_FORMAT = "fastpeft.FeatureCache/1"


def _read(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / not a torch file
        raise ValueError(f"{path}: not a readable feature cache ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a fastpeft feature cache (format {_FORMAT!r})")
    f, y = state.get("features"), state.get("labels")
    if not isinstance(f, torch.Tensor) or not isinstance(y, torch.Tensor) or f.dim() != 2 or len(f) != len(y):
        raise ValueError(f"{path}: expected features (N, D) and labels (N,)")
    return state


def _batches(data, batch_size: int) -> Iterable:
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


class FeatureCache:
    """Run a :class:`LinearProbe`'s frozen backbone once over a dataset; train its head on the
    cached features as often as wanted.

    Args:
        probe: the :class:`LinearProbe` (its ``features`` are cached and ``fit`` trains its
            head), or any callable ``inputs -> (B, D)`` features (then ``fit`` needs a ``head``).
        data: a ``Dataset`` of ``(input, label)`` (batched with ``batch_size``, in order), any
            iterable of ``(inputs, labels)`` batches (a DataLoader), or, with ``labels``, a
            tensor of all inputs ``(N, ...)``. ``inputs`` may be a tensor or a dict of keyword
            arguments for the backbone (e.g. BERT's ``input_ids`` / ``attention_mask``).
        labels: ``(N,)`` labels when ``data`` is a tensor of inputs.
        device: where ``features (N, D)`` and ``labels (N,)`` are kept (the features' device when None).
        path: a file to keep the cache in: when it exists (and its ``key`` matches) the features
            are read from it and the backbone does not run; otherwise they are computed and
            written there (:meth:`save` / :meth:`load` do the same by hand).
        key: any string identifying backbone + data (e.g. a checkpoint name); a cache file
            written with another key is recomputed.
    """

    def __init__(self, probe: Union[LinearProbe, Callable[..., torch.Tensor]], data: Union[Dataset, Iterable, torch.Tensor],
                 labels: Optional[torch.Tensor] = None, batch_size: int = 256,
                 device: Optional[Union[str, torch.device]] = None, path: Optional[str] = None,
                 key: Optional[str] = None):
        if not callable(probe):
            raise ValueError(f"probe: expected a LinearProbe or a features callable, got {type(probe).__name__}")
        self.probe = probe if isinstance(probe, LinearProbe) else None
        self.key = key
        if path is not None and os.path.isfile(path):
            state = _read(path)
            if state.get("key") == key:
                self._set(state, device)
                return
        if isinstance(probe, LinearProbe):
            features_fn = probe.features
        else:
            def features_fn(*args, **kwargs):
                with torch.no_grad():  # a frozen feature extractor: no graph to keep
                    return probe(*args, **kwargs)
        if labels is not None:
            if not isinstance(data, torch.Tensor) or len(data) != len(labels):
                raise ValueError(f"data: expected a tensor of {len(labels)} inputs to go with labels, "
                                 f"got {type(data).__name__} of length {len(data)}")
            data = [(data[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(data), batch_size)]
        feats: List[torch.Tensor] = []
        ys: List[torch.Tensor] = []
        if self.probe is not None:
            self.probe.eval()
        for batch in _batches(data, batch_size):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"data: expected (inputs, labels) batches, got {type(batch).__name__}")
            x, y = batch[0], batch[1]
            f = features_fn(**x) if isinstance(x, dict) else features_fn(x)
            feats.append(f if device is None else f.to(device))
            ys.append(torch.as_tensor(y, device=feats[-1].device))
        if not feats:
            raise ValueError("data: expected at least one batch, got none")
        self.features = torch.cat(feats)
        self.labels = torch.cat(ys)
        if path is not None:
            self.save(path)

    # ---- on disk ----------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write ``features``, ``labels`` and ``key`` to ``path`` (atomically: a partly written
        file never replaces a good one)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save({"format": _FORMAT, "features": self.features.detach().cpu(), "labels": self.labels.cpu(),
                    "key": self.key}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, probe: Optional[LinearProbe] = None,
             device: Optional[Union[str, torch.device]] = None) -> "FeatureCache":
        """A cache read from ``path`` (``probe``: the LinearProbe whose head ``fit`` trains)."""
        obj = cls.__new__(cls)
        obj.probe = probe if isinstance(probe, LinearProbe) else None
        state = _read(path)
        obj.key = state.get("key")
        obj._set(state, device)
        return obj

    def _set(self, state: dict, device) -> None:
        self.features, self.labels = state["features"], state["labels"]
        if device is not None:
            self.features, self.labels = self.features.to(device), self.labels.to(device)

    def __len__(self) -> int:
        return self.features.shape[0]

    def loader(self, batch_size: int = 256, shuffle: bool = False,
               generator: Optional[torch.Generator] = None) -> DataLoader:
        """A DataLoader over ``(feature (D,), label)`` pairs."""
        return DataLoader(TensorDataset(self.features, self.labels), batch_size=batch_size,
                          shuffle=shuffle, generator=generator)

    def _head(self, head: Optional[nn.Module]) -> nn.Module:
        if head is not None:
            return head
        if self.probe is None:
            raise ValueError("head: expected a head module (the cache was not built from a LinearProbe), got None")
        return self.probe.head

    def fit(self, epochs: int = 1, lr: float = 1e-3, batch_size: int = 256,
            optimizer: Optional[torch.optim.Optimizer] = None,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
            shuffle: bool = False, generator: Optional[torch.Generator] = None,
            head: Optional[nn.Module] = None) -> List[float]:
        """Train ``head`` (default ``probe.head``) on the cache (AdamW(lr, weight_decay=0) unless
        an optimizer is given); returns the loss of every step."""
        head = self._head(head)
        head.train()
        opt = optimizer or torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
        losses = []
        for _ in range(epochs):
            for f, y in self.loader(batch_size, shuffle, generator):
                loss = loss_fn(head(f), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

    @torch.no_grad()
    def accuracy(self, head: Optional[nn.Module] = None) -> float:
        """Top-1 accuracy of ``head`` (default ``probe.head``) on the cached features."""
        head = self._head(head)
        head.eval()
        return (head(self.features).argmax(-1) == self.labels).float().mean().item()

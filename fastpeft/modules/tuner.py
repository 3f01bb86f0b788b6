"""``TunerLayer``: the protocol every layer that holds named adapters follows.

The model level (``fastpeft.PeftModel``) drives these layers without knowing their method:
``set_adapter(names)`` (one or several active adapters), ``disable_adapters`` (run the base
layer), ``delete_adapter(name)``, ``adapter_names()``, ``adapter_parameters(name)`` and, for
mixed-adapter batches, ``batch_adapters``: one adapter name per row (``"__base__"``: no adapter)
while a ``PeftModel`` call with ``adapter_names=[...]`` runs.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["TunerLayer", "BASE"]

#: the row name that means "no adapter" in a mixed batch (PEFT's convention)
BASE = "__base__"


class TunerLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.active_adapters: List[str] = []
        self.disable_adapters = False
        self.batch_adapters: Optional[List[str]] = None

    # ---- to implement -----------------------------------------------------------------------
    def adapter_names(self) -> List[str]:
        raise NotImplementedError

    def delete_adapter(self, adapter_name: str) -> None:
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def unwrap(self, merge: bool) -> nn.Module:
        """The plain module that replaces this layer in ``merge_and_unload`` / ``unload``."""
        raise ValueError(f"{type(self).__name__}: cannot be unloaded into a plain module")

    # ---- shared -----------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return False

    @property
    def active_adapter(self) -> Optional[str]:
        """The first active adapter (a single-adapter view for older code)."""
        return self.active_adapters[0] if self.active_adapters else None

    @active_adapter.setter
    def active_adapter(self, name: Optional[str]) -> None:
        self.active_adapters = [] if name is None else [name]

    def set_adapter(self, names) -> None:
        """Activate ``names`` (a str or a list); names this layer does not hold are skipped when
        it runs (another method's adapter, or one that does not target this layer)."""
        self.active_adapters = [names] if isinstance(names, str) else list(names)

    def _running(self) -> List[str]:
        """Adapters this layer applies now (none while disabled)."""
        if self.disable_adapters:
            return []
        held = set(self.adapter_names())
        return [n for n in self.active_adapters if n in held]

    def _row_groups(self, batch: int) -> Iterator[Tuple[str, torch.Tensor]]:
        """For a mixed batch: ``(adapter, row indices)`` per adapter this layer holds."""
        names = self.batch_adapters
        if len(names) != batch:
            raise ValueError(f"adapter_names: expected one name per row ({batch}), got {len(names)}")
        held = set(self.adapter_names())
        order: Dict[str, List[int]] = {}
        for i, n in enumerate(names):
            order.setdefault(n, []).append(i)
        for n, rows in order.items():
            if n != BASE and n in held:
                yield n, torch.tensor(rows, dtype=torch.long)


def freeze_all_but(layer: TunerLayer, names: Sequence[str]) -> None:
    for n in layer.adapter_names():
        for p in layer.adapter_parameters(n):
            p.requires_grad_(n in names)

"""Bottleneck adapters as modules: ``Adapter`` (sequential) and ``ParallelAdapter`` (AdaptFormer).

Both hold ``down: nn.Linear(dim, bottleneck)`` and ``up: nn.Linear(bottleneck, dim)`` and run
the fused op ``fastpeft.adapter``:

* ``Adapter.forward(x, residual=None) = R + s·up(drop(act(down(x))))``, ``R = x`` unless a
  residual is given (Houlsby / Pfeiffer: placed after a sublayer's output projection).
* ``ParallelAdapter.forward(x, residual) = residual + s·up(drop(act(down(x))))``, where x is the
  block's residual stream and ``residual`` the MLP branch's output it is added to
  (AdaptFormer: ``x + mlp(norm(x)) + s·up(relu(down(x)))``).

Houlsby, Pfeiffer and AdaptFormer are named configurations of these modules
(:data:`ADAPTER_PLACEMENTS`, :data:`ADAPTER_DEFAULTS`); inserting them into a model belongs
to the model-level API.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from fastpeft.ops.adapter import adapter
from fastpeft.reference.adapter import ACTIVATIONS

#: placement name -> where adapters go in a transformer block:
#: "attn_out" = after the attention output projection, "ffn_out" = after the FFN output
#: projection (both sequential ``Adapter``s), "mlp_parallel" = a ``ParallelAdapter`` beside the MLP.
ADAPTER_PLACEMENTS: Dict[str, Tuple[str, ...]] = {
    "houlsby": ("attn_out", "ffn_out"),
    "pfeiffer": ("ffn_out",),
    "parallel": ("mlp_parallel",),
}
ADAPTER_PLACEMENTS["adaptformer"] = ADAPTER_PLACEMENTS["parallel"]

#: placement name -> default module keyword arguments for it
ADAPTER_DEFAULTS: Dict[str, dict] = {
    "houlsby": dict(bottleneck=64, activation="relu", scaling=1.0, init="lora"),
    "pfeiffer": dict(bottleneck=64, activation="relu", scaling=1.0, init="lora"),
    "parallel": dict(bottleneck=64, activation="relu", scaling=0.1, init="lora"),
}
ADAPTER_DEFAULTS["adaptformer"] = ADAPTER_DEFAULTS["parallel"]

INITS = ("lora", "bert")


class _AdapterBase(nn.Module):
    def __init__(self, dim: int, bottleneck: int = 64, activation: str = "relu",
                 scaling: float = 1.0, dropout: float = 0.0, init: str = "lora",
                 learn_scaling: Union[bool, str] = False, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck: expected a positive int, got {bottleneck!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        if learn_scaling not in (False, True, "scalar", "vector"):
            raise ValueError(f"learn_scaling: expected False, True/'scalar' (shape ()) or 'vector' "
                             f"(shape ({dim},)), got {learn_scaling!r}")
        self.dim, self.bottleneck, self.activation = dim, bottleneck, activation
        self.dropout, self.init, self.backend = float(dropout), init, backend
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        if learn_scaling:
            shape = (dim,) if learn_scaling == "vector" else ()
            self.scaling = nn.Parameter(torch.full(shape, float(scaling), device=device,
                                                   dtype=dtype or torch.get_default_dtype()))
        else:
            self.scaling = float(scaling)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``"lora"``: down kaiming-uniform(a=√5), up and both biases zero (exact identity);
        ``"bert"``: normal(0, 0.02) weights, zero biases."""
        if self.init == "lora":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def _run(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        return adapter(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                       activation=self.activation, scaling=self.scaling, residual=residual,
                       dropout_p=self.dropout, training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        s = self.scaling if isinstance(self.scaling, float) else f"learned{tuple(self.scaling.shape)}"
        return (f"dim={self.dim}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
                f"scaling={s}, dropout={self.dropout}, init={self.init!r}")


class Adapter(_AdapterBase):
    """Sequential bottleneck adapter (Houlsby / Pfeiffer): ``R + s·up(drop(act(down(x))))``.

    Args:
        dim: feature size d; bottleneck: m.
        activation: "relu", "gelu", "gelu_tanh", "silu" or "identity".
        scaling: s (a float; with ``learn_scaling`` its initial value).
        dropout: dropout on the bottleneck activation during training.
        init: "lora" (a fresh adapter is an exact identity) or "bert" (normal(0, 0.02)).
        learn_scaling: False, True / "scalar" (learned s of shape ()) or "vector" (shape (d,)).
        backend: force a backend (default: automatic).
    Shapes: x (..., dim); residual (..., dim) or None (then R = x) -> (..., dim).
    """

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._run(x, residual)


class ParallelAdapter(_AdapterBase):
    """Parallel adapter (AdaptFormer): ``residual + s·up(drop(act(down(x))))``.

    ``x`` is the block's residual stream (not the normed MLP input) and ``residual`` the
    output it is added to, e.g. ``x + mlp(norm(x))``. Same arguments as :class:`Adapter`,
    with ``scaling`` defaulting to 0.1.
    Shapes: x (..., dim); residual (..., dim) -> (..., dim).
    """

    def __init__(self, dim: int, bottleneck: int = 64, activation: str = "relu", scaling: float = 0.1,
                 dropout: float = 0.0, init: str = "lora", learn_scaling: Union[bool, str] = False,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__(dim, bottleneck, activation, scaling, dropout, init, learn_scaling, backend,
                         device, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if residual is None:
            raise ValueError("residual: ParallelAdapter needs the tensor its branch is added to "
                             "(e.g. x + mlp(norm(x))), got None")
        return self._run(x, residual)

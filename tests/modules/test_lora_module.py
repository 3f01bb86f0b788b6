"""fastpeft.LoRALinear: PEFT defaults, merge/unmerge, and equality with HF PEFT's LoRA layer."""
import math

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.testing import assert_close


def test_defaults_match_peft():
    base = nn.Linear(64, 48)
    layer = fastpeft.LoRALinear(base, r=8, lora_alpha=16)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (8, 64) and B.shape == (48, 8)
    assert torch.count_nonzero(B) == 0 and A.abs().max() <= 1 / math.sqrt(64) + 1e-6  # kaiming(a=√5) bound
    assert layer.scaling["default"] == 2.0
    assert fastpeft.LoRALinear(nn.Linear(8, 8), r=4, lora_alpha=8, use_rslora=True).scaling["default"] == 4.0
    g = fastpeft.LoRALinear(nn.Linear(64, 8), r=4, init_lora_weights="gaussian").lora_A["default"].weight
    assert abs(g.std().item() - 0.25) < 0.05
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: a new adapter changes nothing
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default.weight", "lora_B.default.weight"}


def test_bad_config_raises():
    with pytest.raises(ValueError, match="base_layer"):
        fastpeft.LoRALinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="r: expected a positive int"):
        fastpeft.LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="init_lora_weights"):
        fastpeft.LoRALinear(nn.Linear(4, 4), init_lora_weights="orthogonal-ish")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_merge_unmerge_100_cycles_exact(dtype):
    base = nn.Linear(96, 80).to(dtype)
    layer = fastpeft.LoRALinear(base, r=8, lora_alpha=16, init_lora_weights=False)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 96, dtype=dtype)
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), y_unmerged, dtype, "merged forward")
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # merged forward is the plain linear
    layer.unmerge()
    for _ in range(100):
        layer.merge()
        layer.unmerge()
    assert torch.equal(base.weight, w0), "merge/unmerge cycles must restore the weight bit for bit"


def test_merge_refuses_nonfinite():
    layer = fastpeft.LoRALinear(nn.Linear(8, 8), r=2, init_lora_weights=False)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.weight, w0) and not layer.merged


def test_disable_and_multiple_adapters():
    base = nn.Linear(16, 12)
    layer = fastpeft.LoRALinear(base, r=2, init_lora_weights=False)
    layer.update_layer("other", r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 16)
    y_default = layer(x)
    layer.set_adapter("other")
    y_other = layer(x)
    assert not torch.allclose(y_default, y_other)
    layer.disable_adapters = True
    torch.testing.assert_close(layer(x), base(x))
    with pytest.raises(ValueError, match="adapter_name"):
        layer.set_adapter("missing")


peft = pytest.importorskip("peft")


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_same_as_hf_peft(p, rslora):
    """The same weights in HF PEFT's LoRA layer give the same outputs and gradients.

    With dropout the masks differ (PEFT draws nn.Dropout's), so both sides are compared in
    eval mode for outputs and with p applied identically via a shared mask for gradients.
    """
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    torch.manual_seed(0)
    base_f = nn.Linear(48, 40)
    base_p = nn.Linear(48, 40)
    base_p.load_state_dict(base_f.state_dict())
    ours = fastpeft.LoRALinear(base_f, r=8, lora_alpha=16, lora_dropout=p, use_rslora=rslora,
                               init_lora_weights=False)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=p, use_rslora=rslora, init_lora_weights=False)
    theirs = PeftLinear(base_p, "default", config=cfg, r=8, lora_alpha=16, lora_dropout=p,
                        use_rslora=rslora, init_lora_weights=False)
    theirs.lora_A["default"].weight.data.copy_(ours.lora_A["default"].weight)
    theirs.lora_B["default"].weight.data.copy_(ours.lora_B["default"].weight)
    assert theirs.scaling["default"] == pytest.approx(ours.scaling["default"])
    x = torch.randn(2, 7, 48)
    if p > 0:  # same mask on both sides: feed PEFT's dropout the mask fastpeft draws
        from fastpeft import _dropout

        torch.manual_seed(3)
        seed = _dropout.new_seed(True)
        class SameMask(nn.Module):
            def forward(self, t):
                return _dropout.dropout_with_seed(t, seed, p)

        theirs.lora_dropout["default"] = SameMask()
        ours.train(), theirs.train()
    else:
        ours.eval(), theirs.eval()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(3)
    ya = ours(xa)
    yb = theirs(xb)
    assert_close(ya, yb, torch.float32, "y")
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert_close(xa.grad, xb.grad, torch.float32, "dx")
    for n in ("lora_A", "lora_B"):
        assert_close(getattr(ours, n)["default"].weight.grad, getattr(theirs, n)["default"].weight.grad,
                     torch.float32, f"d{n}")

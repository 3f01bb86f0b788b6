"""LoRA layers beyond nn.Linear: Embedding, Conv2d (3x3 strided, 1x1) and GPT-2's Conv1D, with the
same layer protocol: merge / unmerge exact, several active adapters, mixed batches."""
import pytest
import torch
from torch import nn

import fastpeft
import fastpeft._warn
from fastpeft.testing import assert_close


def _conv1d():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    return Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight (16, 24)


LAYERS = {
    "embedding": (lambda: fastpeft.LoRAEmbedding(nn.Embedding(20, 12, padding_idx=0), r=3, init_lora_weights=False),
                  lambda: torch.randint(0, 20, (4, 6))),
    "conv3x3": (lambda: fastpeft.LoRAConv2d(nn.Conv2d(3, 8, 3, stride=2, padding=1), r=2, init_lora_weights=False),
                lambda: torch.randn(4, 3, 9, 9)),
    "conv1x1": (lambda: fastpeft.LoRAConv2d(nn.Conv2d(6, 4, 1), r=2, init_lora_weights=False),
                lambda: torch.randn(4, 6, 5, 5)),
    "gpt2-conv1d": (lambda: fastpeft.LoRALinear(_conv1d(), r=4, init_lora_weights=False), lambda: torch.randn(4, 5, 16)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_unmerge_multi_active_and_mixed_batch(kind):
    make, inputs = LAYERS[kind]
    torch.manual_seed(1)
    layer = make()
    x = inputs()
    base_out = layer.base_layer(x)
    y = layer(x)
    assert not torch.allclose(y, base_out)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert_close(layer(x), y.detach(), torch.float32, "merged")
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)
    layer.update_layer("b", 2, 4.0, init_lora_weights=False)
    layer.set_adapter("b")
    y_b = layer(x)
    layer.set_adapter(["default", "b"])  # both: the updates add up
    assert_close(layer(x), y + y_b - base_out, torch.float32, "two active")
    layer.batch_adapters = ["b", "__base__", "default", "b"]
    mixed = layer(x)
    layer.batch_adapters = None
    for i, ref in enumerate([y_b, base_out, y, y_b]):
        assert_close(mixed[i], ref[i], torch.float32, f"row {i}")
    mixed.sum().backward()
    grads = [p.grad for n in ("default", "b") for p in layer.adapter_parameters(n)]
    assert all(g is not None for g in grads)


def test_conv1d_lora_uses_the_fused_op(monkeypatch):
    import fastpeft.modules.lora as mod
    calls = []
    real = mod.lora_linear
    monkeypatch.setattr(mod, "lora_linear", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    layer = fastpeft.LoRALinear(_conv1d(), r=4, init_lora_weights=False)
    x = torch.randn(2, 3, 16)
    y = layer(x)
    assert calls == [(24, 16)]  # the Conv1D weight as an (out, in) view
    expect = x @ layer.base_layer.weight + layer.base_layer.bias + \
        layer.scaling["default"] * x @ layer.lora_A["default"].weight.t() @ layer.lora_B["default"].weight.t()
    assert_close(y, expect, torch.float32, "conv1d lora")


def test_embedding_and_conv_refuse_linear_only_inits():
    with pytest.raises(ValueError, match="only available for linear"):
        fastpeft.LoRAEmbedding(nn.Embedding(4, 4), init_lora_weights="pissa")
    with pytest.raises(ValueError, match="groups"):
        fastpeft.LoRAConv2d(nn.Conv2d(4, 4, 3, groups=4), r=2)


def test_mixed_batch_loop_fallback_warns_once(monkeypatch):
    """Different dropout rates in one training batch cannot share the fused call: the per-adapter
    loop runs, with one RuntimeWarning naming why (never silently), and still gives each row its
    own adapter."""
    monkeypatch.setattr(fastpeft._warn, "WARNED", set())
    torch.manual_seed(0)
    layer = fastpeft.LoRALinear(nn.Linear(16, 8), r=4, lora_dropout=0.1, init_lora_weights=False)
    layer.update_layer("b", 2, 4.0, lora_dropout=0.2, init_lora_weights=False)
    layer.train()
    x = torch.randn(3, 16)
    layer.batch_adapters = ["b", "__base__", "default"]
    with pytest.warns(RuntimeWarning, match="different dropout rates"):
        y = layer(x)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per reason
    layer.batch_adapters = None
    assert_close(y[1], layer.base_layer(x)[1], torch.float32, "base row")
    layer.eval()  # eval: no dropout, the fused path again (no warning), same rows as each adapter alone
    layer.batch_adapters = ["b", "__base__", "default"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixed = layer(x)
    layer.batch_adapters = None
    layer.set_adapter("b")
    assert_close(mixed[0], layer(x)[0], torch.float32, "row b")

"""Adapter / ParallelAdapter modules: init, semantics, parameters, placements."""
import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.modules.adapter import ADAPTER_DEFAULTS, ADAPTER_PLACEMENTS, Adapter, ParallelAdapter
from fastpeft.reference.adapter import adapter_reference
from fastpeft.testing import assert_close
from tests.conftest import backend_params

BACKENDS = [p for p in backend_params() if p.id in ("reference", "cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [Adapter, ParallelAdapter])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_fresh_lora_init_is_exact_identity(backend, cls, activation):
    a = cls(48, bottleneck=8, activation=activation, scaling=0.5, init="lora", backend=backend).train()
    x = torch.randn(2, 5, 48)
    if cls is Adapter:
        assert torch.equal(a(x), x)
    else:
        r = torch.randn(2, 5, 48)
        assert torch.equal(a(x, r), r)
    assert torch.count_nonzero(a.down.weight) > 0  # down is random, the zero up makes it exact


def test_init_schemes():
    torch.manual_seed(0)
    a = Adapter(512, bottleneck=64, init="lora")
    bound = 1 / 512 ** 0.5  # kaiming-uniform(a=sqrt(5)) on fan_in 512
    assert a.down.weight.abs().max() <= bound and a.down.weight.abs().max() > 0.9 * bound
    assert not a.up.weight.any() and not a.up.bias.any() and not a.down.bias.any()
    b = Adapter(512, bottleneck=64, init="bert")
    assert abs(b.down.weight.std().item() - 0.02) < 2e-3 and abs(b.up.weight.std().item() - 0.02) < 2e-3
    assert not b.up.bias.any() and not b.down.bias.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("learn", [False, "scalar", "vector"])
def test_adapter_matches_formula(backend, learn):
    a = Adapter(32, bottleneck=4, activation="gelu", scaling=0.3, init="bert", learn_scaling=learn,
                backend=backend)
    x = torch.randn(3, 7, 32, requires_grad=True)
    y = a(x)
    s = a.scaling if learn else 0.3
    expect = x + s * a.up(torch.nn.functional.gelu(a.down(x)))
    assert_close(y, expect, torch.float32, "y")
    y.sum().backward()
    if learn:
        assert a.scaling.grad is not None and a.scaling.grad.shape == a.scaling.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_adapter_adaptformer(backend):
    """x + mlp(norm(x)) + s·up(relu(down(x))): the branch reads x, not the normed input."""
    torch.manual_seed(0)
    d = 24
    norm, mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 48), nn.GELU(), nn.Linear(48, d))
    pa = ParallelAdapter(d, bottleneck=6, init="bert", backend=backend)
    assert pa.scaling == 0.1 and pa.activation == "relu"
    x = torch.randn(2, 9, d)
    h = x + mlp(norm(x))
    y = pa(x, residual=h)
    expect = h + 0.1 * pa.up(torch.relu(pa.down(x)))
    assert_close(y, expect, torch.float32, "y")
    ref = adapter_reference(x, pa.down.weight, pa.down.bias, pa.up.weight, pa.up.bias, "relu", 0.1, h)
    assert_close(y, ref, torch.float32, "y vs reference")
    with pytest.raises(ValueError, match="residual"):
        pa(x, None)


def test_parallel_residual_gets_gradient():
    pa = ParallelAdapter(16, bottleneck=4, init="bert")
    x, r = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)
    dy = torch.randn(5, 16)
    pa(x, r).backward(dy)
    torch.testing.assert_close(r.grad, dy)


@pytest.mark.parametrize("dim,m,learn,extra", [(768, 64, False, 0), (768, 64, "scalar", 1), (768, 64, "vector", 768),
                                               (129, 1, False, 0)])
def test_parameter_counts(dim, m, learn, extra):
    for cls in (Adapter, ParallelAdapter):
        a = cls(dim, bottleneck=m, learn_scaling=learn)
        n = sum(p.numel() for p in a.parameters())
        assert n == 2 * dim * m + dim + m + extra
        assert set(dict(a.named_parameters())) >= {"down.weight", "down.bias", "up.weight", "up.bias"}


def test_dropout_only_in_training():
    a = Adapter(32, bottleneck=8, dropout=0.5, init="bert")
    x = torch.randn(4, 32)
    a.eval()
    torch.testing.assert_close(a(x), a(x))
    a.train()
    torch.manual_seed(0)
    y1 = a(x)
    torch.manual_seed(1)
    y2 = a(x)
    assert not torch.equal(y1, y2)


def test_placements_and_defaults():
    assert ADAPTER_PLACEMENTS["houlsby"] == ("attn_out", "ffn_out")
    assert ADAPTER_PLACEMENTS["pfeiffer"] == ("ffn_out",)
    assert ADAPTER_PLACEMENTS["parallel"] == ("mlp_parallel",)
    assert ADAPTER_DEFAULTS["houlsby"]["scaling"] == 1.0 and ADAPTER_DEFAULTS["parallel"]["scaling"] == 0.1
    a = Adapter(16, **ADAPTER_DEFAULTS["pfeiffer"])
    assert a.scaling == 1.0


def test_public_names_and_dtype():
    assert fastpeft.Adapter is Adapter and fastpeft.ParallelAdapter is ParallelAdapter
    a = Adapter(16, bottleneck=4, dtype=torch.float64)
    assert a.down.weight.dtype == torch.float64
    assert a(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("kw,name", [(dict(dim=0), "dim"), (dict(bottleneck=0), "bottleneck"),
                                     (dict(activation="tanh"), "activation"), (dict(dropout=1.0), "dropout"),
                                     (dict(init="xavier"), "init"), (dict(learn_scaling="matrix"), "learn_scaling")])
def test_bad_arguments(kw, name):
    args = dict(dim=16)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        Adapter(**args)

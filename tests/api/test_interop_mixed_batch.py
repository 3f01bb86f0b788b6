"""``patch_peft`` and PEFT's ``adapter_names=`` mixed batches: the patched LoRA layers run the
batch through one ``fastpeft.multi_lora_linear`` call per layer (spied on) and give unpatched
PEFT's outputs and gradients, row by row (``"__base__"`` rows, adapters of different ranks /
scalings / targets, a LoRA bias); where the op cannot compute PEFT's result (different dropout
rates in training) PEFT's loop runs, with one warning naming why."""
import copy
import warnings

import peft
import pytest
import torch

import fastpeft
import fastpeft._warn
import fastpeft.interop as interop

from ._models import assert_rows_match_peft, hf_gpt2, hf_llama

#: name -> (rank, alpha, targets, lora_bias); ranks and scalings differ, targets overlap partly
LLAMA = {"a": (2, 4, ["q_proj", "v_proj"], False), "b": (4, 8, ["q_proj", "o_proj", "down_proj"], True),
         "c": (3, 3, ["v_proj"], False), "d": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False)}
GPT2 = {"a": (2, 4, ["c_attn"], False), "b": (4, 8, ["c_attn", "c_proj"], True), "c": (3, 6, ["c_fc"], False)}
NAMES = {"llama": ["d", "__base__", "b", "a", "c", "b", "__base__"], "gpt2": ["c", "__base__", "a", "b", "a"]}


def _peft_model(family, dropout=0.0):
    base, specs = (hf_llama(), LLAMA) if family == "llama" else (hf_gpt2(), GPT2)
    hp = None
    for i, (name, (r, alpha, targets, bias)) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_bias=bias,
                              lora_dropout=dropout, init_lora_weights=False)
        if hp is None:
            hp = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            hp.add_adapter(name, cfg)
    with torch.no_grad():
        for n, p in hp.named_parameters():
            if "lora_B" in n:  # init_lora_weights=False leaves the bias at zero
                p.normal_(0, 0.2)
    return hp.eval()


class _Spy:
    """Counts ``multi_lora_linear`` calls from the patched layers and records their dropout."""

    def __init__(self, monkeypatch):
        self.calls, self.dropout = 0, []
        real = interop.multi_lora_linear

        def spy(*a, **k):
            self.calls += 1
            self.dropout.append((a[7] if len(a) > 7 else k.get("dropout_p", 0.0), k.get("training")))
            return real(*a, **k)

        monkeypatch.setattr(interop, "multi_lora_linear", spy)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(fastpeft._warn, "WARNED", set())


def _inputs(n, seed=0):
    ids = torch.randint(1, 60, (n, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # a left-padded row
    return ids, mask


def _lora_params(m):
    ps = {n: p for n, p in m.named_parameters() if "lora_" in n}
    for p in ps.values():
        p.requires_grad_(True)
    return ps


def _grads(loss, params):
    for p in params.values():
        p.grad = None
    loss.backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patched_mixed_batch_equals_peft_row_by_row(family, monkeypatch):
    hp = _peft_model(family)
    fast = fastpeft.patch_peft(copy.deepcopy(hp))
    names = NAMES[family]
    ids, mask = _inputs(len(names))
    spy = _Spy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to PEFT's loop
        with torch.no_grad():
            ours = fast(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    n_layers = sum(isinstance(m, interop.FusedPeftLoraLinear) and any(a in m.lora_A for a in names)
                   for m in fast.modules())
    assert spy.calls == n_layers > 0  # one fused call per layer holding an adapter of the batch
    with torch.no_grad():
        theirs = hp(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert_rows_match_peft(hp, ours, dict(input_ids=ids, attention_mask=mask), names)  # each row as PEFT runs it alone
    hp.set_adapter("a")
    kw = dict(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=4, do_sample=False)
    assert torch.equal(fast.generate(**kw), hp.generate(**kw))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patched_mixed_batch_gradients_equal_peft(family, monkeypatch):
    """PEFT refuses ``adapter_names`` in training mode at the model level: gradients in eval mode
    (no dropout), the whole batch's loss and each row's loss alone (only that row's adapter moves)."""
    hp = _peft_model(family)
    fast = fastpeft.patch_peft(copy.deepcopy(hp))
    names = NAMES[family]
    ids, mask = _inputs(len(names), seed=1)
    p_ref, p_fast = _lora_params(hp), _lora_params(fast)
    spy = _Spy(monkeypatch)

    def losses(m):
        lp = m(input_ids=ids, attention_mask=mask, adapter_names=names).logits.log_softmax(-1)
        return -lp[..., 3].mean(1)  # one loss per sample

    g_ref, g_fast = _grads(losses(hp).sum(), p_ref), _grads(losses(fast).sum(), p_fast)
    assert spy.calls > 0
    moved = set()
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
        if g_ref[n].abs().sum() > 0:
            moved.add(n)
    assert {n.split(".")[-2] for n in moved} == set(names) - {"__base__"}  # every adapter of the batch trains
    for i, name in enumerate(names):  # row by row
        g_ref, g_fast = _grads(losses(hp)[i], p_ref), _grads(losses(fast)[i], p_fast)
        for n in g_ref:
            torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=f"row {i}: {n}")
            assert (g_fast[n].abs().sum() > 0) <= (n.split(".")[-2] == name), f"row {i} ({name}) moved {n}"


@pytest.mark.parametrize("family,path", [("llama", "model.layers.0.self_attn.q_proj"),
                                         ("gpt2", "transformer.h.1.attn.c_attn")])
def test_patched_layer_in_training_mode(family, path, monkeypatch):
    """One layer called in training mode (dropout 0), as a model's forward would call it: output,
    input gradient and every adapter's gradients equal PEFT's loop."""
    hp = _peft_model(family)
    fast = fastpeft.patch_peft(copy.deepcopy(hp))
    ref_layer, layer = hp.base_model.model.get_submodule(path), fast.base_model.model.get_submodule(path)
    ref_layer.train()
    layer.train()
    names = ["b", "__base__", "a", "b", "d" if family == "llama" else "c"]
    x = torch.randn(len(names), 5, layer.get_base_layer().weight.shape[1 if family == "llama" else 0])
    spy = _Spy(monkeypatch)
    outs, grads = [], []
    for m in (ref_layer, layer):
        xi = x.clone().requires_grad_(True)
        params = {n: p for n, p in m.named_parameters() if "lora_" in n}
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        y = m(xi, adapter_names=names)
        (y * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
        outs.append(y.detach())
        grads.append({"x": xi.grad, **{n: p.grad for n, p in params.items()}})
    assert spy.calls == 1 and spy.dropout == [(0.0, False)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        if grads[0][n] is None:  # an adapter without rows: no gradient in PEFT, zeros from the op
            assert grads[1][n] is None or not grads[1][n].any(), n
        else:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_dropout_same_rate_is_fused_different_rates_warn_once(monkeypatch):
    hp = _peft_model("llama", dropout=0.25)
    fast = fastpeft.patch_peft(copy.deepcopy(hp))
    layer = fast.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")  # adapters a, b, d
    layer.train()
    x = torch.randn(4, 3, 32)
    spy = _Spy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = layer(x, adapter_names=["a", "b", "__base__", "d"])  # one rate: fused, fastpeft's dropout masks
    assert spy.calls == 1 and spy.dropout == [(0.25, True)]
    assert y.shape == (4, 3, layer.out_features)
    layer.eval()
    with torch.no_grad():  # eval: no dropout, PEFT's values
        ref_layer = hp.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
        torch.testing.assert_close(layer(x, adapter_names=["a", "b", "__base__", "d"]),
                                   ref_layer(x, adapter_names=["a", "b", "__base__", "d"]), rtol=1e-5, atol=1e-5)
    assert spy.dropout[-1] == (0.0, False)
    layer.train()
    layer.lora_dropout["b"].p = 0.5  # rates differ now: the op cannot, PEFT's loop runs, said once
    calls = spy.calls
    with pytest.warns(RuntimeWarning, match=r"different lora_dropout in training .*'b': 0\.5"):
        layer(x, adapter_names=["a", "b", "d", "a"])
    assert spy.calls == calls
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the same reason again: no second warning
        layer(x, adapter_names=["a", "b", "d", "a"])
        layer(x, adapter_names=["a", "__base__", "a", "a"])  # only a's rate in play: fused again
    assert spy.calls == calls + 1


def test_peft_errors_stay_peft_errors():
    fast = fastpeft.patch_peft(_peft_model("gpt2"))
    ids, mask = _inputs(5)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        fast(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="non-existing adapter"):
        fast(input_ids=ids, attention_mask=mask, adapter_names=["a", "zz", "a", "a", "a"])

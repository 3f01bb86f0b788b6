"""Activation checkpointing over fastpeft models: identical gradients with and without it, dropout on.

fastpeft draws each dropout seed from torch's default generator at the op call
(``fastpeft._dropout.new_seed``), and ``torch.utils.checkpoint`` restores that generator before it
recomputes a segment (``preserve_rng_state=True``, its default, reentrant or not), so the
recomputed forward regenerates the same masks. Checked for ``torch.utils.checkpoint`` around each
block (reentrant and non-reentrant) and for HF ``gradient_checkpointing_enable()`` /
``activation_checkpointing_enable()`` through the ``PeftModel``.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastpeft
from tests.api._models import fp_vit, hf_llama

VIT_CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["qkv", "fc1"]),
    "dora": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["qkv", "fc1"],
                                        use_dora=True),
    "dora_no_dropout": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], use_dora=True),
    "adapter": lambda: fastpeft.AdapterConfig(kind="houlsby", bottleneck=4, dropout=0.3),
    "vpt": lambda: fastpeft.VPTConfig(num_prompts=2, deep=True, dropout=0.3),
    "prefix": lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=2),
}
LLAMA_CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj",
                                                                                            "down_proj"]),
    "dora": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True,
                                        target_modules=["q_proj", "v_proj", "down_proj"]),
    "adapter": lambda: fastpeft.AdapterConfig(kind="houlsby", bottleneck=4, dropout=0.3),
}


def _seeded(pm):
    with torch.no_grad():  # nonzero LoRA B / adapter up weights, so every gradient is nonzero
        g = torch.Generator().manual_seed(3)
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return pm.train()


def _grads(pm, loss_fn, seed=11):
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(pm)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert set(a[1]) == set(b[1]) and a[1]
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-6, atol=1e-7, msg=k)


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda *a: calls.append(1))  # a pre-hook: recompute may stop early
    return calls


def _checkpoint_blocks(blocks, use_reentrant):
    """Run every block of ``blocks`` under ``torch.utils.checkpoint`` (tensors passed positionally:
    reentrant checkpoint takes no keyword arguments)."""
    for blk in blocks:
        orig = blk.forward

        def fwd(x, prefix_kv=None, _orig=orig):
            if prefix_kv is None:
                return checkpoint(_orig, x, use_reentrant=use_reentrant)
            return checkpoint(lambda x_, k_, v_: _orig(x_, prefix_kv=(k_, v_)), x, *prefix_kv,
                              use_reentrant=use_reentrant)
        blk.forward = fwd


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("method", list(VIT_CONFIGS))
def test_torch_checkpoint_same_gradients(method, use_reentrant):
    g = torch.Generator().manual_seed(5)
    images, labels = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 2, 1])
    if use_reentrant:
        images.requires_grad_(True)  # reentrant checkpoint needs an input that requires grad

    def loss_fn(pm):
        return F.cross_entropy(pm(images=images), labels)

    plain = _seeded(fastpeft.get_peft_model(fp_vit(), VIT_CONFIGS[method]()))
    ref = _grads(plain, loss_fn)
    ckpt = _seeded(fastpeft.get_peft_model(fp_vit(), VIT_CONFIGS[method]()))
    _checkpoint_blocks(ckpt.get_base_model().blocks, use_reentrant)
    calls = _count_calls(ckpt.get_base_model().blocks[0].mlp)
    got = _grads(ckpt, loss_fn)
    assert len(calls) == 2  # forward + recompute: checkpointing really ran
    _assert_same(got, ref)
    if method not in ("prefix", "dora_no_dropout"):  # dropout is really on: another seed, other gradients
        other = _grads(plain, loss_fn, seed=12)
        assert not torch.equal(other[0], ref[0])


@pytest.mark.parametrize("api", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("method", list(LLAMA_CONFIGS))
def test_hf_gradient_checkpointing_same_gradients(method, use_reentrant, api):
    x = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(6))

    def loss_fn(pm):
        return pm(input_ids=x, labels=x).loss

    plain = _seeded(fastpeft.get_peft_model(hf_llama(), LLAMA_CONFIGS[method]()))
    ref = _grads(plain, loss_fn)
    ckpt = _seeded(fastpeft.get_peft_model(hf_llama(), LLAMA_CONFIGS[method]()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated in v5
        if api == "gradient_checkpointing_enable":
            ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        else:
            ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    layers = ckpt.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    calls = _count_calls(layers[0].mlp)
    got = _grads(ckpt, loss_fn)
    assert len(calls) == 2  # forward + recompute: checkpointing really ran
    _assert_same(got, ref)
    other = _grads(plain, loss_fn, seed=12)
    assert not torch.equal(other[0], ref[0])


# ---- reentrant checkpointing where no input requires grad ------------------------------------------------------
# torch's reentrant checkpoint computes parameter gradients inside a segment only if one of its tensor
# inputs requires grad. Under a frozen base nothing in front of the first adapter does: torch warns, and
# the PEFT parameters of that segment get no gradient. PeftModel.enable_input_require_grads() fixes it for
# every model (HF, fastpeft BERT through its word embeddings, fastpeft ViT through its float inputs).

@pytest.mark.parametrize("method", list(VIT_CONFIGS))
def test_reentrant_without_input_grad_warns_and_enable_input_require_grads_fixes_it(method):
    g = torch.Generator().manual_seed(5)
    images, labels = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 2, 1])

    def loss_fn(pm):
        return F.cross_entropy(pm(images=images), labels)

    ref = _grads(_seeded(fastpeft.get_peft_model(fp_vit(), VIT_CONFIGS[method]())), loss_fn)
    ckpt = _seeded(fastpeft.get_peft_model(fp_vit(), VIT_CONFIGS[method]()))
    _checkpoint_blocks(ckpt.get_base_model().blocks[:1], use_reentrant=True)  # the first block only
    first = [n for n in ref[1] if ".blocks.0." in n]
    if first:  # prompt methods feed the block a trainable prompt: their input requires grad anyway
        with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
            got = _grads_or_none(ckpt, loss_fn)
        assert all(got[n] is None for n in first), "the pitfall is real: block 0 got no gradients"
    ckpt.enable_input_require_grads()
    got = _grads(ckpt, loss_fn)
    _assert_same(got, ref)
    assert not images.requires_grad  # the caller's tensor is not modified
    import pickle
    fresh = fastpeft.get_peft_model(fp_vit(), VIT_CONFIGS[method]())
    fresh.enable_input_require_grads()
    pickle.loads(pickle.dumps(fresh))  # the hook is picklable (models with it enabled still pickle)
    ckpt.disable_input_require_grads()
    if first:
        with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
            _grads_or_none(ckpt, loss_fn)


def _grads_or_none(pm, loss_fn, seed=11):
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss_fn(pm).backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["fp_bert", "hf_llama"])
@pytest.mark.parametrize("dora", [False, True])
def test_enable_input_require_grads_token_models(family, dora):
    """Token models: the input word embeddings' output requires grad (fastpeft BERT: its
    ``embeddings.word_embeddings``; HF models: their own ``enable_input_require_grads``, which HF
    ``gradient_checkpointing_enable(use_reentrant=True)`` calls)."""
    from tests.api._models import fp_bert
    x = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    targets = ["query", "value", "dense"] if family == "fp_bert" else ["q_proj", "v_proj", "down_proj"]

    def config():
        return fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=targets, use_dora=dora)

    if family == "fp_bert":
        build = fp_bert

        def loss_fn(pm):
            return pm(input_ids=x).float().pow(2).mean()
    else:
        build = hf_llama

        def loss_fn(pm):
            return pm(input_ids=x, labels=x).loss
    ref = _grads(_seeded(fastpeft.get_peft_model(build(), config())), loss_fn)
    ckpt = _seeded(fastpeft.get_peft_model(build(), config()))
    if family == "fp_bert":  # reentrant checkpoint around the first layer (called positionally)
        blk = ckpt.get_base_model().bert.encoder.layer[0]
        orig = blk.forward
        blk.forward = lambda *a: checkpoint(orig, *a, use_reentrant=True)
        first = ".layer.0."
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        _assert_same(_grads(ckpt, loss_fn), ref)  # HF enabled input grads itself
        ckpt.disable_input_require_grads()  # now the pitfall: no layer's input requires grad
        first = None
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        if first is None:  # every layer checkpointed: nothing in the loss requires grad
            with pytest.raises(RuntimeError, match="does not require grad"):
                _grads_or_none(ckpt, loss_fn)
        else:
            got = _grads_or_none(ckpt, loss_fn)
            assert all(g is None for n, g in got.items() if first in n)
    ckpt.enable_input_require_grads()
    _assert_same(_grads(ckpt, loss_fn), ref)

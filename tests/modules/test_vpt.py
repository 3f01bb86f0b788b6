"""VPT: shallow/deep outputs against a hand-written concatenation, fast deep path vs the reference
(outputs and every gradient to 1e-5 in fp32), trainable-parameter counts, pooling, prompt dropout."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastpeft.models import ViT, ViTConfig
from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.vpt import VPT, vpt_init_bound
from tests.conftest import backend_params

TIGHT = dict(atol=1e-5, rtol=1e-5)


def tiny_vit(pool="cls", depth=3, **kw):
    cfg = ViTConfig(image_size=32, patch_size=8, dim=48, depth=depth, heads=4, mlp_dim=96, num_classes=5,
                    pool=pool, **kw)
    vit = ViT(cfg)
    with torch.no_grad():  # non-trivial LayerNorm affine and biases so the K/V slicing is really tested
        for n, p in vit.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return vit


def images(b=3):
    return torch.randn(b, 3, 32, 32)


def manual_forward(vit, prompts, deep, x):
    """Independent reference: [CLS ; prompts ; patches] through every block, prompts excluded from pooling."""
    t = vit.embed(x)
    b, P = t.shape[0], prompts.shape[1]
    for i, blk in enumerate(vit.blocks):
        if i == 0 or deep:
            rest = t[:, 1:] if i == 0 else t[:, 1 + P:]
            t = torch.cat([t[:, :1], prompts[i if deep else 0].expand(b, -1, -1), rest], 1)
        t = blk(t)
    t = vit.norm(t)
    pooled = t[:, 0] if vit.config.pool == "cls" else t[:, 1 + P:].mean(1)
    return vit.head(pooled)


def trainable(m):
    return {n: p for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("fast", [False, True], ids=["concat", "fast"])
def test_vpt_matches_manual_concatenation(pool, deep, fast):
    vit = tiny_vit(pool)
    m = VPT(vit, 5, deep=deep, fast=fast)
    x = images()
    ref = manual_forward(copy.deepcopy(vit), m.prompt_embeddings.detach(), deep, x)
    torch.testing.assert_close(m(x), ref, **TIGHT)
    assert m.uses_prefix_path == (deep and fast)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop0.3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_deep_equals_concat_outputs_and_grads(pool, dropout, batch):
    torch.manual_seed(0)
    ref = VPT(tiny_vit(pool), 7, deep=True, dropout=dropout, fast=False)
    fast = copy.deepcopy(ref)
    fast.fast = True
    x = images(batch)
    target = torch.randint(0, 5, (batch,))
    outs = []
    for m in (ref, fast):
        m.train()
        torch.manual_seed(123)  # same dropout seeds for both paths
        y = m(x)
        F.cross_entropy(y, target).backward()
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], **TIGHT)
    tr, tf = trainable(ref), trainable(fast)
    assert set(tr) == set(tf) == {"prompt_embeddings", "vit.head.weight", "vit.head.bias"}
    for n in tr:
        assert tr[n].grad is not None and tr[n].grad.abs().sum() > 0, n
        torch.testing.assert_close(tf[n].grad, tr[n].grad, **TIGHT, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("backend", backend_params("prefix_attention"))
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_fast_deep_equals_concat_on_every_backend(backend, dropout, monkeypatch):
    """The fast path through each prefix_attention backend (Bp = 1 and Bp = B) vs concatenation."""
    monkeypatch.setenv("FASTPEFT_BACKEND", backend)
    ref = VPT(tiny_vit("mean", depth=2), 5, deep=True, dropout=dropout, fast=False)
    fast = copy.deepcopy(ref)
    fast.fast = True
    x = images(2)
    outs = []
    for m in (ref, fast):
        torch.manual_seed(7)
        y = m(x)
        y.square().sum().backward()
        outs.append(y)
    torch.testing.assert_close(outs[1], outs[0], **TIGHT)
    for n, p in trainable(ref).items():
        torch.testing.assert_close(trainable(fast)[n].grad, p.grad, **TIGHT, msg=lambda s: f"{n}: {s}")


def test_fast_deep_exact_grads_with_trainable_lora_on_qkv():
    """Other trainable parameters (a LoRA on qkv) get the same gradients through the prompt K/V path."""
    torch.manual_seed(0)
    vit = tiny_vit("mean", depth=2)
    ref = VPT(vit, 4, deep=True, fast=False)
    for blk in vit.blocks:
        blk.attn.qkv = LoRALinear(blk.attn.qkv, r=2, init_lora_weights=False)
    fast = copy.deepcopy(ref)
    fast.fast = True
    x = images(2)
    for m in (ref, fast):
        m(x).square().sum().backward()
    tr, tf = trainable(ref), trainable(fast)
    assert any("lora_A" in n for n in tr)
    torch.testing.assert_close(fast(x), ref(x), **TIGHT)
    for n in tr:
        torch.testing.assert_close(tf[n].grad, tr[n].grad, **TIGHT, msg=lambda s: f"{n}: {s}")


def test_fast_deep_fp64_tight():
    vit = tiny_vit("cls", depth=2).double()
    ref = VPT(vit, 3, deep=True, fast=False)
    fast = copy.deepcopy(ref)
    fast.fast = True
    x = images(2).double()
    ya, yb = ref(x), fast(x)
    torch.testing.assert_close(yb, ya, atol=1e-12, rtol=1e-10)
    ga = torch.autograd.grad(ya.sum(), ref.prompt_embeddings)[0]
    gb = torch.autograd.grad(yb.sum(), fast.prompt_embeddings)[0]
    torch.testing.assert_close(gb, ga, atol=1e-12, rtol=1e-10)


def test_fast_path_uses_shared_prefix_without_dropout_and_per_sample_with(monkeypatch):
    seen = []
    from fastpeft.models import vit as vit_mod

    orig = vit_mod.Block.forward

    def spy(self, x, prefix_kv=None):
        seen.append(None if prefix_kv is None else tuple(prefix_kv[0].shape))
        return orig(self, x, prefix_kv=prefix_kv)

    monkeypatch.setattr(vit_mod.Block, "forward", spy)
    m = VPT(tiny_vit(), 5, deep=True, dropout=0.2, fast=True)
    m.eval()
    m(images(3))
    assert seen == [(1, 4, 5, 12)] * 3  # Bp = 1: one prefix per step for the whole batch
    seen.clear()
    m.train()
    m(images(3))
    assert seen == [(3, 4, 5, 12)] * 3  # prompt dropout: per-sample prefixes
    seen.clear()
    m.fast = False
    m(images(3))
    assert seen == [None] * 3


def test_trainable_parameter_counts_vit_b16():
    # ViT-B/16 built on the meta device: shapes only, no memory, no forward
    with torch.device("meta"):
        vit = ViT(ViTConfig.base(num_classes=1000))
        deep = VPT(vit, 50, deep=True)
    assert deep.prompt_embeddings.shape == (12, 50, 768)
    assert deep.num_prompt_parameters() == 12 * 768 * 50 == 460_800
    head = 768 * 1000 + 1000
    assert sum(p.numel() for p in deep.parameters() if p.requires_grad) == 460_800 + head
    with torch.device("meta"):
        shallow = VPT(ViT(ViTConfig.base(num_classes=1000)), 50, deep=False, train_head=False)
    assert shallow.num_prompt_parameters() == 50 * 768
    assert [n for n, p in shallow.named_parameters() if p.requires_grad] == ["prompt_embeddings"]


def test_init_uniform_bound():
    torch.manual_seed(0)
    m = VPT(tiny_vit(), 50, deep=True)
    v = vpt_init_bound(8, 48)
    assert math.isclose(v, math.sqrt(6 / (3 * 64 + 48)))
    w = m.prompt_embeddings.detach()
    assert w.abs().max() <= v and w.abs().max() > 0.9 * v
    assert abs(w.mean().item()) < 0.05 * v
    assert math.isclose(w.std().item(), v / math.sqrt(3), rel_tol=0.05)  # uniform(-v, v) has std v/sqrt(3)


@pytest.mark.parametrize("deep,fast", [(False, True), (True, False), (True, True)],
                         ids=["shallow", "deep-concat", "deep-fast"])
def test_pooling_excludes_prompts(deep, fast):
    vit = tiny_vit("mean")
    m = VPT(vit, 6, deep=deep, fast=fast)
    x = images(2)
    tokens = m.forward_features(x)
    n_patches = 16
    assert vit.num_prefix_tokens == m.num_prefix_tokens == (1 if deep and fast else 7)
    assert tokens.shape == (2, m.num_prefix_tokens + n_patches, 48)
    torch.testing.assert_close(m.pool(tokens), tokens[:, -n_patches:].mean(1))
    # the last block's prompt outputs never reach the logits: perturbing them changes nothing
    if not (deep and fast):
        t2 = tokens.clone()
        t2[:, 1:7] += 100.0
        torch.testing.assert_close(m.pool(t2), m.pool(tokens))
    vit_cls = tiny_vit("cls")
    mc = VPT(vit_cls, 6, deep=deep, fast=fast)
    tc = mc.forward_features(x)
    torch.testing.assert_close(mc.pool(tc), tc[:, 0])


def test_toggling_fast_keeps_pooling_consistent():
    m = VPT(tiny_vit("mean"), 4, deep=True, fast=True)
    x = images(2)
    y_fast = m(x)
    m.fast = False
    assert m.vit.num_prefix_tokens == 5
    torch.testing.assert_close(m(x), y_fast, **TIGHT)


def test_prompt_dropout_behaviour():
    m = VPT(tiny_vit(), 5, deep=True, dropout=0.5, fast=True)
    x = images(4)
    m.eval()
    torch.testing.assert_close(m(x), m(x))  # no dropout in eval
    p_eval = m.prompts(0, 4, torch.float32)
    assert p_eval.shape == (1, 5, 48)
    m.train()
    torch.manual_seed(1)
    p = m.prompts(0, 4, torch.float32)
    assert p.shape == (4, 5, 48)
    base = m.prompt_embeddings[0].detach()
    kept = p != 0
    # kept values are scaled by 1/(1-p); dropped ones are zero
    torch.testing.assert_close(p[kept], (base.expand(4, -1, -1) * 2.0)[kept])
    frac = kept.float().mean().item()
    assert 0.4 < frac < 0.6
    # per sample: the masks differ between samples
    assert not torch.equal(kept[0], kept[1])
    # the same seed gives the same masks; a new draw differs
    torch.manual_seed(1)
    assert torch.equal(m.prompts(0, 4, torch.float32), p)
    assert not torch.equal(m.prompts(0, 4, torch.float32), p)
    # training-mode outputs are random, and the fast and concat paths agree for the same seed
    torch.manual_seed(5)
    y1 = m(x)
    torch.manual_seed(5)
    m.fast = False
    y2 = m(x)
    torch.testing.assert_close(y1, y2, **TIGHT)
    assert not torch.allclose(m(x), y2)


def test_base_frozen_and_grads_flow_only_to_prompts_and_head():
    vit = tiny_vit()
    m = VPT(vit, 3, deep=True, fast=True)
    m(images(2)).sum().backward()
    for n, p in m.named_parameters():
        if n in ("prompt_embeddings", "vit.head.weight", "vit.head.bias"):
            assert p.requires_grad and p.grad is not None
        else:
            assert not p.requires_grad and p.grad is None, n


def test_shallow_ignores_fast_and_higher_resolution():
    vit = tiny_vit("mean")
    m = VPT(vit, 3, deep=False, fast=True)
    assert not m.uses_prefix_path
    x = torch.randn(2, 3, 48, 40)  # 6x5 grid, interpolated position embeddings
    ref = manual_forward(copy.deepcopy(vit), m.prompt_embeddings.detach(), False, x)
    torch.testing.assert_close(m(x), ref, **TIGHT)
    md = VPT(tiny_vit("mean"), 3, deep=True, fast=True)
    mr = copy.deepcopy(md)
    mr.fast = False
    torch.testing.assert_close(md(x), mr(x), **TIGHT)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_prompts"):
        VPT(tiny_vit(), 0)
    with pytest.raises(ValueError, match="dropout"):
        VPT(tiny_vit(), 2, dropout=1.0)
    with pytest.raises(ValueError, match="vit"):
        VPT(torch.nn.Linear(2, 2), 2)

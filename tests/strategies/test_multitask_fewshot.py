"""Seed strategies: multi-task heads with a weighted loss, prototypical few-shot head / loss and
N-way K-shot episodes (on the reference ViT), a feature cache on disk, last-token pooling."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.models import ViT, ViTConfig
from fastpeft.strategies import (FeatureCache, LinearProbe, MultiTaskHeads, MultiTaskLoss, PrototypicalHead,
                                 pool_tokens, prototypes, prototypical_logits, prototypical_loss, sample_episode)


def _vit():
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=16, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=48, num_classes=3)).eval()


def _images(n=6, seed=2):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_multitask_heads_share_one_backbone_pass():
    vit = _vit()
    calls = []
    vit.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    model = MultiTaskHeads(vit, {"digit": 5, "parity": torch.nn.Linear(32, 2)})
    x = _images()
    out = model(x)
    assert len(calls) == 1 and set(out) == {"digit", "parity"}
    feats = vit.pool(vit.forward_features(x))
    torch.testing.assert_close(out["parity"], model.heads["parity"](feats))
    assert torch.equal(out["digit"], torch.zeros(6, 5))  # int heads start at zero
    torch.testing.assert_close(model(x, task="parity"), out["parity"])
    with pytest.raises(ValueError, match="task"):
        model(x, task="nope")


def test_multitask_loss_fixed_and_uncertainty_weighting():
    out = {"a": torch.randn(4, 3, requires_grad=True), "b": torch.randn(4, 2, requires_grad=True)}
    y = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.tensor([1, 0, 1, 1])}
    loss = MultiTaskLoss({"a": 1.0, "b": 0.25})
    expect = F.cross_entropy(out["a"], y["a"]) + 0.25 * F.cross_entropy(out["b"], y["b"])
    torch.testing.assert_close(loss(out, y), expect)
    assert set(loss.last) == {"a", "b"}
    torch.testing.assert_close(loss(out, {"a": y["a"]}), F.cross_entropy(out["a"], y["a"]))  # missing targets skip
    unc = MultiTaskLoss(weighting="uncertainty", tasks=["a", "b"])
    with torch.no_grad():
        unc.log_vars["a"].fill_(0.5)
    total = unc(out, y)
    la, lb = F.cross_entropy(out["a"], y["a"]), F.cross_entropy(out["b"], y["b"])
    torch.testing.assert_close(total, torch.exp(torch.tensor(-0.5)) * la + 0.5 + lb)
    total.backward()
    assert unc.log_vars["a"].grad is not None
    with pytest.raises(ValueError, match="weighting"):
        MultiTaskLoss(weighting="magic")
    with pytest.raises(ValueError, match="no output"):
        loss({"a": out["a"]}, y)


def test_multitask_training_on_a_lora_backbone_learns_both_tasks():
    torch.manual_seed(0)
    pm = fastpeft.get_peft_model(_vit(), fastpeft.LoraConfig(r=4, target_modules=["qkv", "fc2"]))
    model = MultiTaskHeads(pm, {"cls": 3, "flag": 2}, dim=32)
    loss_fn = MultiTaskLoss({"cls": 1.0, "flag": 0.5})
    x = _images(24, seed=5)
    y = {"cls": torch.arange(24) % 3, "flag": (torch.arange(24) // 3) % 2}
    x = x + 2.0 * F.one_hot(y["cls"], 3).float()[:, :, None, None]  # learnable signal
    params = [p for p in model.parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("heads.") for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    first = None
    for _ in range(30):
        total = loss_fn(model(x), y)
        first = first if first is not None else total.item()
        opt.zero_grad()
        total.backward()
        opt.step()
    assert total.item() < 0.5 * first


def test_prototypes_logits_and_loss():
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    sl = torch.tensor([0, 0, 1, 1])
    protos = prototypes(s, sl)
    torch.testing.assert_close(protos, torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    q = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(prototypical_logits(q, protos), -torch.tensor([[1.0, 5.0]]))
    torch.testing.assert_close(prototypical_loss(q, torch.tensor([1]), s, sl),
                               F.cross_entropy(-torch.tensor([[1.0, 5.0]]), torch.tensor([1])))
    cos = prototypical_logits(q, protos, "cosine", scale=10.0)
    torch.testing.assert_close(cos, 10.0 * torch.tensor([[2 ** -0.5, 2 ** -0.5]]))
    head = PrototypicalHead().fit(s, sl)
    assert head(q).argmax(-1).item() == 0
    with pytest.raises(ValueError, match="every class"):
        prototypes(s, torch.tensor([0, 0, 2, 2]))
    with pytest.raises(RuntimeError, match="fit"):
        PrototypicalHead()(q)


def test_sample_episode():
    labels = torch.arange(10).repeat_interleave(7)
    g = torch.Generator().manual_seed(0)
    ep = sample_episode(labels, n_way=5, k_shot=3, n_query=4, generator=g)
    assert ep.support.shape == (15,) and ep.query.shape == (20,) and len(ep.classes) == 5
    assert not set(ep.support.tolist()) & set(ep.query.tolist())
    for idx, lab in ((ep.support, ep.support_labels), (ep.query, ep.query_labels)):
        assert torch.equal(labels[idx], ep.classes[lab])
    assert torch.equal(torch.bincount(ep.support_labels), torch.full((5,), 3))
    with pytest.raises(ValueError, match="at least 8"):
        sample_episode(labels, 5, 4, 4)


def test_prototypical_episodes_fine_tune_lora_on_the_reference_vit():
    torch.manual_seed(1)
    pm = fastpeft.get_peft_model(_vit(), fastpeft.LoraConfig(r=4, target_modules=["qkv"]))
    labels = torch.arange(4).repeat_interleave(6)
    x = _images(24, seed=3) + 1.5 * F.one_hot(labels, 3 * 16 * 16)[:, :768].view(24, 3, 16, 16) * 8

    def feats(inp):
        return pm.model.pool(pm.model.forward_features(inp))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        ep = sample_episode(labels, n_way=3, k_shot=2, n_query=3, generator=g)
        loss = prototypical_loss(feats(x[ep.query]), ep.query_labels, feats(x[ep.support]), ep.support_labels)
        opt.zero_grad()
        loss.backward()
        assert pm.model.blocks[0].attn.qkv.lora_B["default"].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])


def test_feature_cache_saved_to_disk_and_reloaded(tmp_path):
    vit = _vit()
    probe = LinearProbe(vit, 3)
    calls = []
    vit.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    x, y = _images(10), torch.arange(10) % 3
    path = str(tmp_path / "cache" / "feats.pt")
    c1 = FeatureCache(probe, x, y, batch_size=4, path=path, key="vit-v1")
    assert len(calls) == 3
    c2 = FeatureCache(probe, x, y, batch_size=4, path=path, key="vit-v1")
    assert len(calls) == 3  # read from disk: the backbone did not run
    assert torch.equal(c2.features, c1.features) and torch.equal(c2.labels, c1.labels)
    c2.fit(epochs=2, lr=1e-2)  # trains the probe's head on the reloaded features
    FeatureCache(probe, x, y, batch_size=4, path=path, key="vit-v2")
    assert len(calls) == 6  # another key: recomputed (and rewritten)
    c3 = FeatureCache.load(path, probe)
    assert c3.key == "vit-v2" and torch.equal(c3.features, c1.features)
    (tmp_path / "bad.pt").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="bad.pt"):
        FeatureCache.load(str(tmp_path / "bad.pt"))


def test_last_token_pooling_for_decoder_only_probing():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0  # right padding: last real token at 3
    mask[2, :2] = 0  # left padding: last real token at 5
    probe = LinearProbe(lm, 2, pool="last")
    f = probe.features(input_ids=ids, attention_mask=mask)
    h = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(f, torch.stack([h[0, 5], h[1, 3], h[2, 5]]))
    t = torch.randn(2, 4, 3)
    assert torch.equal(pool_tokens(t, "last"), t[:, -1])
    assert torch.equal(pool_tokens(t, "last", 1, torch.tensor([[1, 1, 0], [0, 1, 1]])), torch.stack([t[0, 2], t[1, 3]]))
    with pytest.raises(ValueError, match="real token"):
        pool_tokens(t, "last", 0, torch.zeros(2, 4))
    assert copy.deepcopy(probe).pool == "last"

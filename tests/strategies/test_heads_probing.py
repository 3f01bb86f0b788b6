"""Head replacement, MLP-k heads, linear probing with CLS/mean pooling, and the feature cache."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastpeft.models import BertConfig, BertForSequenceClassification, BertModel, ViT, ViTConfig
from fastpeft.strategies import FeatureCache, LinearProbe, MLPHead, num_trainable, pool_tokens, replace_head


def tiny_vit(**kw):
    torch.manual_seed(0)
    return ViT(ViTConfig.tiny(**{**dict(image_size=16, patch_size=8, depth=2, num_classes=10), **kw})).eval()


def test_replace_head_zero_init():
    m = tiny_vit()
    head = replace_head(m, 7)
    assert m.head is head and head.out_features == 7 and head.in_features == 192
    assert head.weight.requires_grad and m.config.num_classes == 7
    out = m(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 7) and torch.count_nonzero(out) == 0
    m16 = tiny_vit().to(torch.bfloat16)
    assert replace_head(m16, 4).weight.dtype == torch.bfloat16


def test_replace_head_bert_classifier_and_identity_head():
    b = BertForSequenceClassification(BertConfig.tiny(vocab_size=50)).eval()
    replace_head(b, 5)
    assert b.classifier.out_features == 5 and b.num_labels == 5 and b.config.num_labels == 5
    assert torch.count_nonzero(b(torch.randint(0, 50, (2, 4)))) == 0
    m = tiny_vit(num_classes=0)  # nn.Identity head: in_features must be given
    with pytest.raises(ValueError, match="in_features"):
        replace_head(m, 3)
    assert replace_head(m, 3, in_features=192).in_features == 192
    with pytest.raises(ValueError, match="num_classes"):
        replace_head(m, 0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mlp_k_head(k):
    h = MLPHead(32, 5, k=k, hidden=16)
    linears = [m for m in h.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == k
    assert h(torch.randn(4, 32)).shape == (4, 5) and h(torch.randn(2, 3, 32)).shape == (2, 3, 5)
    expected = 32 * 5 + 5 if k == 1 else 32 * 16 + 16 + (k - 2) * (16 * 16 + 16) + 16 * 5 + 5
    assert sum(p.numel() for p in h.parameters()) == expected
    z = MLPHead(32, 5, k=k, zero_init=True)
    assert torch.count_nonzero(z(torch.randn(4, 32))) == 0
    with pytest.raises(ValueError, match="k: expected"):
        MLPHead(32, 5, k=0)


def test_pool_tokens():
    t = torch.randn(2, 6, 4)
    torch.testing.assert_close(pool_tokens(t, "cls"), t[:, 0])
    torch.testing.assert_close(pool_tokens(t, "mean", 3), t[:, 3:].mean(1))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pool_tokens(t, "mean", 3, mask), torch.stack([t[0, 3:5].mean(0), t[1, 3]]))
    with pytest.raises(ValueError, match="mask: expected shape"):
        pool_tokens(t, "mean", 3, torch.ones(2, 6))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_linear_probe_vit(pool):
    vit = tiny_vit()
    probe = LinearProbe(vit, 4, pool=pool)
    assert num_trainable(probe) == 192 * 4 + 4 and num_trainable(vit) == 0
    probe.train()
    assert not vit.training and probe.head.training  # frozen features: backbone stays in eval
    x = torch.randn(3, 3, 16, 16)
    tokens = vit.forward_features(x)
    expected = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
    torch.testing.assert_close(probe.features(x), expected)
    vit.num_prefix_tokens = 3  # e.g. prompts inserted after [CLS]: read at call time
    if pool == "mean":
        torch.testing.assert_close(probe.features(x), tokens[:, 3:].mean(1))
    out = probe(x)
    out.sum().backward()
    assert probe.head.weight.grad is not None and all(p.grad is None for p in vit.parameters())


def test_linear_probe_bert_masked_mean():
    torch.manual_seed(0)
    bert = BertModel(BertConfig.tiny(vocab_size=50)).eval()
    probe = LinearProbe(bert, 3, pool="mean")
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    h = bert(ids, attention_mask=mask).last_hidden_state
    got = probe.features(ids, attention_mask=mask)
    torch.testing.assert_close(got, torch.stack([h[0, :3].mean(0), h[1].mean(0)]))


def test_feature_cache_equals_direct_probing():
    vit = tiny_vit()
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 4, (24,), generator=g)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    probe = LinearProbe(vit, 4, pool="mean")
    direct = copy.deepcopy(probe)
    cache = FeatureCache(probe, loader)
    assert cache.features.shape == (24, 192) and len(cache) == 24
    torch.testing.assert_close(cache.features, probe.features(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.labels, labels)
    # the same training on cached features and through the frozen backbone gives the same head
    losses = cache.fit(epochs=3, lr=0.05, batch_size=8)
    opt = torch.optim.AdamW(direct.head.parameters(), lr=0.05, weight_decay=0.0)
    direct.train()
    direct_losses = []
    for _ in range(3):
        for x, y in loader:
            loss = F.cross_entropy(direct(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            direct_losses.append(loss.item())
    assert losses == pytest.approx(direct_losses, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(probe.head.weight, direct.head.weight, rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0] and 0.0 <= cache.accuracy() <= 1.0
    # a Dataset works as well as a loader
    cache2 = FeatureCache(probe, TensorDataset(images, labels), batch_size=5)
    torch.testing.assert_close(cache2.features, cache.features, rtol=1e-5, atol=1e-5)
    # ... and so do (inputs, labels) tensors, and a plain features callable with an explicit head
    cache3 = FeatureCache(lambda x: vit.forward_features(x).mean(1), images, labels, batch_size=10)
    assert cache3.probe is None and len(cache3) == 24
    torch.testing.assert_close(cache3.features, vit.forward_features(images).mean(1), rtol=1e-5, atol=1e-5)
    assert not cache3.features.requires_grad
    head = MLPHead(192, 4, k=2)
    assert len(cache3.fit(epochs=1, batch_size=12, head=head)) == 2 and 0.0 <= cache3.accuracy(head) <= 1.0
    with pytest.raises(ValueError, match="head: expected a head module"):
        cache3.fit()
    with pytest.raises(ValueError, match="data: expected a tensor of 24 inputs"):
        FeatureCache(probe, images[:5], labels)


def test_feature_cache_dict_inputs():
    bert = BertModel(BertConfig.tiny(vocab_size=50)).eval()
    probe = LinearProbe(bert, 2)
    ids = torch.randint(0, 50, (4, 6))
    batches = [({"input_ids": ids[:2]}, torch.tensor([0, 1])), ({"input_ids": ids[2:]}, torch.tensor([1, 0]))]
    cache = FeatureCache(probe, batches)
    torch.testing.assert_close(cache.features, bert(ids).last_hidden_state[:, 0], rtol=1e-5, atol=1e-5)

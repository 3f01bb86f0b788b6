"""Layer-wise LR decay, discriminative LR groups, the warmup+cosine scheduler, and the EWC penalty."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from fastpeft.models import BertConfig, BertForSequenceClassification, ViT, ViTConfig
from fastpeft.strategies import EWC, WarmupCosine, discriminative_lr_groups, freeze, layerwise_lr_groups


def lr_of(groups, model):
    """parameter name -> (lr, weight_decay) from a list of param groups."""
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_layerwise_lr_vit_b16():
    with torch.device("meta"):
        m = ViT(ViTConfig.base())
    groups = layerwise_lr_groups(m, 1e-3, decay=0.75, weight_decay=0.05)
    lr = lr_of(groups, m)
    assert len(lr) == len(list(m.parameters()))
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"):
        assert lr[name][0] == pytest.approx(1e-3 * 0.75 ** 13)  # decay^(L+1)
    for i in range(12):
        assert lr[f"blocks.{i}.attn.qkv.weight"][0] == pytest.approx(1e-3 * 0.75 ** (12 - i))  # decay^(L-i)
    assert lr["blocks.11.mlp.fc2.weight"][0] == pytest.approx(0.75e-3)
    assert lr["norm.weight"][0] == lr["head.weight"][0] == pytest.approx(1e-3)
    # no weight decay on biases, norms, [CLS] and position embeddings
    for name in ("cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.3.norm1.weight", "blocks.3.attn.qkv.bias",
                 "norm.bias", "head.bias"):
        assert lr[name][1] == 0.0, name
    for name in ("patch_embed.proj.weight", "blocks.3.attn.qkv.weight", "head.weight"):
        assert lr[name][1] == 0.05, name
    assert [g["layer_id"] for g in groups] == sorted(g["layer_id"] for g in groups)
    torch.optim.AdamW(groups)  # valid optimizer groups


def test_layerwise_lr_bert_and_frozen_params_skipped():
    m = BertForSequenceClassification(BertConfig.tiny(vocab_size=50))
    freeze(m.bert.encoder.layer[0].attention)
    lr = lr_of(layerwise_lr_groups(m, 1.0, decay=0.5), m)
    assert lr["bert.embeddings.word_embeddings.weight"][0] == 0.5 ** 3
    assert lr["bert.encoder.layer.0.output.dense.weight"][0] == 0.5 ** 2
    assert lr["bert.encoder.layer.1.output.dense.weight"][0] == 0.5
    assert lr["classifier.weight"][0] == lr["bert.pooler.dense.bias"][0] == 1.0
    assert "bert.encoder.layer.0.attention.self.query.weight" not in lr


def test_discriminative_lr_groups():
    m = ViT(ViTConfig.tiny(image_size=16, patch_size=8, depth=2, num_classes=3))
    groups = discriminative_lr_groups(m, {"": 1e-5, "blocks.1": 1e-4, "head": 1e-3}, weight_decay=0.1)
    lr = lr_of(groups, m)
    assert lr["head.weight"] == (1e-3, 0.1) and lr["head.bias"] == (1e-3, 0.0)
    assert lr["blocks.1.mlp.fc1.weight"][0] == 1e-4 and lr["blocks.0.mlp.fc1.weight"][0] == 1e-5
    assert lr["cls_token"] == (1e-5, 0.0)
    with pytest.raises(ValueError, match="unmatched"):
        discriminative_lr_groups(m, {"head": 1e-3})
    assert lr_of(discriminative_lr_groups(m, {"head": 1e-3}, default_lr=2e-5), m)["pos_embed"][0] == 2e-5
    with pytest.raises(ValueError, match="unknown 'blocks.9'"):
        discriminative_lr_groups(m, {"blocks.9": 1e-3})


def _lrs(opt):
    return [g["lr"] for g in opt.param_groups]


def test_warmup_cosine_values_and_group_ratios():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.25}])
    sched = WarmupCosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    seen = {0: _lrs(opt)}
    for t in range(1, 201):
        opt.step()
        sched.step()
        seen[t] = _lrs(opt)
    assert seen[0] == [0.0, 0.0]
    assert seen[5] == pytest.approx([0.5, 0.125])  # half-way through warmup
    assert seen[10] == pytest.approx([1.0, 0.25])  # peak
    assert seen[60] == pytest.approx([0.55, 0.1375])  # cosine midpoint: r + (1-r)/2
    assert seen[110] == pytest.approx([0.1, 0.025])  # end: min_lr_ratio
    assert seen[200] == pytest.approx([0.1, 0.025])  # stays at the floor
    for t in range(11, 110):
        assert seen[t][0] < seen[t - 1][0]
        assert seen[t][1] == pytest.approx(0.25 * seen[t][0])  # layer-wise ratios honoured
    assert sched.factor(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_warmup_cosine_matches_transformers():
    p = nn.Parameter(torch.zeros(1))
    o1, o2 = torch.optim.SGD([p], lr=3e-4), torch.optim.SGD([p], lr=3e-4)
    ours = WarmupCosine(o1, 7, 50)
    hf = transformers.get_cosine_schedule_with_warmup(o2, 7, 50)
    for _ in range(51):  # up to total_steps (after it HF's cosine rises again; ours stays at the floor)
        assert _lrs(o1)[0] == pytest.approx(_lrs(o2)[0], abs=1e-12)
        o1.step(), o2.step(), ours.step(), hf.step()
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(o1, 10, 10)


def _ewc_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    return model, batches


def test_ewc_fisher_and_penalty():
    model, batches = _ewc_setup()
    model.train()
    freeze(model[0].bias)  # only trainable parameters are consolidated
    model[3].weight.grad = torch.ones_like(model[3].weight)
    ewc = EWC(model, batches, F.cross_entropy, lam=3.0)
    assert model.training  # mode restored
    torch.testing.assert_close(model[3].weight.grad, torch.ones_like(model[3].weight))  # .grad untouched
    assert set(ewc.fisher) == {"0.weight", "3.weight", "3.bias"}
    # the empirical Fisher by hand (eval mode: no dropout)
    model.eval()
    manual = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                manual[n] += p.grad.square() / len(batches)
    for n in manual:
        torch.testing.assert_close(ewc.fisher[n], manual[n])
    # zero at θ*, exact quadratic away from it, gradient λ F (θ - θ*)
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        deltas = {n: 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.add_(deltas[n])
    pen = ewc.penalty(model)
    expected = 1.5 * sum((ewc.fisher[n] * deltas[n].square()).sum() for n in ewc.fisher)
    torch.testing.assert_close(pen, expected)
    model.zero_grad()
    pen.backward()
    torch.testing.assert_close(model[0].weight.grad, 3.0 * ewc.fisher["0.weight"] * deltas["0.weight"])
    assert model[0].bias.grad is None


def test_ewc_limits_and_errors():
    model, batches = _ewc_setup()
    one = EWC(model, batches, F.cross_entropy, num_batches=1)
    only_first = EWC(model, batches[:1], F.cross_entropy)
    torch.testing.assert_close(one.fisher["3.weight"], only_first.fisher["3.weight"])
    with pytest.raises(ValueError, match="at least one batch"):
        EWC(model, [], F.cross_entropy)
    with pytest.raises(ValueError, match="missing"):
        one.penalty(nn.Linear(5, 3))

"""What trains: full fine-tuning, partial-k, BitFit (paper counts on ViT-B/16), freezing, progressive unfreezing."""
import pytest
import torch

from fastpeft.models import BertConfig, BertForSequenceClassification, ViT, ViTConfig
from fastpeft.strategies import (ProgressiveUnfreezer, bitfit, find_blocks, freeze, freeze_blocks, full_finetune,
                                 num_trainable, param_layer_ids, partial_k, unfreeze)

BLOCK_B16 = 7_087_872  # qkv 1,771,776 + proj 590,592 + fc1 2,362,368 + fc2 2,360,064 + 2 LayerNorms 3,072
HEAD_B16 = 768 * 1000 + 1000
NORM_B16 = 2 * 768
EMBED_B16 = 768 * 3 * 16 * 16 + 768 + 768 + 197 * 768  # patch conv + bias, [CLS], pos_embed


def vit_b16():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return ViT(ViTConfig.base())


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_vit_b16_arithmetic():
    assert EMBED_B16 + 12 * BLOCK_B16 + NORM_B16 + HEAD_B16 == sum(p.numel() for p in vit_b16().parameters())


def test_bitfit_vit_b16_matches_paper():
    m = bitfit(vit_b16(), train_head=False)
    # per block: qkv 2304 + proj 768 + fc1 3072 + fc2 768 + LayerNorm β 2 x 768 = 8448
    assert 12 * 8448 + 768 + 768 == 102_912  # + patch-embed bias + final-norm β
    assert num_trainable(m) == 102_912
    assert all(n.endswith(".bias") for n in trainable_names(m))
    assert "blocks.3.norm1.bias" in trainable_names(m) and "norm.bias" in trainable_names(m)
    assert not any(n.startswith("head.") for n in trainable_names(m))
    m = bitfit(vit_b16())  # default: the (new) head trains fully
    assert num_trainable(m) == 102_912 + HEAD_B16


def test_bitfit_bert_classifier():
    m = bitfit(BertForSequenceClassification(BertConfig.tiny(vocab_size=50)))
    names = trainable_names(m)
    assert {"classifier.weight", "classifier.bias", "bert.embeddings.LayerNorm.bias",
            "bert.encoder.layer.1.attention.self.query.bias", "bert.pooler.dense.bias"} <= names
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in names)


def test_full_finetune_and_freeze_unfreeze():
    m = vit_b16()
    freeze(m)
    assert num_trainable(m) == 0
    unfreeze(m.head, m.norm.weight, [m.cls_token])
    assert trainable_names(m) == {"head.weight", "head.bias", "norm.weight", "cls_token"}
    full_finetune(m)
    assert num_trainable(m) == sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match="freeze/unfreeze"):
        freeze(3)


@pytest.mark.parametrize("k,expected", [(0, NORM_B16 + HEAD_B16), (2, 2 * BLOCK_B16 + NORM_B16 + HEAD_B16),
                                        (12, 12 * BLOCK_B16 + NORM_B16 + HEAD_B16)], ids=["k0", "k2", "k12"])
def test_partial_k_vit_b16(k, expected):
    m = partial_k(vit_b16(), k)
    assert num_trainable(m) == expected
    if k == 2:
        blocks = {n.split(".")[1] for n in trainable_names(m) if n.startswith("blocks.")}
        assert blocks == {"10", "11"}
    with pytest.raises(ValueError, match="k: expected an int in"):
        partial_k(m, 13)


def test_partial_k_bert():
    m = partial_k(BertForSequenceClassification(BertConfig.tiny(vocab_size=50)), 1)
    names = trainable_names(m)
    assert any(n.startswith("bert.encoder.layer.1.") for n in names)
    assert not any(n.startswith(("bert.encoder.layer.0.", "bert.embeddings.")) for n in names)
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= names


def test_freeze_blocks():
    m = freeze_blocks(vit_b16(), 4)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.3.mlp.fc2.bias"} <= frozen
    assert not any(n.startswith(("blocks.4.", "head.", "norm.")) for n in frozen)
    assert num_trainable(m) == 8 * BLOCK_B16 + NORM_B16 + HEAD_B16


def test_layer_ids():
    ids, L = param_layer_ids(vit_b16())
    assert L == 12 and find_blocks(vit_b16())[0] == "blocks"
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.bias"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.11.norm2.bias"] == 12
    assert ids["norm.weight"] == ids["head.bias"] == 13
    ids, L = param_layer_ids(BertForSequenceClassification(BertConfig.tiny(vocab_size=50)))
    assert L == 2 and ids["bert.embeddings.LayerNorm.weight"] == 0
    assert ids["bert.encoder.layer.1.output.dense.weight"] == 2 and ids["classifier.bias"] == 3


def test_progressive_unfreezing_ulmfit():
    m = ViT(ViTConfig.tiny(image_size=16, patch_size=8, depth=4, num_classes=3))
    pu = ProgressiveUnfreezer(m)
    top = {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert trainable_names(m) == top
    blocks_trainable = lambda: sorted({int(n.split(".")[1]) for n in trainable_names(m) if n.startswith("blocks.")})
    for epoch, expected in enumerate([[3], [2, 3], [1, 2, 3], [0, 1, 2, 3]], start=1):
        assert pu.step() == [4 - epoch + 1]  # layer id of the newly unfrozen block
        assert blocks_trainable() == expected
        assert "cls_token" not in trainable_names(m)
    assert not pu.done
    assert pu.step() == [0]  # finally the embeddings
    assert pu.done and num_trainable(m) == sum(p.numel() for p in m.parameters())
    assert pu.step() == []
    # two blocks per step, and resuming from a state dict
    pu2 = ProgressiveUnfreezer(m, blocks_per_step=2)
    pu2.step()
    assert blocks_trainable() == [2, 3]
    state = pu2.state_dict()
    full_finetune(m)
    pu2.load_state_dict(state)
    assert blocks_trainable() == [2, 3] and "cls_token" not in trainable_names(m)

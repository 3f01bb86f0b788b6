"""fastpeft.models.ViT: shapes, timm names and sizes, pooling, larger images, block hooks."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpeft.models import Attention, Block, ViT, ViTConfig
from fastpeft.models.pos_embed import interpolate_pos_embed, resize_pos_embed


def tiny(**kw):
    torch.manual_seed(0)
    return ViT(ViTConfig.tiny(**{**dict(image_size=32, patch_size=8, depth=2, num_classes=5), **kw})).eval()


def test_shapes():
    m = tiny()
    x = torch.randn(3, 3, 32, 32)
    assert m.embed(x).shape == (3, 17, 192)
    assert m.forward_features(x).shape == (3, 17, 192)
    assert m(x).shape == (3, 5)
    assert m.num_prefix_tokens == 1 and m.grid == (4, 4)


def test_presets_and_vit_b16_size():
    assert (ViTConfig.tiny().dim, ViTConfig.tiny().heads, ViTConfig.tiny().depth) == (192, 3, 12)
    assert (ViTConfig.small().dim, ViTConfig.small().heads) == (384, 6)
    assert (ViTConfig.base().dim, ViTConfig.base().heads, ViTConfig.base().mlp_dim) == (768, 12, 3072)
    assert ViTConfig.tiny(depth=4).depth == 4
    with torch.device("meta"):
        m = ViT(ViTConfig.base())
    assert sum(p.numel() for p in m.parameters()) == 86_567_656  # timm vit_base_patch16_224


def test_timm_names():
    names = set(dict(tiny(depth=1).named_parameters()))
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias", "head.weight", "head.bias"}
    for sub in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        expected |= {f"blocks.0.{sub}.weight", f"blocks.0.{sub}.bias"}
    assert names == expected


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(16, 4).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attn.proj((p @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_pooling_skips_prefix_tokens(pool):
    m = tiny(pool=pool)
    tokens = torch.randn(2, 20, 192)
    m.num_prefix_tokens = 4  # as VPT does after inserting 3 prompts
    expected = tokens[:, 0] if pool == "cls" else tokens[:, 4:].mean(1)
    torch.testing.assert_close(m.pool(tokens), expected)


def test_larger_image_interpolates_pos_embed():
    m = tiny()
    x = torch.randn(2, 3, 48, 64)  # grid (6, 8) instead of (4, 4): non-square
    out = m(x)
    assert out.shape == (2, 5)
    # the same as adding the interpolated table by hand
    tokens, grid = m.patch_embed(x)
    assert grid == (6, 8)
    pos = interpolate_pos_embed(m.pos_embed, (4, 4), (6, 8))
    expected = torch.cat([m.cls_token.expand(2, -1, -1), tokens], 1) + pos
    torch.testing.assert_close(m.embed(x), expected)
    # gradients reach the learned table through the interpolation
    m(x).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0


def test_set_image_size_is_permanent_and_equivalent():
    m = tiny()
    x = torch.randn(2, 3, 48, 64)
    on_the_fly = m(x)
    m.set_image_size((48, 64))
    assert m.pos_embed.shape == (1, 1 + 48, 192) and m.grid == (6, 8) and m.config.image_size == (48, 64)
    assert isinstance(m.pos_embed, nn.Parameter) and m.pos_embed.requires_grad
    torch.testing.assert_close(m(x), on_the_fly)
    m.set_image_size((48, 64))  # no-op
    assert m.pos_embed.shape == (1, 49, 192)
    assert resize_pos_embed(tiny(), (48, 64)).pos_embed.shape == (1, 49, 192)  # the functional helper
    with pytest.raises(ValueError, match="set_image_size"):
        resize_pos_embed(nn.Linear(2, 2), 64)


def test_block_parallel_adapter_hook():
    torch.manual_seed(0)
    blk = Block(16, 2, 32).eval()
    x = torch.randn(2, 3, 16)
    seen = {}

    class Record(nn.Module):
        def forward(self, x, residual):
            seen["x"], seen["residual"] = x, residual
            return residual + 1.0

    plain = blk(x)
    blk.parallel_adapter = Record()
    out = blk(x)
    after_attn = x + blk.attn(blk.norm1(x))
    torch.testing.assert_close(seen["x"], after_attn)  # AdaptFormer reads the residual stream
    torch.testing.assert_close(seen["residual"], plain)
    torch.testing.assert_close(out, plain + 1.0)


@pytest.mark.skipif(importlib.util.find_spec("fastpeft.ops.prefix_attention") is None,
                    reason="fastpeft.ops.prefix_attention not present in this checkout")
@pytest.mark.parametrize("bp", [1, 2], ids=["shared-prefix", "per-sample-prefix"])
def test_prefix_kv_matches_concatenated_attention(bp):
    torch.manual_seed(0)
    attn = Attention(32, 4).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    pk, pv = torch.randn(2, bp, 4, 3, 8, dtype=torch.float64).unbind(0)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ctx = F.scaled_dot_product_attention(q, torch.cat([pk.expand(2, -1, -1, -1), k], 2),
                                         torch.cat([pv.expand(2, -1, -1, -1), v], 2))
    expected = attn.proj(ctx.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x, prefix_kv=(pk, pv)), expected)
    m = tiny(depth=2)
    img = torch.randn(2, 3, 32, 32)
    none = [None, None]
    torch.testing.assert_close(m(img, prefix_kv=none), m(img))


def test_bad_input_raises():
    m = tiny()
    with pytest.raises(ValueError, match="images: expected shape"):
        m(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="prefix_kv: expected one entry per block"):
        m(torch.randn(1, 3, 32, 32), prefix_kv=[None])
    with pytest.raises(ValueError, match="pool"):
        ViTConfig(pool="max")
    with pytest.raises(ValueError, match="image_size"):
        ViTConfig(image_size=30)

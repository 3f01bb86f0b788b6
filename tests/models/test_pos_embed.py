"""fastpeft.models.pos_embed.interpolate_pos_embed: identity, non-square grids, prefix rows, fp32 compute."""
import pytest
import torch
import torch.nn.functional as F

from fastpeft.models.pos_embed import grid_size, interpolate_pos_embed


def _manual(pe, old, new, n_prefix):
    """Independent reference: reshape the patch rows to an image and resize in float64."""
    d = pe.shape[-1]
    grid = pe[:, n_prefix:].double().reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return torch.cat([pe[:, :n_prefix].double(), grid.permute(0, 2, 3, 1).reshape(1, -1, d)], 1)


def test_unchanged_grid_is_identity():
    pe = torch.randn(1, 1 + 14 * 14, 32)
    assert interpolate_pos_embed(pe, (14, 14), (14, 14)) is pe
    assert interpolate_pos_embed(pe, 14, 14) is pe


@pytest.mark.parametrize("old,new,n_prefix", [((4, 4), (6, 6), 1), ((3, 5), (7, 4), 1), ((4, 6), (2, 3), 2),
                                              ((5, 5), (8, 11), 0)],
                         ids=["square-up", "non-square", "down-2-prefix", "no-prefix"])
def test_matches_manual_bicubic_and_keeps_prefix(old, new, n_prefix):
    pe = torch.randn(1, n_prefix + old[0] * old[1], 24)
    out = interpolate_pos_embed(pe, old, new, n_prefix=n_prefix)
    assert out.shape == (1, n_prefix + new[0] * new[1], 24) and out.dtype == pe.dtype
    torch.testing.assert_close(out[:, :n_prefix], pe[:, :n_prefix], rtol=0, atol=0)  # prefix untouched
    torch.testing.assert_close(out.double(), _manual(pe, old, new, n_prefix), rtol=1e-5, atol=1e-5)


def test_row_major_layout_respected():
    # a field that varies only along columns must stay column-only after resizing a non-square grid
    gh, gw, d = 3, 5, 2
    cols = torch.arange(gw, dtype=torch.float32).repeat(gh)  # row-major: index r*gw + c -> c
    pe = torch.cat([torch.zeros(1, 1, d), cols[None, :, None].expand(1, gh * gw, d)], 1)
    out = interpolate_pos_embed(pe, (gh, gw), (6, 9))[0, 1:, 0].reshape(6, 9)
    torch.testing.assert_close(out, out[:1].expand(6, 9))
    assert (out[0, 1:] > out[0, :-1]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_computed_in_fp32(dtype):
    pe = torch.randn(1, 1 + 16, 64).to(dtype)
    out = interpolate_pos_embed(pe, (4, 4), (7, 5))
    assert out.dtype == dtype
    expected = interpolate_pos_embed(pe.float(), (4, 4), (7, 5)).to(dtype)  # fp32 compute, one rounding
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_constant_field_stays_constant():
    pe = torch.full((1, 1 + 9, 8), 0.25)
    out = interpolate_pos_embed(pe, (3, 3), (10, 6))
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


def test_gradient_flows():
    pe = torch.randn(1, 1 + 16, 8, requires_grad=True)
    interpolate_pos_embed(pe, (4, 4), (6, 6)).sum().backward()
    assert pe.grad is not None and torch.all(pe.grad[:, 0] == 1)


def test_bad_arguments_raise():
    pe = torch.randn(1, 1 + 16, 8)
    with pytest.raises(ValueError, match="pos_embed: expected shape"):
        interpolate_pos_embed(pe, (4, 5), (6, 6))
    with pytest.raises(ValueError, match="new_grid"):
        interpolate_pos_embed(pe, (4, 4), (0, 6))
    with pytest.raises(ValueError, match="pos_embed: expected 3 dims"):
        interpolate_pos_embed(pe[0], (4, 4), (6, 6))
    with pytest.raises(ValueError, match="image_size: expected a multiple"):
        grid_size(30, 16)
    assert grid_size((32, 48), 16) == (2, 3)

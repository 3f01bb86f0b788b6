"""Per-process dropout streams (``fastpeft._dropout.set_stream`` / ``fastpeft.distributed.set_dropout_rank``)."""
import pytest
import torch

import fastpeft
import fastpeft.distributed as fdist
from fastpeft import _dropout


@pytest.fixture(autouse=True)
def _reset():
    yield
    _dropout.set_stream(0)


def _draw(stream, n=64, seed=3):
    _dropout.set_stream(stream)
    torch.manual_seed(seed)
    seeds = [int(_dropout.new_seed()) for _ in range(n)]
    return seeds, torch.rand(())  # and where the default generator is afterwards


def test_stream_zero_is_the_plain_draw():
    torch.manual_seed(3)
    plain = [int(torch.randint(0, _dropout.SEED_BOUND, (), dtype=torch.int64)) for _ in range(64)]
    assert _draw(0)[0] == plain


def test_streams_distinct_reproducible_and_generator_unchanged():
    base, after0 = _draw(0)
    seen = set(base)
    for k in (1, 2, 3, 7, 1000):
        seeds, after = _draw(k)
        assert seeds == _draw(k)[0]  # reproducible from (seed, stream)
        assert torch.equal(after, after0)  # the default generator advanced exactly as on stream 0
        assert all(0 <= s < 2**31 for s in seeds)
        assert not seen & set(seeds)  # no seed shared with another stream
        seen |= set(seeds)


def test_masks_differ_between_ranks():
    x = torch.ones(4, 33)
    outs = []
    for rank in (0, 1):
        fdist.set_dropout_rank(rank)
        torch.manual_seed(0)
        outs.append(fastpeft.lora_linear(x, torch.zeros(5, 33), None, torch.ones(2, 33), torch.ones(5, 2), 1.0,
                                         dropout_p=0.5, training=True))
    assert not torch.equal(outs[0], outs[1])


def test_set_dropout_rank_without_process_group_is_rank_0():
    assert fdist.set_dropout_rank() == 0
    assert _dropout.get_stream() == 0


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, True, "1"])
def test_bad_stream_raises(bad):
    with pytest.raises(ValueError, match="stream"):
        _dropout.set_stream(bad)


@pytest.mark.parametrize("config", [
    lambda: fastpeft.VPTConfig(num_prompts=2, deep=True, dropout=0.5),
    lambda: fastpeft.AdapterConfig(kind="houlsby", bottleneck=4, dropout=0.5),
    lambda: fastpeft.LoraConfig(r=4, lora_dropout=0.5, target_modules=["qkv"], init_lora_weights=False),
], ids=["vpt", "adapter", "lora"])
def test_model_level_dropout_follows_the_rank(config):
    """Every fastpeft method's dropout (VPT prompts included) draws per-rank masks."""
    from tests.api._models import fp_vit

    pm = fastpeft.get_peft_model(fp_vit(), config()).train()
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def out(rank):
        fdist.set_dropout_rank(rank)
        torch.manual_seed(4)
        with torch.no_grad():
            return pm(images=x)
    a, b = out(0), out(1)
    assert not torch.equal(a, b)
    assert torch.equal(a, out(0)) and torch.equal(b, out(1))

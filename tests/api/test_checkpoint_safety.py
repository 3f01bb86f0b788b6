"""Checkpoint safety for training runs: atomic saves (a crash mid-save never leaves a checkpoint
that loads), checksummed weights, and in-place reloads (resuming) that validate everything first."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft import checkpoint as ckpt
from fastpeft.checkpoint import CHECKSUM_KEY, CONFIG_NAME, WEIGHTS_NAME

from ._models import assert_same_snapshot, build, run, snapshot


def _model(seed=0, r=4):
    pm = fastpeft.get_peft_model(build("hf_llama"), fastpeft.LoraConfig(r=r, init_lora_weights=False))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return pm


def _adapter(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _truncations(n):
    """Cut points: inside the 8-byte length, inside the JSON header, inside the data, 1 byte short."""
    return sorted({1, 7, 8, 20, 100, n // 2, n - 37, n - 1})


def test_truncated_weights_raise_and_leave_the_model_untouched(tmp_path):
    _model(seed=1).save_pretrained(str(tmp_path / "c"))
    data = (tmp_path / "c" / WEIGHTS_NAME).read_bytes()
    live = _model(seed=2)  # a model being trained: its weights must survive a bad resume
    before, out = snapshot(live), run("hf_llama", live)
    for cut in _truncations(len(data)):
        (tmp_path / "c" / WEIGHTS_NAME).write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated") as e:
            live.load_adapter(str(tmp_path / "c"), "default", is_trainable=True)  # in place (resume)
        assert WEIGHTS_NAME in str(e.value)
        with pytest.raises(ValueError, match="truncated"):
            live.load_adapter(str(tmp_path / "c"), "other")  # as a new adapter
        assert_same_snapshot(before, snapshot(live))
        assert torch.equal(run("hf_llama", live), out)
        assert list(live.peft_config) == ["default"]


def test_corrupt_tensor_bytes_fail_the_checksum(tmp_path):
    d = tmp_path / "c"
    _model(seed=1).save_pretrained(str(d))
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0x10  # a flipped bit in the last tensor: still a valid, finite safetensors file
    (d / WEIGHTS_NAME).write_bytes(bytes(data))
    live = _model(seed=2)
    before = snapshot(live)
    with pytest.raises(ValueError, match="checksum"):
        live.load_adapter(str(d), "default", is_trainable=True)
    with pytest.raises(ValueError, match="checksum"):
        fastpeft.PeftModel.from_pretrained(build("hf_llama"), str(d))
    assert_same_snapshot(before, snapshot(live))


def test_checksum_is_written_and_files_without_one_still_load(tmp_path):
    d = tmp_path / "c"
    src = _model(seed=1)
    src.save_pretrained(str(d))
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        assert len(f.metadata()[CHECKSUM_KEY]) == 64
    save_file(load_file(str(d / WEIGHTS_NAME)), str(d / WEIGHTS_NAME), metadata={"format": "pt"})  # as PEFT writes
    live = _model(seed=2)
    live.load_adapter(str(d), "default", is_trainable=True)
    assert _same(_adapter(live), _adapter(src))


def test_in_place_reload_resumes_exactly(tmp_path):
    src = _model(seed=1)
    src.save_pretrained(str(tmp_path))
    live = _model(seed=2)
    assert not _same(_adapter(live), _adapter(src))
    live.load_adapter(str(tmp_path), "default", is_trainable=True)
    assert _same(_adapter(live), _adapter(src))
    assert all(p.requires_grad for n, p in live.named_parameters() if "lora_" in n)
    assert torch.equal(run("hf_llama", live), run("hf_llama", src))
    live.load_adapter(str(tmp_path), "default", is_trainable=False)
    assert not any(p.requires_grad for p in live.parameters())


@pytest.mark.parametrize("other", ["rank", "method"])
def test_mismatched_in_place_reload_raises_and_leaves_the_model_untouched(tmp_path, other):
    if other == "rank":
        _model(seed=1, r=8).save_pretrained(str(tmp_path))
        words = ["(4, 32)", "(8, 32)"]
    else:
        fastpeft.get_peft_model(build("hf_llama"), fastpeft.AdapterConfig(bottleneck=4)).save_pretrained(str(tmp_path))
        words = ["AdapterConfig", "LoraConfig"]
    live = _model(seed=2)
    before = snapshot(live)
    with pytest.raises(ValueError) as e:
        live.load_adapter(str(tmp_path), "default", is_trainable=True)
    for w in words:
        assert w in str(e.value)
    assert_same_snapshot(before, snapshot(live))


def _leftovers(d):
    return [f for f in os.listdir(d) if f.endswith(".tmp")]


@pytest.mark.parametrize("when", ["weights", "config"])
def test_crash_while_writing_keeps_the_old_checkpoint(tmp_path, monkeypatch, when):
    """A crash while a file is written (here: an exception after half of it) leaves the previous
    checkpoint whole and loadable, and no temporary file behind."""
    import safetensors.torch

    d = str(tmp_path)
    old = _model(seed=1)
    old.save_pretrained(d)
    new = _model(seed=2)
    if when == "weights":
        def crash(tensors, path, metadata=None):
            with open(path, "wb") as f:
                f.write(b"\x10" * 40)
            raise OSError("disk full")
        monkeypatch.setattr(safetensors.torch, "save_file", crash)
    else:
        real = ckpt._staged

        def crash(path, write):
            if path.endswith(CONFIG_NAME):
                raise OSError("disk full")
            return real(path, write)
        monkeypatch.setattr(ckpt, "_staged", crash)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(d)
    monkeypatch.undo()
    assert _leftovers(d) == []
    live = _model(seed=3)
    live.load_adapter(d, "default", is_trainable=True)
    assert _same(_adapter(live), _adapter(old))


@pytest.mark.parametrize("step", [0, 1])
def test_crash_between_renames_leaves_no_loadable_checkpoint(tmp_path, monkeypatch, step):
    """Killed after the old config is removed (step 0: before the weights are renamed in; step 1:
    after): the directory does not load - it never pairs new weights with an old config - and the
    next save completes it."""
    d = str(tmp_path)
    _model(seed=1).save_pretrained(d)
    new = _model(seed=2)
    real, calls = os.replace, []

    def crash(src, dst):
        calls.append(dst)
        if len(calls) > step:
            raise KeyboardInterrupt  # e.g. the job is killed
        return real(src, dst)
    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(d)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(d, CONFIG_NAME))
    live = _model(seed=3)
    before = snapshot(live)
    with pytest.raises(FileNotFoundError, match="adapter config not found"):
        live.load_adapter(d, "default", is_trainable=True)
    assert_same_snapshot(before, snapshot(live))
    new.save_pretrained(d)
    live.load_adapter(d, "default", is_trainable=True)
    assert _same(_adapter(live), _adapter(new))
    assert _leftovers(d) == []

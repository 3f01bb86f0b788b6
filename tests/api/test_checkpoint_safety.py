"""Checkpoint safety for training runs: atomic saves (a crash mid-save never leaves a checkpoint
that loads), checksummed weights, and in-place reloads (resuming) that validate everything first."""
import copy
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


def _load_all_ways(live, base, d):
    """Every public entry point that reads a checkpoint directory; ``-> the errors raised``."""
    errors = []
    for load in (lambda: live.load_adapter(d, "default", is_trainable=True),  # in place (resume)
                 lambda: live.load_adapter(d, "other"),  # as a new adapter
                 lambda: fastpeft.PeftModel.from_pretrained(base, d),  # onto a bare model
                 lambda: fastpeft.PeftModel.from_pretrained(base, d, is_trainable=True)):
        with pytest.raises(ValueError) as e:
            load()
        errors.append(str(e.value))
    return errors


def test_every_truncation_fails_clearly_on_every_entry_point(tmp_path):
    """The weights file cut at (nearly) every byte offset (0 bytes, inside the 8-byte length, the
    JSON header, the tensor data, 1 byte short): each load entry point raises a ValueError naming the
    file, and neither the live PeftModel nor the bare base model changes."""
    d = str(tmp_path / "c")
    _model(seed=1).save_pretrained(d)
    path = os.path.join(d, WEIGHTS_NAME)
    data = open(path, "rb").read()
    live, base = _model(seed=2), build("hf_llama")
    before, base_before, out = snapshot(live), snapshot(base), run("hf_llama", live)
    import struct
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    # every offset up to a little past the header, then every 11th byte of the data, and the last 16
    cuts = sorted(set(range(header_end + 16)) | set(range(header_end, len(data), 11)) |
                  set(range(len(data) - 16, len(data))))
    for cut in cuts:
        with open(path, "wb") as f:
            f.write(data[:cut])
        for msg in _load_all_ways(live, base, d):
            assert path in msg and "truncated" in msg, (cut, msg)
    assert_same_snapshot(before, snapshot(live))
    assert_same_snapshot(base_before, snapshot(base))
    assert list(live.peft_config) == ["default"] and torch.equal(run("hf_llama", live), out)


def _rewrite_header(data: bytes, edit) -> bytes:
    """``data`` with its safetensors JSON header passed through ``edit`` (tensor bytes kept)."""
    import json
    import struct
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def _first_key(h):
    return sorted(k for k in h if k != "__metadata__")[0]


def _shrink_data(h):  # a header that parses but whose tensor spans more bytes than the file holds
    k = _first_key(h)
    h[k]["data_offsets"][1] += 4096


def _reshape(h):  # same byte count, another shape: a checkpoint of another model
    k = _first_key(h)
    r, c = h[k]["shape"]
    h[k]["shape"] = [r * 2, c // 2]


def _retype(h):  # the same bytes read as int32
    h[_first_key(h)]["dtype"] = "I32"


def _drop_checksum(h):
    h["__metadata__"].pop(CHECKSUM_KEY)


@pytest.mark.parametrize("edit,words", [
    (_shrink_data, ["truncated"]),
    (_reshape, ["checksum"]),
    (_retype, ["checksum"]),
    ((lambda h: (_drop_checksum(h), _reshape(h))), ["expected shape"]),  # PEFT-written (no checksum)
    ((lambda h: (_drop_checksum(h), _retype(h))), ["expected a floating tensor"]),
], ids=["data-short", "reshaped", "retyped", "reshaped-no-checksum", "retyped-no-checksum"])
def test_bad_header_fails_clearly_on_every_entry_point(tmp_path, edit, words):
    d = str(tmp_path / "c")
    _model(seed=1).save_pretrained(d)
    path = os.path.join(d, WEIGHTS_NAME)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(_rewrite_header(data, edit))
    live, base = _model(seed=2), build("hf_llama")
    before, base_before = snapshot(live), snapshot(base)
    for msg in _load_all_ways(live, base, d):
        assert path in msg and all(w in msg for w in words), msg
    assert_same_snapshot(before, snapshot(live))
    assert_same_snapshot(base_before, snapshot(base))


def test_trailing_garbage_and_truncated_config_fail_clearly(tmp_path):
    d = str(tmp_path / "c")
    _model(seed=1).save_pretrained(d)
    path, cfg = os.path.join(d, WEIGHTS_NAME), os.path.join(d, CONFIG_NAME)
    data, text = open(path, "rb").read(), open(cfg, "rb").read()
    live, base = _model(seed=2), build("hf_llama")
    before, base_before = snapshot(live), snapshot(base)
    with open(path, "wb") as f:  # bytes after the last tensor: not a file this library wrote
        f.write(data + b"\0" * 16)
    for msg in _load_all_ways(live, base, d):
        assert path in msg, msg
    with open(path, "wb") as f:
        f.write(data)
    for cut in (0, 1, len(text) // 2, len(text) - 1):
        with open(cfg, "wb") as f:
            f.write(text[:cut])
        for msg in _load_all_ways(live, base, d):
            assert cfg in msg and "corrupt adapter config" in msg, msg
    assert_same_snapshot(before, snapshot(live))
    assert_same_snapshot(base_before, snapshot(base))


def test_truncated_optimizer_state_fails_clearly(tmp_path):
    """fastpeft.distributed.load_optimizer (one process, no process group): a truncated
    optimizer_state.pt raises naming the file and leaves the optimizer's state as it was."""
    import fastpeft.distributed as fdist

    src = _model(seed=1)
    opt = torch.optim.AdamW(fdist.trainable_parameters(src), lr=1e-2)
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    src(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # a real AdamW state (step, exp_avg, exp_avg_sq per parameter)
    fdist.save_pretrained(src, str(tmp_path), optimizer=opt)
    path = os.path.join(str(tmp_path), fdist.OPTIMIZER_NAME)
    data = open(path, "rb").read()
    live = _model(seed=2)
    opt2 = torch.optim.AdamW(fdist.trainable_parameters(live), lr=1e-2)
    before = copy.deepcopy(opt2.state_dict())
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ValueError, match="truncated") as e:
            fdist.load_optimizer(live, opt2, str(tmp_path))
        assert path in str(e.value)
        assert opt2.state_dict() == before
    with open(path, "wb") as f:
        f.write(data)
    fdist.load_optimizer(live, opt2, str(tmp_path))
    assert len(opt2.state) == len(fdist.trainable_parameters(live))

"""Checkpoint validation: corrupt, truncated or mismatched files raise errors naming the file and
the key, and leave the model exactly as it was."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from fastpeft.checkpoint import CONFIG_NAME, WEIGHTS_NAME

from ._models import assert_same_snapshot, build, fp_vit, run, snapshot

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture()
def saved(tmp_path):
    fp = fastpeft.get_peft_model(build("hf_llama"), fastpeft.LoraConfig(r=4, init_lora_weights=False))
    fp.save_pretrained(str(tmp_path))
    return tmp_path


def _rewrite_weights(d, fn):
    w = load_file(str(d / WEIGHTS_NAME))
    fn(w)
    save_file(w, str(d / WEIGHTS_NAME))


def _rewrite_config(d, fn):
    c = json.loads((d / CONFIG_NAME).read_text())
    fn(c)
    (d / CONFIG_NAME).write_text(json.dumps(c))


CORRUPTIONS = {
    "missing-key": (lambda d: _rewrite_weights(d, lambda w: w.pop(KEY)), [WEIGHTS_NAME, KEY, "missing"]),
    "unexpected-key": (lambda d: _rewrite_weights(d, lambda w: w.__setitem__("base_model.model.zzz.lora_A.weight",
                                                                             torch.zeros(2))),
                       [WEIGHTS_NAME, "zzz", "unexpected"]),
    "wrong-shape": (lambda d: _rewrite_weights(d, lambda w: w.__setitem__(KEY, torch.zeros(5, 32))),
                    [WEIGHTS_NAME, KEY, "(4, 32)", "(5, 32)"]),
    "integer-dtype": (lambda d: _rewrite_weights(d, lambda w: w.__setitem__(KEY, torch.zeros(4, 32, dtype=torch.int32))),
                      [WEIGHTS_NAME, KEY, "floating"]),
    "nan": (lambda d: _rewrite_weights(d, lambda w: w[KEY].fill_(float("nan"))), [WEIGHTS_NAME, KEY, "NaN"]),
    "truncated": (lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-37]),
                  [WEIGHTS_NAME, "truncated"]),
    "garbage": (lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x07" * 64), [WEIGHTS_NAME, "corrupt"]),
    "no-weights": (lambda d: os.remove(d / WEIGHTS_NAME), [WEIGHTS_NAME, "not found"]),
    "no-config": (lambda d: os.remove(d / CONFIG_NAME), [CONFIG_NAME, "not found"]),
    "bad-json": (lambda d: (d / CONFIG_NAME).write_text("{\"peft_type\": \"LORA\", "), [CONFIG_NAME, "JSON"]),
    "unknown-peft-type": (lambda d: _rewrite_config(d, lambda c: c.__setitem__("peft_type", "LOHA")),
                          [CONFIG_NAME, "peft_type", "LOHA"]),
    "dora-without-magnitude": (lambda d: _rewrite_config(d, lambda c: c.__setitem__("use_dora", True)),
                               [WEIGHTS_NAME, "lora_magnitude_vector"]),
    "rank-mismatch": (lambda d: _rewrite_config(d, lambda c: c.__setitem__("r", 8)), [WEIGHTS_NAME, KEY, "(8, 32)"]),
    "target-mismatch": (lambda d: _rewrite_config(d, lambda c: c.__setitem__("target_modules", ["q_proj"])),
                        [WEIGHTS_NAME, "unexpected", "v_proj"]),
    "target-not-in-model": (lambda d: _rewrite_config(d, lambda c: c.__setitem__("target_modules", ["nope"])),
                            ["nope"]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_checkpoint_raises_and_leaves_model_untouched(case, saved):
    corrupt, words = CORRUPTIONS[case]
    corrupt(saved)
    model = build("hf_llama")
    ref = run("hf_llama", model)
    before = snapshot(model)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        fastpeft.PeftModel.from_pretrained(model, str(saved))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert_same_snapshot(before, snapshot(model))
    assert torch.equal(run("hf_llama", model), ref)


def test_bad_load_adapter_leaves_peft_model_untouched(saved, tmp_path):
    pm = fastpeft.get_peft_model(build("hf_llama"), fastpeft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    _rewrite_weights(saved, lambda w: w.__setitem__(KEY, torch.zeros(4, 31)))
    before = snapshot(pm)
    with pytest.raises(ValueError, match="q_proj.lora_A.weight"):
        pm.load_adapter(str(saved), adapter_name="other")
    assert_same_snapshot(before, snapshot(pm))
    assert list(pm.peft_config) == ["default"]


@pytest.mark.parametrize("config", [
    fastpeft.AdapterConfig(kind="houlsby", bottleneck=4),
    fastpeft.BitFitConfig(),
    fastpeft.VPTConfig(num_prompts=2, deep=True),
    fastpeft.PrefixTuningConfig(num_virtual_tokens=2),
], ids=["adapter", "bitfit", "vpt", "prefix"])
def test_fastpeft_only_methods_round_trip_and_validate(config, tmp_path):
    base = build("fp_vit")
    pm = fastpeft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    out = run("fp_vit", pm)
    pm.save_pretrained(str(tmp_path))
    back = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.equal(run("fp_vit", back), out)
    # a shape mismatch in any tensor is refused with the key named
    w = load_file(str(tmp_path / WEIGHTS_NAME))
    key = sorted(w)[0]
    w[key] = torch.zeros(*w[key].shape[:-1], w[key].shape[-1] + 1)
    save_file(w, str(tmp_path / WEIGHTS_NAME))
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        fastpeft.PeftModel.from_pretrained(model, str(tmp_path))
    assert_same_snapshot(before, snapshot(model))
    assert model.num_prefix_tokens == 1


def test_adapter_checkpoint_into_wrong_model_raises(tmp_path):
    pm = fastpeft.get_peft_model(build("fp_vit"), fastpeft.AdapterConfig(kind="pfeiffer", bottleneck=4))
    pm.save_pretrained(str(tmp_path))
    other = fp_vit(dim=64, heads=4)
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"mlp\.fc2\.adapters\.down\.weight"):
        fastpeft.PeftModel.from_pretrained(other, str(tmp_path))
    assert_same_snapshot(before, snapshot(other))

"""Configs: PEFT field names, to_dict / from_dict matching PEFT's adapter_config.json."""
import dataclasses
import json

import peft
import pytest

import fastpeft
from fastpeft.config import PEFT_TYPES, config_from_dict


def test_lora_config_peft_defaults_and_fields():
    ours, theirs = fastpeft.LoraConfig(), peft.LoraConfig()
    for f in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save", "use_rslora",
              "init_lora_weights"):
        assert getattr(ours, f) == getattr(theirs, f), f


@pytest.mark.parametrize("ours,theirs", [
    (lambda: fastpeft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q", "v"], bias="all",
                                 modules_to_save=["head"], use_rslora=True, init_lora_weights="gaussian"),
     lambda: peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q", "v"], bias="all",
                             modules_to_save=["head"], use_rslora=True, init_lora_weights="gaussian")),
    (lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM"),
     lambda: peft.PromptTuningConfig(num_virtual_tokens=7, task_type="CAUSAL_LM")),
    (lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=9,
                                         task_type="CAUSAL_LM"),
     lambda: peft.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=9,
                                     task_type="CAUSAL_LM")),
], ids=["lora", "prompt", "prefix"])
def test_config_json_both_ways(ours, theirs, tmp_path):
    o, t = ours(), theirs()
    # ours -> PEFT's reader
    (tmp_path / "adapter_config.json").write_text(json.dumps(o.to_dict()))
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is type(t)
    for k, v in o.to_dict().items():
        if hasattr(t, k) and k not in ("peft_type", "target_modules"):
            assert getattr(loaded, k) == v, k
    assert str(loaded.peft_type.value if hasattr(loaded.peft_type, "value") else loaded.peft_type) == o.peft_type
    # PEFT's json -> ours
    t.save_pretrained(str(tmp_path / "p"))
    d = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    back = config_from_dict(d)
    assert type(back) is type(o)
    for k in (f.name for f in dataclasses.fields(o)):
        if k in d and k not in ("target_modules",):
            assert getattr(back, k) == getattr(o, k), k
    if "target_modules" in d:
        assert sorted(back.target_modules) == sorted(o.target_modules)
    assert type(o).from_dict(o.to_dict()) == o


@pytest.mark.parametrize("cls", list(PEFT_TYPES.values()), ids=list(PEFT_TYPES))
def test_every_config_round_trips(cls):
    c = cls()
    d = json.loads(json.dumps(c.to_dict()))
    assert d["peft_type"] == cls.peft_type
    assert config_from_dict(d) == c


def test_invalid_configs():
    with pytest.raises(ValueError, match="r:"):
        fastpeft.LoraConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        fastpeft.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="one, not both"):
        fastpeft.AdapterConfig(bottleneck=8, reduction_factor=4)
    with pytest.raises(ValueError, match="kind"):
        fastpeft.AdapterConfig(kind="lora")
    with pytest.raises(ValueError, match="num_prompts"):
        fastpeft.VPTConfig(num_prompts=0)
    with pytest.raises(ValueError, match="prompt_tuning_init"):
        fastpeft.PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="unknown peft_type 'IA3'"):
        config_from_dict({"peft_type": "IA3"}, "x.json")
    with pytest.raises(ValueError, match="lora_bias"):
        fastpeft.LoraConfig.from_dict({"peft_type": "LORA", "lora_bias": True})
    with pytest.raises(ValueError, match="use_dora: expected a bool"):
        fastpeft.LoraConfig(use_dora="yes")


def test_adapter_config_bottleneck_rules():
    assert fastpeft.AdapterConfig().bottleneck_for(768) == 64
    assert fastpeft.AdapterConfig(reduction_factor=16).bottleneck_for(768) == 48
    assert fastpeft.AdapterConfig(kind="adaptformer").module_scaling() == 0.1
    assert fastpeft.AdapterConfig(kind="houlsby").module_scaling() == 1.0

"""The plug-in design: a new method (here an IA3-like output scaling, defined in this file only)
registers itself and then works through every model-level API: get_peft_model, fastpeft.<Name>Config,
set_adapter / disable / delete, mixed batches, save_pretrained / from_pretrained, config_from_dict."""
import copy
from dataclasses import dataclass, field
from typing import List

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.config import _Config, config_from_dict
from fastpeft.methods import base as mbase
from fastpeft.methods.base import PeftMethod, get_module, register_method
from fastpeft.modules.tuner import TunerLayer

from ._models import FAMILIES, build, run


@dataclass
class ToyScaleConfig(_Config):
    peft_type = "TOY_SCALE"
    target_modules: List[str] = field(default_factory=lambda: ["fc2"])


class ToyScaleLayer(TunerLayer):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.scale = nn.ParameterDict()

    def adapter_names(self):
        return list(self.scale.keys())

    def adapter_parameters(self, name):
        return [self.scale[name]]

    def delete_adapter(self, name):
        del self.scale[name]

    def forward(self, x):
        y = self.base_layer(x)
        if self.batch_adapters is not None:
            out = y
            for name, rows in self._row_groups(x.shape[0]):
                out = out.index_copy(0, rows, y.index_select(0, rows) * self.scale[name])
            return out
        for name in self._running():
            y = y * self.scale[name]
        return y


@pytest.fixture()
def toy_method():
    @register_method
    class ToyScaleMethod(PeftMethod):
        config_class = ToyScaleConfig
        supports_mixed_batch = True

        def inject(self, journal, loading=False):
            paths = [n for n, m in self.model.named_modules()
                     if isinstance(m, (nn.Linear, ToyScaleLayer)) and n.rpartition(".")[2] in self.config.target_modules]
            if not paths:
                raise ValueError("target_modules: matched nothing")
            for p in paths:
                m = get_module(self.model, p)
                if not isinstance(m, ToyScaleLayer):
                    m = ToyScaleLayer(m)
                    journal.replace(self.model, p, m)
                m.scale[self.name] = nn.Parameter(torch.ones(m.base_layer.out_features))
                journal.on_undo(lambda m=m: m.scale.pop(self.name))

        def tensors(self):
            return {f"base_model.model.{n}.scale": m.scale[self.name] for n, m in self.model.named_modules()
                    if isinstance(m, ToyScaleLayer) and self.name in m.scale}

    yield ToyScaleMethod
    mbase._REGISTRY.pop("TOY_SCALE")


def test_a_new_method_is_one_registration(toy_method, tmp_path):
    assert fastpeft.config.ToyScaleConfig is ToyScaleConfig and fastpeft.ToyScaleConfig is ToyScaleConfig
    base = build("fp_vit")
    ref = run("fp_vit", base)
    pm = fastpeft.get_peft_model(copy.deepcopy(base), ToyScaleConfig())
    assert pm.get_nb_trainable_parameters()[0] == 2 * 32
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.fill_(1.5)
    out = run("fp_vit", pm)
    assert not torch.allclose(out, ref)
    with pm.disable_adapter():
        assert torch.equal(run("fp_vit", pm), ref)
    images = FAMILIES["fp_vit"][1]()["images"]
    mixed = pm(images, adapter_names=["__base__", "default"])
    torch.testing.assert_close(mixed[:1], ref[:1])
    torch.testing.assert_close(mixed[1:], out[1:])
    pm.save_pretrained(str(tmp_path))
    back = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.equal(run("fp_vit", back), out)
    assert isinstance(config_from_dict({"peft_type": "TOY_SCALE", "target_modules": ["fc1"]}), ToyScaleConfig)
    with pytest.raises(ValueError, match="cannot be folded"):
        pm.merge_and_unload()
    pm.add_adapter("other", fastpeft.LoraConfig(r=2))
    pm.delete_adapter("default")
    assert list(pm.peft_config) == ["other"] and pm.active_adapter == "other"

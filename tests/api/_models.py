"""Tiny models for the model-level API tests (built from configs; nothing is downloaded)."""
import copy

import torch
from torch import nn



from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification)

from fastpeft.models import ViT  # noqa: E402
from fastpeft.models import ViTConfig as FViTConfig  # noqa: E402
from fastpeft.models.bert import BertConfig as FBertConfig  # noqa: E402
from fastpeft.models.bert import BertForSequenceClassification as FBert  # noqa: E402


def hf_llama():
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(c).eval()


def hf_bert():
    torch.manual_seed(0)
    c = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=48, num_labels=3, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    return BertForSequenceClassification(c).eval()


def hf_vit():
    torch.manual_seed(0)
    c = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  image_size=16, patch_size=8, num_labels=3)
    return ViTForImageClassification(c).eval()


def hf_gpt2():
    torch.manual_seed(0)
    c = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(c).eval()


class CNN(nn.Module):
    """A small conv net: two Conv2d layers (one strided), an embedding of a class token, a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, input):
        return self.fc(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(input))))).mean((2, 3)))


def cnn():
    torch.manual_seed(0)
    return CNN().eval()


def fp_vit(**kw):
    torch.manual_seed(0)
    c = dict(image_size=16, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=48, num_classes=3)
    c.update(kw)
    return ViT(FViTConfig(**c)).eval()


def fp_bert():
    torch.manual_seed(0)
    return FBert(FBertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, num_labels=3, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, max_position_embeddings=64)).eval()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


#: family -> (builder, inputs builder, output getter)
def _ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 64, (2, 7), generator=g)


def _mask():
    m = torch.ones(2, 7, dtype=torch.long)
    m[1, :2] = 0
    return m


def _images(size=16):
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, size, size, generator=g)


FAMILIES = {
    "hf_llama": (hf_llama, lambda: dict(input_ids=_ids(), attention_mask=_mask()), lambda o: o.logits),
    "hf_bert": (hf_bert, lambda: dict(input_ids=_ids(), attention_mask=_mask()), lambda o: o.logits),
    "hf_vit": (hf_vit, lambda: dict(pixel_values=_images()), lambda o: o.logits),
    "fp_vit": (fp_vit, lambda: dict(images=_images()), lambda o: o),
    "fp_bert": (fp_bert, lambda: dict(input_ids=_ids(), attention_mask=_mask()), lambda o: o),
    "mlp": (mlp, lambda: dict(input=torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(3))),
            lambda o: o),
    "hf_gpt2": (hf_gpt2, lambda: dict(input_ids=_ids(), attention_mask=_mask()), lambda o: o.logits),
}
#: families built on request only (not part of the every-family sweeps)
EXTRA = {
    "cnn": (cnn, lambda: dict(input=torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(4))), lambda o: o),
}


def run(family, model, **extra):
    _, inputs, out = FAMILIES[family] if family in FAMILIES else EXTRA[family]
    kw = inputs()
    if family in ("mlp", "cnn"):
        return out(model(kw["input"]))
    kw.update(extra)
    return out(model(**kw))


def build(family):
    return (FAMILIES[family] if family in FAMILIES else EXTRA[family])[0]()


def snapshot(model):
    """Everything a failed load must leave alone: module types, tensors and requires_grad flags."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_same_snapshot(a, b):
    assert a[0] == b[0]
    assert a[2] == b[2]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def fresh_copy(model):
    return copy.deepcopy(model)


def assert_rows_match_peft(model, ours, inputs, names):
    """Row i of the mixed-batch logits ``ours`` equals ``model`` (a PEFT model: HF's or fastpeft's)
    run on row i of every tensor in ``inputs`` alone with adapter ``names[i]`` (adapters disabled
    for ``"__base__"``). Leaves ``model``'s active adapter changed."""
    with torch.no_grad():
        for i, n in enumerate(names):
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            if n == "__base__":
                with model.disable_adapter():
                    expect = model(**row).logits
            else:
                model.set_adapter(n)
                expect = model(**row).logits
            torch.testing.assert_close(ours[i:i + 1], expect, rtol=1e-5, atol=1e-5, msg=f"row {i} ({n})")

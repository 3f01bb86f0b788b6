"""Many adapters in one batch at the model level: PEFT-saved LoRA adapters loaded into fastpeft
give PEFT's ``adapter_names=`` outputs row by row, in forward and in generate (the LoRALinear
layers run the fused ``multi_lora_linear``); several adapters train at once in one mixed batch,
each sample's loss updating only its own adapter."""
import copy

import peft
import pytest
import torch

import fastpeft
from fastpeft.ops import multi_lora

from ._models import assert_rows_match_peft, hf_gpt2, hf_llama

#: adapter name -> (rank, alpha, targets); ranks differ (zero-padded in the fused op) and not every
#: adapter targets every layer (rows of the others run the base layer there)
ADAPTERS = {"a": (2, 4, ["q_proj", "v_proj"]), "b": (4, 8, ["q_proj", "o_proj", "down_proj"]),
            "c": (3, 3, ["v_proj"]), "d": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"])}
GPT2 = {"a": (2, 4, ["c_attn"]), "b": (4, 8, ["c_attn", "c_proj"]), "c": (3, 6, ["c_fc"])}


def _save_peft_adapters(base, specs, tmp_path):
    """Each adapter trained-looking (random B) by PEFT and saved with save_pretrained; returns
    PEFT's model holding all of them and the paths."""
    paths = {}
    hp = None
    for i, (name, (r, alpha, targets)) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        one = peft.get_peft_model(copy.deepcopy(base), cfg)
        paths[name] = str(tmp_path / name)
        one.save_pretrained(paths[name])
        if hp is None:
            hp = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[name], adapter_name=name)
        else:
            hp.load_adapter(paths[name], adapter_name=name)
    return hp.eval(), paths


def _load_fastpeft(base, paths):
    names = list(paths)
    fp = fastpeft.PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name=names[0])
    for n in names[1:]:
        fp.load_adapter(paths[n], adapter_name=n)
    return fp.eval()


class _Count:
    """Counts fused multi-adapter calls (the mixed batch must not fall back to the loop)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        orig = multi_lora.MultiLoRALinearFunction.apply

        def apply(*a):
            self.calls += 1
            return orig(*a)

        monkeypatch.setattr(multi_lora.MultiLoRALinearFunction, "apply", apply)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_saved_adapters_mixed_batch_row_by_row(family, tmp_path, monkeypatch):
    base, specs = (hf_llama(), ADAPTERS) if family == "llama" else (hf_gpt2(), GPT2)
    hp, paths = _save_peft_adapters(base, specs, tmp_path)
    fp = _load_fastpeft(base, paths)
    names = list(specs) + ["__base__"]
    names = (names * 2)[:7][::-1]  # unsorted, repeated, with base rows
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 60, (len(names), 6), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # a left-padded row
    count = _Count(monkeypatch)
    with torch.no_grad():
        ours = fp(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        theirs = hp(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert count.calls > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert_rows_match_peft(hp, ours, dict(input_ids=ids, attention_mask=mask), names)  # each row as PEFT runs it alone
    hp.set_adapter(names[0] if names[0] != "__base__" else "a")
    out = fp.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=5, do_sample=False)
    ref = hp.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)
    plain = fp.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert not torch.equal(out, plain)  # the per-row adapters are used


def test_generate_mixed_adapters_equals_each_adapter_alone(tmp_path):
    base = hf_llama()
    hp, paths = _save_peft_adapters(base, ADAPTERS, tmp_path)
    fp = _load_fastpeft(base, paths)
    names = ["d", "__base__", "b", "a", "c", "d"]
    ids = torch.randint(1, 60, (len(names), 4), generator=torch.Generator().manual_seed(3))
    mixed = fp.generate(input_ids=ids, adapter_names=names, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for i, n in enumerate(names):
        if n == "__base__":
            with fp.disable_adapter():
                alone = fp.generate(input_ids=ids[i:i + 1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        else:
            fp.set_adapter(n)
            alone = fp.generate(input_ids=ids[i:i + 1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(mixed[i:i + 1], alone), n


def test_train_several_adapters_in_one_mixed_batch(monkeypatch):
    """One mixed batch trains every adapter in it: the gradients equal each adapter's own batch,
    and a sample's loss reaches only its own adapter."""
    torch.manual_seed(0)
    base = hf_llama()
    fp = fastpeft.get_peft_model(copy.deepcopy(base), fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                          init_lora_weights="gaussian"),
                                 adapter_name="a")
    fp.add_adapter("b", fastpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    fp.add_adapter("c", fastpeft.LoraConfig(r=4, target_modules=["v_proj"]))
    with torch.no_grad():
        for n, p in fp.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    fp.set_adapter(["a", "b", "c"])  # all three trainable
    fp.train()
    params = {n: p for n, p in fp.named_parameters() if p.requires_grad}
    assert params and all("lora_" in n for n in params)
    names = ["b", "a", "__base__", "a", "c", "b"]
    ids = torch.randint(1, 60, (len(names), 5), generator=torch.Generator().manual_seed(1))

    def grads(loss):
        fp.zero_grad(set_to_none=True)
        loss.backward()
        return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in params.items()}

    count = _Count(monkeypatch)
    logits = fp(input_ids=ids, adapter_names=names).logits
    assert count.calls > 0
    per_row = logits.float().log_softmax(-1)[..., 0].mean(1)  # one loss per sample
    mixed = grads(per_row.sum())
    # only sample 1 (adapter a): only a's factors move
    logits = fp(input_ids=ids, adapter_names=names).logits
    only_a = grads(logits.float().log_softmax(-1)[..., 0].mean(1)[1])
    for n, g in only_a.items():
        assert (g.abs().sum() > 0) == (".a." in n or n.endswith(".a.weight")), n
    # the mixed batch's gradients equal each adapter trained on its own samples
    expect = {n: torch.zeros_like(g) for n, g in mixed.items()}
    for adapter in ["a", "b", "c"]:
        rows = [i for i, n in enumerate(names) if n == adapter]
        fp.set_adapter(adapter)
        for p in params.values():
            p.requires_grad_(True)
        lg = fp(input_ids=ids[rows]).logits
        for n, g in grads(lg.float().log_softmax(-1)[..., 0].mean(1).sum()).items():
            expect[n] += g
    for n in mixed:
        torch.testing.assert_close(mixed[n], expect[n], rtol=1e-4, atol=1e-6, msg=n)
    assert all(mixed[n].abs().sum() > 0 for n in mixed)


def test_mixed_batch_under_autocast_takes_the_fused_path(tmp_path, monkeypatch):
    base = hf_llama()
    _, paths = _save_peft_adapters(base, {k: ADAPTERS[k] for k in ("a", "b")}, tmp_path)
    fp = _load_fastpeft(base, paths)
    names = ["b", "__base__", "a"]
    ids = torch.randint(1, 60, (3, 6), generator=torch.Generator().manual_seed(2))
    count = _Count(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fp(input_ids=ids, adapter_names=names).logits
        assert count.calls > 0  # fp32 weights, bf16 compute: still one fused call per layer
        for i, n in enumerate(names):
            if n == "__base__":
                with fp.disable_adapter():
                    alone = fp(input_ids=ids[i:i + 1]).logits
            else:
                fp.set_adapter(n)
                alone = fp(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1].float(), alone.float(), rtol=3e-2, atol=3e-2)

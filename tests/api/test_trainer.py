"""HF ``Trainer`` with fastpeft models (tiny BERT and LLaMA built from configs).

The plain ``transformers.Trainer`` trains and evaluates a fastpeft ``PeftModel`` (Trainer reads
the forward signature to drop unused batch columns: once it failed with "The batch received
was empty"); ``fastpeft.trainer.PeftTrainer`` also writes PEFT-format checkpoints that
``peft.PeftModel.from_pretrained`` loads, and resumes from them to the same final weights.
"""
import inspect
import os

import pytest
import torch

pytest.importorskip("accelerate")  # transformers.Trainer needs it (pinned in constraints.txt)

import peft  # noqa: E402
import transformers  # noqa: E402

import fastpeft  # noqa: E402
from fastpeft.checkpoint import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from fastpeft.trainer import PeftTrainer  # noqa: E402

from ._models import hf_bert, hf_llama  # noqa: E402

STEPS, SAVE_EVERY, BATCH, T = 4, 2, 4, 8


def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, 64, (T,), generator=g)
        label = torch.randint(0, 3, (), generator=g) if kind == "bert" else ids.clone()  # llama*: causal LM
        # "row_id": a column the model does not take - Trainer must drop it, not the real inputs
        rows.append(dict(input_ids=ids, attention_mask=torch.ones(T, dtype=torch.long), labels=label, row_id=i))
    return rows


KINDS = {
    "bert": (hf_bert, lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                  target_modules=["query", "value"], modules_to_save=["classifier"])),
    "llama": (hf_llama, lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                    target_modules=["q_proj", "v_proj"])),
    "llama_dora": (hf_llama, lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True,
                                                         target_modules=["q_proj", "v_proj", "down_proj"])),
}


def _model(kind):
    build, config = KINDS[kind]
    torch.manual_seed(0)
    return fastpeft.get_peft_model(build(), config())


def _args(out, **kw):
    kw = {**dict(output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=8,
                 max_steps=STEPS, learning_rate=1e-2, save_strategy="steps", save_steps=SAVE_EVERY, logging_steps=1,
                 report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0), **kw}
    return transformers.TrainingArguments(**kw)


def _adapter(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def test_forward_signature_is_the_base_models():
    pm = _model("bert")
    params = inspect.signature(pm.forward).parameters
    base = inspect.signature(pm.get_base_model().forward).parameters
    assert list(params)[:len(base) - 1] == [p for p in base if p != "kwargs"][:len(base) - 1]
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    assert "args" not in params


@pytest.mark.parametrize("label_names", [None, ["labels"]], ids=["found", "given"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_plain_trainer_trains_and_evaluates(kind, label_names, tmp_path):
    pm = _model(kind)
    before = _adapter(pm)
    ev = _data(kind, 8, seed=2)
    # the plain Trainer reads label names from the model *class*: PeftModel's class carries the
    # wrapped class's forward signature, so it finds them without TrainingArguments(label_names=...)
    tr = transformers.Trainer(model=pm, args=_args(tmp_path, save_strategy="no", label_names=label_names),
                              train_dataset=_data(kind, 16, 1), eval_dataset=ev)
    assert tr.label_names == ["labels"] and tr.can_return_loss is False
    out = tr.train()
    assert out.global_step == STEPS
    after = _adapter(pm)
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4
    metrics = tr.evaluate()
    pm.eval()
    with torch.no_grad():
        batch = {k: torch.stack([r[k] for r in ev]) if k != "row_id" else None for k in ev[0]}
        batch.pop("row_id")
        want = pm(**batch).loss.item()
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_peft_trainer_checkpoints_load_in_peft_and_resume(kind, tmp_path):
    train, ev = _data(kind, 16, seed=1), _data(kind, 8, seed=2)
    full = _model(kind)
    PeftTrainer(model=full, args=_args(tmp_path / "full"), train_dataset=train, eval_dataset=ev).train()
    want = _adapter(full)

    for step in (SAVE_EVERY, STEPS):  # PEFT format: the adapter files only, no base model weights
        d = tmp_path / "full" / f"checkpoint-{step}"
        assert (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file()
        assert not (d / "model.safetensors").exists()
        assert (d / "optimizer.pt").is_file() and (d / "trainer_state.json").is_file()
    last = str(tmp_path / "full" / f"checkpoint-{STEPS}")
    build = KINDS[kind][0]
    hp = peft.PeftModel.from_pretrained(build(), last).eval()
    full.eval()
    x = torch.stack([r["input_ids"] for r in ev])
    with torch.no_grad():
        torch.testing.assert_close(hp(input_ids=x).logits, full(input_ids=x).logits, rtol=1e-5, atol=1e-5)

    # resume from the middle checkpoint in a fresh process state: same final adapter weights
    resumed = _model(kind)
    tr = PeftTrainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=train, eval_dataset=ev)
    tr.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{SAVE_EVERY}"))
    got = _adapter(resumed)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert tr.label_names == ["labels"]
    metrics = tr.evaluate()
    resumed.eval()
    with torch.no_grad():
        want_loss = resumed(**{k: torch.stack([r[k] for r in ev]) for k in ("input_ids", "attention_mask",
                                                                             "labels")}).loss.item()
    assert metrics["eval_loss"] == pytest.approx(want_loss, rel=1e-5)
    tr.save_model(str(tmp_path / "final"))
    assert sorted(os.listdir(tmp_path / "final")) == sorted([CONFIG_NAME, WEIGHTS_NAME, "training_args.bin"])


def test_trainer_gradient_checkpointing_same_weights(tmp_path):
    """``TrainingArguments(gradient_checkpointing=True)`` reaches the wrapped model through the
    PeftModel and trains to the same adapter weights (LoRA dropout on)."""
    train = _data("llama", 16, seed=1)
    runs = {}
    for gc in (False, True):
        pm = _model("llama")
        PeftTrainer(model=pm, args=_args(tmp_path / str(gc), save_strategy="no", gradient_checkpointing=gc),
                    train_dataset=train).train()
        assert all(layer.gradient_checkpointing == gc for layer in pm.get_base_model().model.layers)
        runs[gc] = _adapter(pm)
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("kind", list(KINDS))
def test_plain_trainer_saves_and_resumes(kind, tmp_path):
    """The plain Trainer saves a fastpeft model as it saves any non-``PreTrainedModel``: the whole
    ``state_dict`` as ``model.safetensors`` (not PEFT format: that is PeftTrainer's), and resumes from
    it to the uninterrupted run's adapter weights."""
    train = _data(kind, 16, seed=1)
    full = _model(kind)
    transformers.Trainer(model=full, args=_args(tmp_path / "full"), train_dataset=train).train()
    want = _adapter(full)
    d = tmp_path / "full" / f"checkpoint-{SAVE_EVERY}"
    assert (d / "model.safetensors").is_file() and not (d / WEIGHTS_NAME).exists()
    resumed = _model(kind)
    transformers.Trainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=train).train(
        resume_from_checkpoint=str(d))
    got = _adapter(resumed)
    assert max((got[k] - _adapter(_model(kind))[k]).abs().max().item() for k in got) > 1e-4  # it trained
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_trainer_reads_label_names_and_return_loss_from_the_wrapped_class():
    """What Trainer reads from ``type(model)`` is the wrapped model class's, as for HF PEFT models:
    ``find_labels`` (question answering: start / end positions) and ``can_return_loss``; the
    per-class subclass pickles, deep-copies and ``torch.save``s as the model itself."""
    import copy
    import io
    import pickle

    from transformers import BertConfig, BertForQuestionAnswering
    from transformers.utils.generic import can_return_loss, find_labels

    c = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    for base in (BertForQuestionAnswering(c), hf_bert(), hf_llama()):
        pm = fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=2, target_modules=["query", "q_proj"]))
        assert isinstance(pm, fastpeft.PeftModel)
        assert find_labels(type(pm)) == find_labels(type(base)) != []
        assert can_return_loss(type(pm)) == can_return_loss(type(base))
        assert "adapter_names" in inspect.signature(type(pm).forward).parameters
        buf = io.BytesIO()
        torch.save(pm, buf)
        buf.seek(0)
        for back in (pickle.loads(pickle.dumps(pm)), copy.deepcopy(pm), torch.load(buf, weights_only=False)):
            assert type(back) is type(pm) and find_labels(type(back)) == find_labels(type(base))
    from tests.api._models import fp_vit
    assert find_labels(type(fastpeft.get_peft_model(fp_vit(), fastpeft.LoraConfig(r=2, target_modules=["qkv"])))) == []


def test_peft_trainer_tied_weights_model(tmp_path):
    """GPT-2 ties ``wte`` and ``lm_head``: the plain Trainer's whole-``state_dict`` save cannot write
    it (safetensors refuses shared tensors); PeftTrainer saves the adapter tensors only, which
    ``peft.PeftModel.from_pretrained`` loads, and resumes from them."""
    from ._models import hf_gpt2

    def model():
        torch.manual_seed(0)
        return fastpeft.get_peft_model(hf_gpt2(), fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    train = _data("llama", 16, seed=1)
    full = model()
    PeftTrainer(model=full, args=_args(tmp_path / "full"), train_dataset=train).train()
    last = tmp_path / "full" / f"checkpoint-{STEPS}"
    assert sorted(p.name for p in last.iterdir() if p.name.startswith("adapter_")) == [CONFIG_NAME, WEIGHTS_NAME]
    x = torch.stack([r["input_ids"] for r in train[:4]])
    hp = peft.PeftModel.from_pretrained(hf_gpt2(), str(last)).eval()
    with torch.no_grad():
        torch.testing.assert_close(hp(input_ids=x).logits, full.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    resumed = model()
    PeftTrainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=train).train(
        resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{SAVE_EVERY}"))
    want, got = _adapter(full), _adapter(resumed)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_label_smoothing_shifts_labels_as_for_the_wrapped_model(kind, tmp_path):
    """With label_smoothing_factor, Trainer shifts the labels for causal LMs, which it recognises by
    model._get_name() (for HF PEFT models, the wrapped model's): a fastpeft model answers with the
    wrapped model's name, so its smoothed loss is the causal one (llama) or the plain one (bert)."""
    from transformers.trainer_pt_utils import LabelSmoother

    pm = _model(kind).eval()
    assert pm._get_name() == pm.get_base_model()._get_name() and repr(pm).startswith("PeftModel(")
    trainer = transformers.Trainer(model=pm, args=_args(tmp_path, label_smoothing_factor=0.1))
    batch = {k: torch.stack([r[k] for r in _data(kind, 4, 3)]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        loss = trainer.compute_loss(pm, dict(batch))
        out = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = LabelSmoother(epsilon=0.1)(out, batch["labels"], shift_labels=(kind == "llama"))
    torch.testing.assert_close(loss, expected)

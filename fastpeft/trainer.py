"""Hugging Face ``Trainer`` with fastpeft models: PEFT-format checkpoints.

A fastpeft :class:`~fastpeft.PeftModel` trains, evaluates, saves and resumes under the plain
``transformers.Trainer``: its ``forward`` carries the wrapped model's signature, which Trainer
reads to drop unused batch columns, and its class (a per-wrapped-class subclass of ``PeftModel``)
carries the wrapped class's, from which Trainer reads the label names and ``can_return_loss``, so
evaluation losses come without ``TrainingArguments(label_names=...)``. What the plain Trainer
cannot know is that it is a PEFT model - it recognises Hugging Face PEFT's ``PeftModel`` by type
only - so it saves a fastpeft model like any other ``nn.Module``: the whole ``state_dict`` (base
included) as ``model.safetensors`` in each ``checkpoint-N/``, which its own
``resume_from_checkpoint`` loads back but ``peft.PeftModel.from_pretrained`` does not; and on a
base with tied weights (e.g. GPT-2's ``wte`` / ``lm_head``) that save fails in safetensors ("Some
tensors share memory").

:class:`PeftTrainer` is ``transformers.Trainer`` with these changes, all for fastpeft models only
(any other model takes Trainer's own path):

- saving (``checkpoint-N/`` and ``save_model``): the adapters in PEFT format
  (``adapter_config.json`` + ``adapter_model.safetensors``, other adapters in sub-directories;
  only the adapter tensors, written atomically by the main process) - what
  ``peft.PeftModel.from_pretrained`` and :meth:`fastpeft.PeftModel.from_pretrained` load;
- loading (``train(resume_from_checkpoint=...)``, ``load_best_model_at_end``): those files are
  loaded into the model's existing adapters in place, validated completely first
  (:meth:`fastpeft.PeftModel.load_adapter`);
- label names and ``can_return_loss`` are read from the wrapped model's class explicitly, as
  Trainer does for Hugging Face PEFT models (also for a fastpeft model inside another wrapper).

Optimizer, scheduler, RNG and trainer state are saved and restored by Trainer as usual.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import transformers
from torch import nn

from fastpeft import checkpoint as ckpt
from fastpeft.peft_model import PeftModel

__all__ = ["PeftTrainer"]


def _fastpeft_model(model: Optional[nn.Module]) -> Optional[PeftModel]:
    from fastpeft.distributed import unwrap

    m = unwrap(model) if model is not None else None
    return m if isinstance(m, PeftModel) else None


class PeftTrainer(transformers.Trainer):
    """``transformers.Trainer`` that saves and resumes fastpeft models in PEFT format (see the
    module docstring). Same constructor and methods as ``Trainer``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pm = _fastpeft_model(self.model)
        if pm is not None:  # what Trainer reads from the model class, read from the wrapped model's class
            from transformers.utils.generic import can_return_loss, find_labels

            base = type(pm.get_base_model())
            if self.args.label_names is None:
                self.label_names = find_labels(base)
            self.can_return_loss = can_return_loss(base)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        pm = _fastpeft_model(self.model)
        if pm is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        pm.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_adapters(self, pm: PeftModel, directory: str) -> None:
        active = pm.active_adapters
        for name in list(pm.peft_config):
            d = directory if name == "default" else os.path.join(directory, name)
            if not os.path.isfile(os.path.join(d, ckpt.CONFIG_NAME)) and name != "default":
                continue  # an adapter added after this checkpoint was written
            pm.load_adapter(d, name, is_trainable=name in active)
        pm.set_adapter(active)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        pm = _fastpeft_model(model if model is not None else self.model)
        if pm is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_adapters(pm, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        pm = _fastpeft_model(self.model)
        if pm is None:
            return super()._load_best_model()
        self._load_adapters(pm, self.state.best_model_checkpoint)

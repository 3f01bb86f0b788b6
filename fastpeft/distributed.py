"""Data-parallel training of a fastpeft :class:`~fastpeft.PeftModel`: DDP, FSDP2, checkpoints.

Nothing here is needed for correctness: a ``PeftModel`` is an ordinary ``nn.Module`` whose frozen
parameters have ``requires_grad=False``, so plain ``DistributedDataParallel(model)`` and
``fully_shard(model)`` already train it exactly (N ranks with global batch G give one process's
losses and updates with batch G, to fp32 reduction order; ``tests/distributed``). These helpers
make the communication and the seeds explicit:

- :func:`set_dropout_rank`: per-rank distinct, reproducible dropout masks.
- :func:`ddp`: DDP that communicates only the trainable (PEFT) parameters.
- :func:`fully_shard_peft`: FSDP2 over the model's layers, the frozen base sharded (or replicated).
- :func:`trainable_parameters`: what goes into the optimizer.
- :func:`save_pretrained` / :func:`load_optimizer`: PEFT-format checkpoints from rank 0 (FSDP2
  shards gathered) plus an optional world-size-independent optimizer state, to resume on any
  number of ranks.

Typical use (``examples/distributed_lora.py``)::

    dist.init_process_group("gloo")          # "nccl" on GPUs
    torch.manual_seed(0)                     # same seed everywhere: identical models
    model = get_peft_model(build_model(), LoraConfig(...))
    fastpeft.distributed.set_dropout_rank()  # then distinct dropout masks per rank
    model = fastpeft.distributed.ddp(model)  # or fully_shard_peft(model)
    opt = torch.optim.AdamW(fastpeft.distributed.trainable_parameters(model), lr=1e-3)
    ...
    fastpeft.distributed.save_pretrained(model, "ckpt", optimizer=opt)  # every rank calls it
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence, Set

import torch
from torch import nn

from fastpeft import _dropout
from fastpeft import checkpoint as ckpt

__all__ = ["set_dropout_rank", "trainable_parameters", "unwrap", "ddp", "fully_shard_peft", "save_pretrained",
           "load_optimizer", "OPTIMIZER_NAME"]

#: the optimizer state :func:`save_pretrained` writes next to the adapter files
OPTIMIZER_NAME = "optimizer_state.pt"


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def set_dropout_rank(rank: Optional[int] = None) -> int:
    """Give this process its own dropout stream; ``-> the stream`` (``rank``, default
    ``torch.distributed.get_rank()``, 0 without a process group).

    fastpeft draws each dropout seed from torch's default generator. Data-parallel ranks seed
    torch alike so that they build identical models, so without this every rank would drop the
    same positions of its local rows. After ``set_dropout_rank()`` each seed is mixed with the
    rank (:func:`fastpeft._dropout.set_stream`): the masks differ between ranks and are
    reproducible from (``torch.manual_seed``, rank). Rank 0 keeps the plain draw, so rank 0 of
    a run sees the masks a single process would. torch's generator advances as before, so
    activation checkpointing still recomputes identical masks.

    Covered: fastpeft's counter-based dropout - the fused LoRA and DoRA ops (``nn.Linear`` targets
    with one active adapter), adapters, VPT prompts. Not covered: dropout drawn with torch's own RNG -
    ``nn.Dropout`` in the base model, LoRA's unfused paths (a second active LoRA adapter,
    mixed-adapter batches, Embedding / Conv2d targets) and P-Tuning v2's prefix dropout; for those, seed torch per rank
    once the model is built (``torch.manual_seed(seed + rank)``), which also gives distinct streams.
    """
    rank = _rank() if rank is None else rank
    _dropout.set_stream(rank)
    return rank


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) / ``torch.compile`` (``._orig_mod``) wrappers; FSDP2
    shards in place, so a ``fully_shard``-ed model is returned as is."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters with ``requires_grad`` (the active adapters', ``modules_to_save``), i.e. what
    the optimizer should hold. Works on the bare, DDP-wrapped or FSDP2-sharded model."""
    return [p for p in model.parameters() if p.requires_grad]


def ddp(model: nn.Module, *, sync_buffers: bool = False, **kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **kwargs)`` that communicates only the trainable parameters.

    DDP already all-reduces gradients only for parameters with ``requires_grad``; but at
    construction it also broadcasts every parameter and buffer from rank 0, and it can re-sync
    buffers before each forward. Here the frozen parameters - and, unless ``sync_buffers``, the
    buffers - are registered as ignored
    (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``), so neither the
    broadcast nor the reducer touches them: the trainable parameters are broadcast once from rank
    0 and their gradients all-reduced (averaged), nothing else. The frozen base must therefore be
    identical on every rank already (built from the same seed or loaded from the same weights);
    ``sync_buffers=True`` keeps DDP's buffer syncing (e.g. BatchNorm statistics of a base in train
    mode). Call it after :func:`fastpeft.get_peft_model` (and ``set_adapter``): the set of trainable
    parameters is fixed from here on, as always with DDP.
    """
    ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
    if not sync_buffers:
        ignore += [n for n, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def _layer_classes(model: nn.Module) -> Set[str]:
    for m in unwrap(model).modules():
        names = getattr(m, "_no_split_modules", None)  # HF: the transformer-block classes
        if names:
            return set(names)
    return set()


def fully_shard_peft(model: nn.Module, *, layer_classes: Optional[Iterable[str]] = None, shard_base: bool = True,
                     **kwargs) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over each layer, then the whole model; in place.

    Args:
        model: a :class:`~fastpeft.PeftModel` (after ``get_peft_model`` / ``set_adapter``).
        layer_classes: class names of the modules to shard as one unit each (default: the HF
            model's ``_no_split_modules``, e.g. ``LlamaDecoderLayer``; none: only the root).
        shard_base: True: the frozen base is sharded like the PEFT parameters (1/N of its memory
            per rank; each layer's full weights are all-gathered for its forward and backward,
            which is FSDP's usual traffic, while gradients are reduce-scattered for the trainable
            parameters only - FSDP2 leaves frozen parameters without gradients). False: the frozen
            parameters are ``ignored_params`` - replicated on every rank, never communicated - and
            only the PEFT parameters are sharded, gathered and reduced.
        kwargs: passed to every ``fully_shard`` call (``mesh``, ``mp_policy``, ...).
    Returns:
        ``model`` (FSDP2 changes it in place). Build the optimizer afterwards, over
        :func:`trainable_parameters` (the sharded ``DTensor`` parameters).
    """
    from torch.distributed.fsdp import fully_shard

    if not shard_base:
        kwargs["ignored_params"] = {p for p in model.parameters() if not p.requires_grad} | \
            set(kwargs.get("ignored_params") or ())
    names = set(layer_classes) if layer_classes is not None else _layer_classes(model)
    for m in list(model.modules()):
        if m is not model and type(m).__name__ in names:
            fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    return model


def save_pretrained(model: nn.Module, directory: str, *, optimizer: Optional[torch.optim.Optimizer] = None,
                    selected_adapters: Optional[Sequence[str]] = None) -> None:
    """Save the adapters in PEFT format from rank 0; call it on every rank (a collective).

    FSDP2 shards are gathered (only the adapter tensors: the base is never saved); rank 0
    writes ``adapter_config.json`` + ``adapter_model.safetensors`` atomically
    (:meth:`fastpeft.PeftModel.save_pretrained`). With ``optimizer``, its state is gathered too
    (``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, full and keyed by
    parameter name, so independent of the world size) and written first as
    ``optimizer_state.pt``; the old adapter config is removed before anything is replaced, so a
    crash at any point never leaves a directory that loads with mismatched parts. Resume with
    ``PeftModel.load_adapter(directory, name, is_trainable=True)`` before wrapping, then
    :func:`load_optimizer` after building the optimizer. Ends with a barrier.
    """
    import torch.distributed as dist

    pm = unwrap(model)
    main = _rank() == 0
    osd = None
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        osd = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if main:
        os.makedirs(directory, exist_ok=True)
        cfg = os.path.join(directory, ckpt.CONFIG_NAME)
        if os.path.lexists(cfg):
            os.remove(cfg)  # the directory does not load until the new adapter config is renamed in (last)
        if osd is not None:
            ckpt.atomic_write(os.path.join(directory, OPTIMIZER_NAME), lambda tmp: torch.save(osd, tmp))
    pm.save_pretrained(directory, selected_adapters=list(selected_adapters) if selected_adapters else None,
                       is_main_process=main)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Load the optimizer state :func:`save_pretrained` wrote into ``optimizer`` (built over
    ``model``'s trainable parameters, after DDP / FSDP2 wrapping, on any number of ranks; every
    rank reads the file). Errors name the file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = os.path.join(directory, OPTIMIZER_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: optimizer state not found")
    try:
        osd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: corrupt or truncated optimizer state ({type(e).__name__}: {e})") from e
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))

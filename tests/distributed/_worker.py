"""Training runs for the multi-process tests: the same code on N gloo ranks and on one process.

``train(scenario, world)`` runs ``STEPS`` AdamW steps of a tiny model with global batch ``G``:
on one process over the whole batch, on N ranks each over its ``G/N`` rows, wrapped in DDP or
FSDP2. The models are built from the same seed on every rank (FSDP2 does not broadcast), the
data of each step from its own generator, so the N-rank run must reproduce the 1-process one.
``main`` (spawned per rank by ``test_data_parallel.py``) runs every scenario once and rank 0
saves what the tests compare.
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastpeft
import fastpeft.distributed as fdist
from fastpeft import _dropout
from tests.api._models import fp_vit, hf_bert, hf_gpt2, hf_llama

G = 4  # global batch
T = 8  # tokens per row
STEPS = 3
SAVE_AFTER = 2  # the checkpoint the resume tests start from: after this many steps

CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_dropout": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                target_modules=["q_proj", "v_proj"]),
    "dora": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        use_dora=True),
    "dora_dropout": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True,
                                                target_modules=["q_proj", "v_proj", "down_proj"]),
    "adapter": lambda: fastpeft.AdapterConfig(kind="houlsby", bottleneck=4),
    "prefix": lambda: fastpeft.PrefixTuningConfig(num_virtual_tokens=2),
    "vpt": lambda: fastpeft.VPTConfig(num_prompts=2, deep=True),
    "prompt": lambda: fastpeft.PromptTuningConfig(num_virtual_tokens=3),
    "bitfit": lambda: fastpeft.BitFitConfig(),
    # HF BERT sequence classification: LoRA + a trainable copy of the head (modules_to_save)
    "lora_bert": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]),
    # GPT-2: Conv1D targets, tied input / output embeddings in the frozen base
    "lora_gpt2": lambda: fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
}
#: base model per method (default: the tiny LLaMA)
BASES = {"vpt": fp_vit, "bitfit": hf_bert, "lora_bert": hf_bert, "lora_gpt2": hf_gpt2}

#: name -> (method, wrapper); wrapper: "ddp", "fsdp" (frozen base sharded), "fsdp_replicated" (base ignored)
SCENARIOS = {
    "lora_ddp": ("lora", "ddp"),
    "lora_fsdp": ("lora", "fsdp"),
    "lora_fsdp_replicated": ("lora", "fsdp_replicated"),
    "adapter_ddp": ("adapter", "ddp"),
    "adapter_fsdp": ("adapter", "fsdp"),
    "prefix_ddp": ("prefix", "ddp"),
    "prefix_fsdp": ("prefix", "fsdp"),
    "vpt_ddp": ("vpt", "ddp"),
    "vpt_fsdp": ("vpt", "fsdp"),
    "lora_dropout_ddp": ("lora_dropout", "ddp"),
    "dora_ddp": ("dora", "ddp"),
    "dora_fsdp": ("dora", "fsdp"),
    "dora_dropout_ddp": ("dora_dropout", "ddp"),
    "dora_dropout_fsdp": ("dora_dropout", "fsdp"),
    "prompt_ddp": ("prompt", "ddp"),
    "prompt_fsdp": ("prompt", "fsdp"),
    "bitfit_ddp": ("bitfit", "ddp"),
    "bitfit_fsdp": ("bitfit", "fsdp"),
    "lora_bert_ddp": ("lora_bert", "ddp"),
    "lora_bert_fsdp": ("lora_bert", "fsdp"),
    "lora_gpt2_ddp": ("lora_gpt2", "ddp"),
    "lora_gpt2_fsdp": ("lora_gpt2", "fsdp"),
    # no fastpeft helper: plain DistributedDataParallel(model) / fully_shard(model) as users write them
    "lora_ddp_plain": ("lora", "ddp_plain"),
    "lora_fsdp_plain": ("lora", "fsdp_plain"),
}

#: the scenarios whose 2-rank run saves a checkpoint after step SAVE_AFTER
SAVED = ("lora_ddp", "lora_fsdp", "vpt_fsdp", "dora_fsdp", "lora_bert_fsdp")


def build(method: str):
    torch.manual_seed(0)
    base = BASES.get(method, hf_llama)()
    torch.manual_seed(0)
    pm = fastpeft.get_peft_model(base, CONFIGS[method]())
    with torch.no_grad():  # LoRA's B starts at zero: give every PEFT tensor a nonzero, seeded value
        g = torch.Generator().manual_seed(7)
        for p in fdist.trainable_parameters(pm):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm.train()


def batch(method: str, step: int):
    """The global batch of ``step`` (inputs, labels)."""
    g = torch.Generator().manual_seed(100 + step)
    if method == "vpt":
        return torch.randn(G, 3, 16, 16, generator=g), torch.randint(0, 3, (G,), generator=g)
    x = torch.randint(1, 64, (G, T), generator=g)
    if BASES.get(method) is hf_bert:  # sequence classification: one label per row
        return x, torch.randint(0, 3, (G,), generator=g)
    return x, x


def loss_of(method: str, model, x, y):
    if method == "vpt":
        return F.cross_entropy(model(images=x), y)
    return model(input_ids=x, labels=y).loss


def full_params(model) -> Dict[str, torch.Tensor]:
    """Trainable parameters by name, whole (FSDP2 shards gathered), on every rank."""
    out = {}
    for n, p in fdist.unwrap(model).named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n] = t.detach().clone()
    return out


def wrap(model, wrapper: str):
    if wrapper == "ddp_plain":
        return torch.nn.parallel.DistributedDataParallel(model)
    if wrapper == "fsdp_plain":
        from torch.distributed.fsdp import fully_shard
        return fully_shard(model)
    if wrapper == "ddp":
        return fdist.ddp(model)
    return fdist.fully_shard_peft(model, shard_base=(wrapper == "fsdp"))


def train(name: str, rank: int = 0, world: int = 1, save_dir: Optional[str] = None, resume: Optional[str] = None,
          first_step: int = 0) -> dict:
    """Run scenario ``name``; ``-> {losses, params, comm}`` (global losses, final PEFT params,
    elements all-reduced per DDP step)."""
    method, wrapper = SCENARIOS[name]
    model = build(method)
    if resume is not None:  # PEFT-format checkpoint, loaded before wrapping
        fdist.unwrap(model).load_adapter(resume, "default", is_trainable=True)
    if method.endswith("_dropout"):
        fdist.set_dropout_rank(rank)
    comm = []
    if world > 1:
        model = wrap(model, wrapper)
        if wrapper.startswith("ddp"):
            def hook(state, bucket):
                comm.append(bucket.buffer().numel())
                fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
                return fut.then(lambda f: f.value()[0])
            model.register_comm_hook(None, hook)
    opt = torch.optim.AdamW(fdist.trainable_parameters(model), lr=1e-2, weight_decay=0.01)
    if resume is not None:
        fdist.load_optimizer(model, opt, resume)
    losses = []
    for step in range(first_step, STEPS):
        torch.manual_seed(1000 + step)  # dropout seeds: the same draws on every rank (+ the rank's stream)
        x, y = batch(method, step)
        rows = slice(rank * G // world, (rank + 1) * G // world)
        loss = loss_of(method, model, x[rows], y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        if world > 1:
            dist.all_reduce(t)
            t /= world
        losses.append(t.item())
        if save_dir is not None and step + 1 == SAVE_AFTER:
            fdist.save_pretrained(model, save_dir, optimizer=opt)
    _dropout.set_stream(0)
    params = list(fdist.unwrap(model).parameters())
    sharded = [type(p).__name__ == "DTensor" for p in params]
    return {"losses": losses, "params": full_params(model), "comm": comm,
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "optimizer_params": sum(p.numel() for grp in opt.param_groups for p in grp["params"]),
            # (frozen, trainable) parameters that are FSDP2 shards
            "sharded": (sum(s for s, p in zip(sharded, params) if not p.requires_grad),
                        sum(s for s, p in zip(sharded, params) if p.requires_grad)),
            "n": (sum(not p.requires_grad for p in params), sum(p.requires_grad for p in params))}


def reference_dropout_step(name: str, world: int) -> dict:
    """One process emulating ``world`` ranks with dropout: each rank's rows through that rank's
    dropout stream from the same generator state, gradients averaged, one AdamW step - what DDP
    with :func:`fastpeft.distributed.set_dropout_rank` must compute."""
    method, _ = SCENARIOS[name]
    model = build(method)
    params = fdist.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses = []
    for step in range(STEPS):
        x, y = batch(method, step)
        opt.zero_grad()
        total = 0.0
        for r in range(world):
            torch.manual_seed(1000 + step)
            _dropout.set_stream(r)
            rows = slice(r * G // world, (r + 1) * G // world)
            loss = loss_of(method, model, x[rows], y[rows]) / world
            loss.backward()
            total += loss.item()
        _dropout.set_stream(0)
        opt.step()
        losses.append(total)
    return {"losses": losses, "params": full_params(model)}


def dropout_outputs(rank: int, method: str = "lora_dropout") -> torch.Tensor:
    """LoRA- (or DoRA-) with-dropout logits of one fixed batch under ``set_dropout_rank(rank)`` and seed 5."""
    model = build(method)
    fdist.set_dropout_rank(rank)
    torch.manual_seed(5)
    x, _ = batch("lora", 0)
    with torch.no_grad():
        out = model(input_ids=x[:2]).logits
    _dropout.set_stream(0)
    return out


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, (method, wrapper) in SCENARIOS.items():
            save = os.path.join(out_dir, f"ckpt_{name}") if name in SAVED else None
            results[name] = train(name, rank, world, save_dir=save)
        for name in ("lora_ddp", "lora_fsdp"):  # resume a 1-process checkpoint on `world` ranks
            single = os.path.join(out_dir, "ckpt_single")
            results[f"resume_{name}"] = train(name, rank, world, resume=single, first_step=SAVE_AFTER)
        for method in ("lora_dropout", "dora_dropout"):
            mine = dropout_outputs(rank, method)
            outs = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(outs, mine)
            results[f"{method}_outputs"] = outs
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
        # both ranks leave together: a rank that tears gloo down while its peer is still in its last
        # collective (or saving) can abort in gloo's teardown
        dist.barrier()
    finally:
        dist.destroy_process_group()

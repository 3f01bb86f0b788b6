"""Data-parallel LoRA fine-tuning with fastpeft: DDP or FSDP2, a PEFT checkpoint, resume.

    torchrun --nproc_per_node 2 examples/distributed_lora.py                 # DDP, gloo on CPU
    torchrun --nproc_per_node 2 examples/distributed_lora.py --mode fsdp     # FSDP2, frozen base sharded
    torchrun --nproc_per_node 2 examples/distributed_lora.py --verify        # and compare with 1 process
    torchrun --nproc_per_node 2 examples/distributed_lora.py --dora --verify # DoRA instead of LoRA
    torchrun --nproc_per_node 2 examples/distributed_lora.py --save ckpt --steps 2
    torchrun --nproc_per_node 1 examples/distributed_lora.py --resume ckpt --steps 1   # any world size

Backend: nccl when CUDA is available (one GPU per rank), else gloo on the CPU. The model is a
small LLaMA built from a config (nothing is downloaded); each step every rank takes its
``batch / world`` rows of the same global batch, so the run is the one-process run with the whole
batch (``--verify`` checks that on rank 0: max |N-rank - 1-process| over the LoRA weights).
Only the LoRA parameters are communicated (see ``fastpeft.distributed``).
"""
import argparse
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import fastpeft
import fastpeft.distributed as fdist


def build(args):
    torch.manual_seed(0)  # the same on every rank: identical base and LoRA init (FSDP2 does not broadcast)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = fastpeft.get_peft_model(LlamaForCausalLM(cfg), fastpeft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=args.dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_dora=args.dora))
    if args.resume:  # a PEFT-format checkpoint (saved on any number of ranks), loaded before wrapping
        model.load_adapter(args.resume, "default", is_trainable=True)
    return model.train()


def global_batch(args, step):
    g = torch.Generator().manual_seed(1000 + step)  # a stand-in for a DistributedSampler over real data
    x = torch.randint(1, 128, (args.batch, args.seq), generator=g)
    return x


def train(args, model, rank, world, device, first_step):
    opt = torch.optim.AdamW(fdist.trainable_parameters(model), lr=args.lr)
    if args.resume and os.path.isfile(os.path.join(args.resume, fdist.OPTIMIZER_NAME)):
        fdist.load_optimizer(model, opt, args.resume)
    losses = []
    for step in range(first_step, first_step + args.steps):
        torch.manual_seed(step)  # dropout seeds: reproducible, and distinct per rank after set_dropout_rank
        x = global_batch(args, step)[rank * args.batch // world:(rank + 1) * args.batch // world].to(device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        t = loss.detach()
        if world > 1:
            dist.all_reduce(t)
            t = t / world
        losses.append(t.item())
    return opt, losses


def lora_weights(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
            for n, p in fdist.unwrap(model).named_parameters() if p.requires_grad}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["ddp", "fsdp", "fsdp-replicated"], default="ddp",
                    help="fsdp: FSDP2 with the frozen base sharded; fsdp-replicated: base replicated (ignored_params)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="global batch (divisible by the world size)")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (masks distinct per rank)")
    ap.add_argument("--dora", action="store_true", help="DoRA (use_dora=True) instead of plain LoRA")
    ap.add_argument("--save", help="save a PEFT checkpoint + optimizer state here at the end (rank 0 writes)")
    ap.add_argument("--resume", help="resume from a checkpoint written by --save")
    ap.add_argument("--start-step", type=int, default=0, help="data step to resume at (for --resume)")
    ap.add_argument("--verify", action="store_true", help="rank 0 reruns on one process and prints the difference")
    args = ap.parse_args()
    if args.verify and args.dropout > 0:
        raise SystemExit("--verify compares with one process, whose rows draw other dropout masks: use --dropout 0")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is not divisible by the world size {world}")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = build(args).to(device)
    fdist.set_dropout_rank(rank)
    if args.mode == "ddp":
        model = fdist.ddp(model, device_ids=[device.index] if cuda else None)
    else:
        fdist.fully_shard_peft(model, shard_base=(args.mode == "fsdp"))
    opt, losses = train(args, model, rank, world, device, args.start_step)
    trainable, total = fdist.unwrap(model).get_nb_trainable_parameters() if args.mode == "ddp" else (None, None)
    if rank == 0:
        print(f"{args.mode} on {world} rank(s), backend {dist.get_backend()}, global batch {args.batch}")
        if trainable is not None:
            print(f"communicated per step: {trainable:,d} LoRA gradient elements of {total:,d} parameters")
        for i, loss in enumerate(losses):
            print(f"step {args.start_step + i}: loss {loss:.6f}")
    if args.save:
        fdist.save_pretrained(model, args.save, optimizer=opt)  # every rank: FSDP2 shards are gathered
        if rank == 0:
            print(f"saved PEFT checkpoint to {args.save} ({sorted(os.listdir(args.save))})")
    got = lora_weights(model)  # a collective under FSDP2: every rank
    if args.verify and rank == 0:
        fdist.set_dropout_rank(0)
        ref = build(args).to(device)
        _, ref_losses = train(args, ref, 0, 1, device, args.start_step)
        want = lora_weights(ref)
        diff = max((got[k] - want[k]).abs().max().item() for k in want)
        print(f"max |{world}-rank - 1-process| LoRA weights: {diff:.3e}; losses: "
              f"{max(abs(a - b) for a, b in zip(losses, ref_losses)):.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""DDP and FSDP2 over fastpeft models: 2 gloo ranks on the CPU against one process.

One spawn of 2 ranks runs every scenario (``_worker.main``); the tests compare its results with
the same training run in this process. fp32 throughout; the tolerances allow for the different
reduction order of an all-reduce (the runs here happen to agree to ~1e-8).
"""
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed import _worker as W

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    d = str(tmp_path_factory.mktemp("dp"))
    W.train("lora_ddp", save_dir=os.path.join(d, "ckpt_single"))  # the checkpoint the ranks resume from
    try:
        mp.spawn(W.main, args=(WORLD, _free_port(), d), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as exc:
        # rank 0 writes results.pt after the last collective, so every rank had done all its work by
        # then: a rank killed by a signal after that died in gloo's teardown, not in fastpeft
        if exc.signal_name is None or not os.path.exists(os.path.join(d, "results.pt")):
            raise
        warnings.warn(f"a rank died in process-group teardown after finishing its work: {exc}")
    r = torch.load(os.path.join(d, "results.pt"))
    r["dir"] = d
    return r


_single = {}


def single(name):
    """The 1-process run of scenario ``name`` (batch G), computed once."""
    if name not in _single:
        _single[name] = W.train(name)
    return _single[name]


def assert_same_run(got, want):
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=1e-6)
    assert set(got["params"]) == set(want["params"])
    for k, v in want["params"].items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)


DROPOUT = [n for n in W.SCENARIOS if "_dropout_" in n]


@pytest.mark.parametrize("name", [n for n in W.SCENARIOS if n not in DROPOUT])
def test_n_ranks_match_one_process(results, name):
    """3 AdamW steps: losses and updated PEFT parameters of 2 ranks x G/2 == 1 process x G."""
    assert len(results[name]["losses"]) == W.STEPS >= 3
    assert_same_run(results[name], single(name))
    assert results[name]["params"], "no trainable parameters"


def test_parameters_moved(results):
    """The comparison is not vacuous: training changed the PEFT parameters."""
    start = {n: p.detach() for n, p in W.build("lora").named_parameters() if p.requires_grad}
    moved = max((results["lora_ddp"]["params"][n] - p).abs().max().item() for n, p in start.items())
    assert moved > 1e-3


@pytest.mark.parametrize("name", DROPOUT)
def test_data_parallel_with_dropout_matches_per_rank_streams(results, name):
    """Dropout on (LoRA, DoRA; DDP and FSDP2): N ranks == one process running each rank's rows
    through that rank's dropout stream (same generator state) and averaging the gradients."""
    assert_same_run(results[name], W.reference_dropout_step(name, WORLD))
    # and dropout mattered: without the per-rank streams (every rank on stream 0) the run differs
    assert results[name]["losses"][1:] != pytest.approx(single(name)["losses"][1:], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("method", ["lora_dropout", "dora_dropout"])
def test_dropout_masks_distinct_per_rank_and_reproducible(results, method):
    outs = results[f"{method}_outputs"]
    assert not torch.equal(outs[0], outs[1]), "ranks drew the same dropout masks"
    for rank in range(WORLD):  # reproducible from (seed, rank), here in another process
        torch.testing.assert_close(outs[rank], W.dropout_outputs(rank, method), rtol=0, atol=0)
    model = W.build(method).eval()  # and dropout really is on in training
    x, _ = W.batch("lora", 0)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x[:2]).logits, outs[0])


@pytest.mark.parametrize("name", [n for n in W.SCENARIOS if W.SCENARIOS[n][1].startswith("ddp")])
def test_ddp_communicates_only_peft_parameters(results, name):
    """Every gradient all-reduce carries exactly the trainable elements, once per step."""
    r = results[name]
    assert sum(r["comm"]) == W.STEPS * r["trainable"]
    assert r["optimizer_params"] == r["trainable"]


@pytest.mark.parametrize("name,base_sharded", [("lora_fsdp", True), ("lora_fsdp_replicated", False),
                                               ("adapter_fsdp", True), ("lora_fsdp_plain", True),
                                               ("dora_fsdp", True), ("dora_dropout_fsdp", True),
                                               ("prompt_fsdp", True), ("bitfit_fsdp", True),
                                               ("lora_bert_fsdp", True), ("lora_gpt2_fsdp", True)])
def test_fsdp_shards_and_optimizer(results, name, base_sharded):
    """FSDP2: the PEFT parameters are shards and the only thing the optimizer holds; the frozen
    base is sharded too, or (shard_base=False: ignored_params) plain replicated tensors."""
    r = results[name]
    n_frozen, n_train = r["n"]
    assert r["sharded"] == ((n_frozen if base_sharded else 0), n_train)
    assert r["optimizer_params"] == r["trainable"]


@pytest.mark.parametrize("name", W.SAVED)
def test_resume_on_one_process(results, name):
    """A checkpoint saved by the 2 ranks after step 2 (PEFT format + optimizer state) resumes on
    1 process: step 3 gives the 2-rank run's loss and parameters."""
    ckpt = os.path.join(results["dir"], f"ckpt_{name}")
    got = W.train(name, resume=ckpt, first_step=W.SAVE_AFTER)
    want = results[name]
    assert got["losses"] == pytest.approx(want["losses"][W.SAVE_AFTER:], rel=1e-5, abs=1e-6)
    for k, v in want["params"].items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", ["lora_ddp", "lora_fsdp"])
def test_resume_on_two_ranks(results, name):
    """And the other way: a 1-process checkpoint resumes on 2 ranks (DDP, FSDP2 with the optimizer
    state sharded on load)."""
    want = single("lora_ddp")
    got = results[f"resume_{name}"]
    assert got["losses"] == pytest.approx(want["losses"][W.SAVE_AFTER:], rel=1e-5, abs=1e-6)
    for k, v in want["params"].items():
        torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_rank0_checkpoint_is_peft_format(results, method):
    """Saved from FSDP2 shards: only the adapter tensors, whole, with PEFT's names - the same file a
    single process writes, and Hugging Face PEFT loads it (DoRA: with its magnitude vectors)."""
    import peft
    from safetensors.torch import load_file

    from fastpeft.checkpoint import WEIGHTS_NAME
    from tests.api._models import hf_llama

    d = os.path.join(results["dir"], f"ckpt_{method}_fsdp")
    fsdp = load_file(os.path.join(d, WEIGHTS_NAME))
    single_dir = os.path.join(results["dir"], f"ckpt_single_{method}")
    if not os.path.isdir(single_dir):
        W.train(f"{method}_ddp", save_dir=single_dir)
    one = load_file(os.path.join(single_dir, WEIGHTS_NAME))
    assert set(fsdp) == set(one) and all("lora_" in k for k in fsdp)
    assert all(fsdp[k].shape == one[k].shape for k in fsdp)
    assert any("lora_magnitude_vector" in k for k in fsdp) == (method == "dora")
    x, _ = W.batch("lora", 0)
    hp = peft.PeftModel.from_pretrained(hf_llama(), d).eval()
    fp = W.build(method).eval()
    fp.load_adapter(d, "default")
    with torch.no_grad():
        torch.testing.assert_close(hp(input_ids=x).logits, fp(input_ids=x).logits, rtol=1e-5, atol=1e-5)

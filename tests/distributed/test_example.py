"""examples/distributed_lora.py under ``torchrun --nproc_per_node 2`` (gloo on the CPU)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("extra", [["--mode", "fsdp"], ["--mode", "ddp", "--dora"]], ids=["fsdp", "ddp-dora"])
def test_distributed_lora_example_matches_one_process(tmp_path, extra):
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable),
                                                                            "torchrun")):
        pytest.skip("torchrun not found")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    ckpt = tmp_path / "ckpt"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "examples", "distributed_lora.py"), *extra, "--steps", "2",
                          "--verify", "--save", str(ckpt)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(rf"{extra[1]} on 2 rank\(s\), backend gloo", out.stdout), out.stdout
    assert len(re.findall(r"step \d: loss [0-9.]+", out.stdout)) == 2
    m = re.search(r"max \|2-rank - 1-process\| LoRA weights: ([0-9.e+-]+); losses: ([0-9.e+-]+)", out.stdout)
    assert m and float(m.group(1)) < 1e-5 and float(m.group(2)) < 1e-5, out.stdout
    assert sorted(os.listdir(ckpt)) == ["adapter_config.json", "adapter_model.safetensors", "optimizer_state.pt"]

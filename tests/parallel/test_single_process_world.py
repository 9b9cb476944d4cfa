"""A world of one started without torchrun (the toy, a validation-only run) takes a free port of its own."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WORLD_OF_ONE = """
import os, time
import torch.distributed as dist
from megatron_dapo.parallel.config import ParallelConfig
from megatron_dapo.parallel.init import init_distributed
init_distributed(ParallelConfig(), seed=0)
print(os.environ["MASTER_PORT"], dist.get_world_size(), flush=True)
time.sleep(3)  # both hold their store's port at once
"""


def test_two_worlds_of_one_on_a_host_run_side_by_side():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    runs = [subprocess.Popen([sys.executable, "-c", WORLD_OF_ONE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    ports = [out.split()[0] for out, _ in outputs]
    assert ports[0] != ports[1] and all(out.split()[1] == "1" for out, _ in outputs), outputs

"""Peak host memory of grpo_vl.load_models per rank, under torchrun on CPU ranks (gloo):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/load_memory_worker.py \
        [--hidden 2048 --layers 6] [--code DIR]

A random Qwen2-VL of the given size is saved in bf16, as Qwen's releases are; each rank then loads it as a
run with a reference model does (beta 0.04) and prints how much its peak resident memory grew, in MB and in
units of P bytes, P the parameter count (fp32 weights are 4P bytes). --code DIR imports grpo_vl.py from DIR
(an older version, to compare). test_train.py runs it on a small model (only rank 0 reads the weights);
tests/README.md ("Host memory at load") has the figures of a bigger one."""

import argparse
import os
import resource
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser()
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--code", default=os.path.dirname(HERE))
p.add_argument("--build", action="store_true", help="only write the model folder (one process)")
cli = p.parse_args()
sys.path.insert(0, HERE)  # as a torchrun script, without conftest.py
import tiny  # noqa: E402 (it puts the project first on sys.path)

folder = os.path.join(tiny.CACHE, f"bf16-{cli.hidden}x{cli.layers}")
if cli.build:
    model, processor = tiny.build(hidden=cli.hidden, layers=cli.layers)
    model.to(torch.bfloat16).save_pretrained(folder)  # config.json says bfloat16, as a release's does
    processor.save_pretrained(folder)
    sys.exit()

import torch.distributed as dist  # noqa: E402
import transformers as tf  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

sys.path.insert(0, cli.code)
import grpo_vl as g  # noqa: E402


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if rank == 0 and not os.path.exists(os.path.join(folder, "config.json")):  # built in another process:
    subprocess.run([sys.executable, __file__, "--build", f"--hidden={cli.hidden}", f"--layers={cli.layers}"])
dist.barrier()  # ... so that building it does not count in this process's peak
with torch.device("meta"):
    P = sum(
        t.numel()
        for t in tf.AutoModelForImageTextToText.from_config(
            tf.AutoConfig.from_pretrained(folder)
        ).parameters()
    )
reads = []  # the ranks that read the weights from disk: rank 0 only
from_pretrained = tf.AutoModelForImageTextToText.from_pretrained


def counted(*args, **kwargs):
    reads.append(rank)
    return from_pretrained(*args, **kwargs)


tf.AutoModelForImageTextToText.from_pretrained = counted
args = g.parse_args(["--model", folder, "--data", "unused", "--beta", "0.04", "--precision", "fp32"])
before = peak_mb()
run = g.load_models(args, rank, world, torch.device("cpu"), init_device_mesh("cpu", (world,)))
grown = peak_mb() - before
print(
    f"rank {rank}: P = {P / 1e6:.1f}M, read the weights {len(reads)} time(s), peak host memory grew "
    f"{grown:.0f} MB = {grown * 2**20 / P:.2f} P bytes",
    flush=True,
)
dist.barrier()
dist.destroy_process_group()

"""Run under torchrun --nproc_per_node=2 by test_vision_sharing.py: with the model and the reference sharded
by FSDP2 (the vision tower its own unit), shared_vision changes no greedy completion, no reference or policy
log-prob and no gradient shard of a GRPO loss (compared with grpo_vl.shared_vision patched to do nothing),
for a prompt of one image and a prompt of two on each rank, and the tower sees each prompt's images once per
pass."""

import copy
import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # as a torchrun script, without conftest.py
import data  # noqa: E402
import grpo_vl as g  # noqa: E402
import tiny  # noqa: E402
from test_vision_sharing import (  # noqa: E402
    G,
    count_images,
    load,
    perturbed,
    rollouts_and_steps_agree,
    two_images,
)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

dist.init_process_group("gloo")
rank, mesh, cpu = dist.get_rank(), init_device_mesh("cpu", (2,)), torch.device("cpu")
if rank == 0:  # the cached fixtures, written by one rank only
    tiny.flags(), tiny.model_dir("tiny-2.5"), tiny.data_file(16)
dist.barrier()
mine = data.load_examples(tiny.data_file(16), "train", seed=0)[2 * rank : 2 * rank + 2]  # each rank its own
exs = [mine[0], two_images(mine[1], mine[0])]  # a prompt of one image, a prompt of two
for name in ("tiny", "tiny-2.5"):
    args, run = load(name, "--variant", "grpo", "--max-new-tokens", "10")  # unsharded, then sharded here
    model = run.model
    model.generation_config.do_sample = False  # greedy: rollouts comparable
    ref = perturbed(model)
    for m in (model, ref):  # emptied and filled from a copy, as load_models fills the meta-built models
        g.shard(m, copy.deepcopy(m), mesh, cpu, bf16=False)
    seen = count_images(model)
    rollouts_and_steps_agree(model, ref, exs, args, run, cpu)
    # each prompt's greedy prefill, then the policy's forward of each prompt's batch: once, or G times
    assert seen == [1, 2, G, 2 * G, 1, 2, G, 2 * G], seen
    print(f"rank {rank} {name}: equal, tower images {seen}", flush=True)
    dist.barrier()
dist.destroy_process_group()

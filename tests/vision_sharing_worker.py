"""Run under torchrun --nproc_per_node=2 by test_vision_sharing.py: with the model and the reference sharded
by FSDP2 (the vision tower its own unit), shared_vision changes no greedy completion, no reference or policy
log-prob and no gradient shard of a GRPO loss (compared with grpo_vl.shared_vision patched to do nothing),
and the tower sees each rank's distinct images once."""

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
    assert_same_step,
    count_images,
    load,
    perturbed,
    scored_step,
    vision_sharing,
)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

dist.init_process_group("gloo")
rank, mesh, cpu = dist.get_rank(), init_device_mesh("cpu", (2,)), torch.device("cpu")
if rank == 0:  # the cached fixtures, written by one rank only
    tiny.flags(), tiny.model_dir("tiny-2.5"), tiny.data_file(16)
dist.barrier()
exs = data.load_examples(tiny.data_file(16), "train", seed=0)[
    2 * rank : 2 * rank + 2
]  # each rank its prompts
for name in ("tiny", "tiny-2.5"):
    args, run = load(name, "--max-new-tokens", "10")  # unsharded, then sharded here beside its reference
    model = run.model
    ref = perturbed(model)
    g.shard(model, mesh, cpu, bf16=False)
    g.shard(ref, mesh, cpu, bf16=False)
    seen = count_images(model)
    b = g.take(g.encode(run.processor, exs, args), torch.arange(2).repeat_interleave(G))
    completions = []
    for on in (True, False):
        with vision_sharing(on), torch.no_grad(), g.gathered(model), g.shared_vision(b, model):
            seqs = model.generate(**{k: b[k] for k in g.MODEL_KEYS}, do_sample=False, max_new_tokens=10)
        completions.append(seqs[:, b["input_ids"].shape[1] :])
    assert torch.equal(*completions), completions
    b["completion"] = completions[0]
    b["mask"], _ = g.completion_mask(b["completion"], run.eos)
    steps = []
    for on in (True, False):
        with vision_sharing(on):
            steps.append(scored_step(model, ref, b, run.banned, cpu))
    assert_same_step(*steps, b["mask"])
    assert seen == [2, 2 * G, 2, 2 * G], seen  # greedy prefill, then the policy forward: once, or G times
    print(f"rank {rank} {name}: equal, tower images {seen}", flush=True)
    dist.barrier()
dist.destroy_process_group()

"""Run under torchrun --nproc_per_node=2 by test_vision_sharing.py: with the model and the reference sharded
by FSDP2 (the vision tower its own unit), shared_vision changes no greedy completion, no reference or policy
log-prob and no gradient shard of a GRPO loss, and the tower sees each rank's distinct images once."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import grpo_vl as g  # noqa: E402
from test_vision_sharing import G, assert_same_step, count_images, flags, grpo_step, perturbed  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

dist.init_process_group("gloo")
rank, mesh, cpu = dist.get_rank(), init_device_mesh("cpu", (2,)), torch.device("cpu")
exs = data.load_examples("synthetic:16", "train", seed=0)[2 * rank : 2 * rank + 2]  # each rank its prompts
for name in ("tiny", "tiny-2.5"):
    on, off = flags(name, True, "--max-new-tokens", "10"), flags(name, False, "--max-new-tokens", "10")
    model, processor, eos, banned = g.load_model(on)
    ref = perturbed(model)
    g.shard(model, mesh, cpu, bf16=False)
    g.shard(ref, mesh, cpu, bf16=False)
    seen = count_images(model)
    b = g.take(g.encode(processor, exs, on), torch.arange(2).repeat_interleave(G))
    completions = []
    for args in (on, off):
        with torch.no_grad(), g.gathered(model), g.shared_vision(b, args, model):
            seqs = model.generate(**{k: b[k] for k in g.MODEL_KEYS}, do_sample=False, max_new_tokens=10)
        completions.append(seqs[:, b["input_ids"].shape[1] :])
    assert torch.equal(*completions), completions
    b["completion"] = completions[0]
    b["mask"], _ = g.completion_mask(b["completion"], eos)
    assert_same_step(
        grpo_step(model, ref, b, on, banned, cpu), grpo_step(model, ref, b, off, banned, cpu), b["mask"]
    )
    assert seen == [2, 2 * G, 2, 2 * G], seen  # greedy prefill, then the policy forward: once, or G times
    print(f"rank {rank} {name}: equal, tower images {seen}", flush=True)
    dist.barrier()
dist.destroy_process_group()

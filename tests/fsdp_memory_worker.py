"""Run under torchrun --nproc_per_node=2 by test_memory.py, on CPU ranks (gloo):
1. gradients of a scoring forward + backward with gradient checkpointing equal those without it, and the
   decoder layers really were recomputed in the backward;
2. after a no-grad forward the reference model keeps no gathered parameters: every one is a DTensor shard."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import grpo_vl as g  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
cpu = torch.device("cpu")
mesh = init_device_mesh("cpu", (2,))
args = g.parse_args(["--model", "tiny"])
_, processor, eos, banned = g.load_model(args)
b = g.sft_batch(processor, data.load_examples("synthetic:4", "train")[2 * rank : 2 * rank + 2], args)

grads, calls = {}, {}
for checkpointing in (False, True):
    model = g.build_tiny(args.seed)[0]
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g.shard(model, mesh, cpu, bf16=False)
    calls[checkpointing] = 0

    def count(*_, checkpointing=checkpointing):
        calls[checkpointing] += 1

    model.model.language_model.layers[0].mlp.register_forward_pre_hook(count)
    logp = g.token_logprobs(model, b, 1.0, banned, cpu)
    (-(logp * b["mask"]).sum()).backward()
    grads[checkpointing] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
assert calls == {False: 1, True: 2}, calls  # with checkpointing the layer ran again in the backward
for name, grad in grads[False].items():
    assert grad.abs().max() > 0, name
    assert torch.allclose(grads[True][name], grad, rtol=1e-5, atol=1e-7), (
        name,
        (grads[True][name] - grad).abs().max(),
    )

ref = g.build_tiny(args.seed)[0].eval().requires_grad_(False)
g.shard(ref, mesh, cpu, bf16=False)
with torch.no_grad():
    g.token_logprobs(ref, b, 1.0, banned, cpu)
gathered = [n for n, p in ref.named_parameters() if not isinstance(p, DTensor)]
assert not gathered, f"reference parameters left gathered after a no-grad forward: {gathered[:3]}"
print(f"rank {rank}: checkpointed gradients equal, reference resharded", flush=True)
dist.barrier()
dist.destroy_process_group()

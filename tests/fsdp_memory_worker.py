"""Run under torchrun --nproc_per_node=2 by test_memory.py, on CPU ranks (gloo), with the models as
grpo_vl.load_models shards them:
1. gradients of a scoring forward + backward with gradient checkpointing equal those without it, and the
   decoder layers really were recomputed in the backward;
2. after a no-grad forward the reference model keeps no gathered parameters: every one is a DTensor shard."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # as a torchrun script, without conftest.py
import data  # noqa: E402
import grpo_vl as g  # noqa: E402
import tiny  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 0:  # the cached fixtures, written by one rank only
    tiny.flags(), tiny.data_file(4)
dist.barrier()
cpu = torch.device("cpu")
mesh = init_device_mesh("cpu", (2,))
exs = data.load_examples(tiny.data_file(4), "train")[2 * rank : 2 * rank + 2]

grads, calls, b = {}, {}, None
for checkpointing in (False, True):
    flag = "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing"
    args = g.parse_args(tiny.flags() + [flag, "--precision", "fp32"])
    run = g.load_models(args, rank, 2, cpu, mesh)
    model = run.model
    assert model.training and model.is_activation_checkpointing == checkpointing
    b = g.sft_batch(run.processor, exs, args)
    calls[checkpointing] = 0

    def count(*_, checkpointing=checkpointing):
        calls[checkpointing] += 1

    model.model.language_model.layers[0].mlp.register_forward_pre_hook(count)
    logp = g.token_logprobs(model, b, 1.0, run.banned, cpu)
    (-(logp * b["mask"]).sum()).backward()
    grads[checkpointing] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
assert calls == {False: 1, True: 2}, calls  # with checkpointing the layer ran again in the backward
for name, grad in grads[False].items():
    assert grad.abs().max() > 0, name
    assert torch.allclose(grads[True][name], grad, rtol=1e-5, atol=1e-7), (
        name,
        (grads[True][name] - grad).abs().max(),
    )

ref = run.ref  # the frozen reference load_models sharded (beta 0.04 by default)
assert ref is not None and not ref.training
assert not [n for n, p in ref.named_parameters() if not isinstance(p, DTensor)]  # sharded to begin with
with torch.no_grad():
    g.token_logprobs(ref, b, 1.0, run.banned, cpu)
gathered = [n for n, p in ref.named_parameters() if not isinstance(p, DTensor)]
assert not gathered, f"reference parameters left gathered after a no-grad forward: {gathered[:3]}"
print(f"rank {rank}: checkpointed gradients equal, reference resharded", flush=True)
dist.barrier()
dist.destroy_process_group()

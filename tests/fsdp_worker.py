"""Run under torchrun --nproc_per_node=2 by test_train.py: inside gathered() a rollout (one generate() per
prompt, two prompts per rank) all-gathers each FSDP unit once, however many tokens it generates (so ranks
that stop early never leave the others waiting), every parameter is a shard again after it (and after
load_models' shard()), and sharded generation equals unsharded generation."""

import os
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # as a torchrun script, without conftest.py
import data  # noqa: E402
import grpo_vl as g  # noqa: E402
import tiny  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.fsdp._fully_shard import _fsdp_param_group  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

all_gathers = [0]
_all_gather = _fsdp_param_group.foreach_all_gather


def counting_all_gather(*a, **k):
    all_gathers[0] += 1
    return _all_gather(*a, **k)


_fsdp_param_group.foreach_all_gather = counting_all_gather

dist.init_process_group("gloo")
rank = dist.get_rank()
if rank == 0:  # the cached fixtures, written by one rank only
    tiny.flags(), tiny.data_file(4)
dist.barrier()
cpu = torch.device("cpu")
args = g.parse_args(tiny.flags() + ["--beta", "0", "--max-new-tokens", "3" if rank == 0 else "40"])
run = g.load_models(args, rank, 2, cpu, init_device_mesh("cpu", (2,)))
plain = g.load_models(args, rank, 1, cpu, None)  # the same model folder, unsharded
model = run.model
exs = data.load_examples(tiny.data_file(4), "train")[rank : rank + 2]
units = sum(isinstance(m, FSDPModule) for m in model.modules())
# sharded: each parameter is this rank's DTensor shard; a gathered module holds full plain tensors instead
gathered_params = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
assert not gathered_params, f"gathered after shard(): {gathered_params}"
all_gathers[0] = 0
# 3 tokens on rank 0, 40 on rank 1: with an all-gather per token, rank 1 would wait on rank 0
sharded = g.rollout(model, exs, args, run, seed=rank)
assert all_gathers[0] == units, f"{all_gathers[0]} all-gathers for {units} FSDP units"
gathered_params = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
assert not gathered_params, f"still gathered after the rollout: {gathered_params}"
assert model.training  # gathered() put back training mode
dist.barrier()
reference = g.rollout(plain.model, exs, args, plain, seed=rank)
assert len(sharded) == len(reference) == 2
for s, r in zip(sharded, reference):
    assert torch.equal(s["completion"], r["completion"]), (s["completion"], r["completion"])
print(
    f"rank {rank}: generated {max(b['completion'].shape[1] for b in sharded)} tokens, equal to unsharded",
    flush=True,
)
dist.barrier()
dist.destroy_process_group()

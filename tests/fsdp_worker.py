"""Run under torchrun --nproc_per_node=2 by test_train.py: inside gathered() a rollout all-gathers each
FSDP unit once, however many tokens it generates (so ranks that stop early never leave the others
waiting), every parameter is a shard again after it (and after shard()), and sharded generation equals
unsharded generation."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import grpo_vl as g  # noqa: E402
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
args = g.parse_args(["--model", "tiny", "--max-new-tokens", "3" if rank == 0 else "40"])
model, processor, eos, banned = g.load_model(args)
plain = g.build_tiny(args.seed)[0].eval()
g.shard(model, init_device_mesh("cpu", (2,)), torch.device("cpu"), bf16=False)
b = g.encode(processor, data.load_examples("synthetic:4", "train")[rank : rank + 2], args)
inputs = {k: b[k] for k in g.MODEL_KEYS}
units = sum(isinstance(m, FSDPModule) for m in model.modules())
# sharded: each parameter is this rank's DTensor shard; a gathered module holds full plain tensors instead
gathered_params = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
assert not gathered_params, f"gathered after shard(): {gathered_params}"
all_gathers[0] = 0
with g.gathered(model):
    torch.manual_seed(rank)
    # 3 tokens on rank 0, 40 on rank 1: with an all-gather per token, rank 1 would wait on rank 0
    sharded = model.generate(**inputs, **g.sampling(args, banned))
assert all_gathers[0] == units, f"{all_gathers[0]} all-gathers for {units} FSDP units"
gathered_params = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
assert not gathered_params, f"still gathered after the rollout: {gathered_params}"
dist.barrier()
torch.manual_seed(rank)
reference = plain.generate(**inputs, **g.sampling(args, banned))
assert torch.equal(sharded, reference), (sharded, reference)
print(
    f"rank {rank}: generated {sharded.shape[1] - b['input_ids'].shape[1]} tokens, equal to unsharded",
    flush=True,
)
dist.barrier()
dist.destroy_process_group()

"""--precision bf16, as each kind of run does it: under FSDP2 the mixed-precision policy (bf16 compute over
fp32 shards, gradients reduced in fp32), in one process bf16 autocast over the fp32 weights.

Run under torchrun --nproc_per_node=2 this file is the 2-rank worker of the FSDP test (CPU ranks, gloo)."""

import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]  # as a torchrun script, without conftest.py
import data  # noqa: E402
import grpo_vl as g  # noqa: E402
import tiny  # noqa: E402

CPU = torch.device("cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_fsdp_bf16_computes_in_bf16_over_fp32_shards_and_reduces_gradients_in_fp32():
    """2 ranks, load_models with --precision bf16 (shard(bf16=True)): every vision block and decoder layer
    outputs bf16 (a policy computing in fp32 would give fp32), the shards and their gradients stay fp32,
    and the reduce-scatter is handed fp32 gradients -- its result is not bf16-rounded, as the mean of two
    ranks' bf16 gradients reduced in bf16 would be (lr 1e-6 updates vanish in bf16)."""
    tiny.data_file(4)  # written here, not raced for by the two ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["tests/test_precision.py"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    errors = [line for line in p.stderr.splitlines() if "Error:" in line]  # the ranks' failed assertions
    assert p.returncode == 0, "\n".join(errors[:4]) + "\n" + p.stdout[-3000:] + p.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: bf16 compute, fp32 shards, fp32 gradient reduction" in p.stdout, p.stdout


def fsdp_worker():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:  # the cached fixtures, written by one rank only
        tiny.flags(), tiny.data_file(4)
    dist.barrier()
    args = g.parse_args(tiny.flags() + ["--precision", "bf16", "--beta", "0"])
    run = g.load_models(args, rank, 2, CPU, init_device_mesh("cpu", (2,)))  # shard(bf16=True) of the policy
    banned, model = run.banned, run.model
    b = g.sft_batch(
        run.processor, data.load_examples(tiny.data_file(4), "train")[2 * rank : 2 * rank + 2], args
    )
    assert model.training
    layers = [*model.model.visual.blocks, *model.model.language_model.layers]
    computed, reduced = [], []
    for layer in layers:
        layer.register_forward_hook(
            lambda m, i, out: computed.append((out[0] if isinstance(out, tuple) else out).dtype)
        )

    class RecordingReduceScatter(DefaultReduceScatter):  # FSDP2's hook for a custom gradient reduce-scatter
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            reduced.append(input_tensor.dtype)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_custom_reduce_scatter(RecordingReduceScatter())
    logp = g.token_logprobs(model, b, 1.0, banned, CPU)
    (-(logp * b["mask"]).sum()).backward()
    assert computed == [torch.bfloat16] * len(layers), computed  # each layer ran once, in bf16
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in params.values())  # fp32 shards
    assert all(isinstance(p.grad, DTensor) and p.grad.dtype == torch.float32 for p in params.values())
    # the mean of the two ranks' bf16 gradients, reduced in fp32, mostly needs more than bf16's 8 bits
    grads = torch.cat([p.grad.to_local().flatten() for p in params.values()])
    finer = (grads.bfloat16().float() != grads).float().mean().item()  # measured: 0.58 (0 reduced in bf16)
    assert finer > 0.2, f"reduced gradients rounded to bf16: only {finer:.2f} of them are finer"
    assert reduced and set(reduced) == {torch.float32}, reduced  # what the reduce-scatter was handed
    print(f"rank {rank}: bf16 compute, fp32 shards, fp32 gradient reduction ({finer:.2f} finer than bf16)")
    dist.barrier()
    dist.destroy_process_group()


def test_one_process_bf16_generates_and_scores_under_autocast_and_fp32_does_not(monkeypatch, tmp_path):
    """grpo_vl.main in one process: --precision bf16 runs the rollout and every scoring forward (reference
    and policy) under bf16 autocast, so the decoder's MLPs output bf16 over fp32 weights, and the log-probs
    come out in fp32; --precision fp32 autocasts nothing. Without the autocast a CPU bf16 run is fp32
    throughout."""
    real_rollout, real_logprobs = g.rollout, g.token_logprobs
    seen = []

    def recording(real, what):
        def call(model, *rest, **kw):
            mlp_dtypes = set()
            hook = model.model.language_model.layers[0].mlp.register_forward_hook(
                lambda m, i, out: mlp_dtypes.add(out.dtype)
            )
            try:
                result = real(model, *rest, **kw)
            finally:
                hook.remove()
            on = torch.is_autocast_enabled("cpu")
            weights = {p.dtype for p in model.parameters()}
            who = what
            if what != "rollout":  # the policy trains; the reference is frozen
                who = "policy" if any(p.requires_grad for p in model.parameters()) else "reference"
            seen.append((who, on, torch.get_autocast_dtype("cpu") if on else None, mlp_dtypes, weights))
            if what != "rollout":
                assert result.dtype == torch.float32  # log-softmax in fp32 whatever the compute dtype
            return result

        return call

    monkeypatch.setattr(g, "rollout", recording(real_rollout, "rollout"))
    monkeypatch.setattr(g, "token_logprobs", recording(real_logprobs, "scoring"))
    bf16, fp32 = torch.bfloat16, torch.float32
    for precision, autocast, compute in [("bf16", True, bf16), ("fp32", False, fp32)]:
        seen.clear()
        flags = ["--data", tiny.data_file(16), "--max-steps", "1", "--prompts-per-step", "2"]
        flags += ["--num-generations", "2", "--max-new-tokens", "8", "--precision", precision]
        g.main(tiny.flags() + flags + ["--out", str(tmp_path / precision)])
        # the rollout (one generate() per prompt), then per prompt's micro-batch the reference's scoring,
        # then the policy's
        assert [what for what, *_ in seen] == ["rollout", "reference", "reference", "policy", "policy"], seen
        expected = (autocast, bf16 if autocast else None, {compute}, {fp32})
        assert all(tuple(s[1:]) == expected for s in seen), (precision, seen)


if __name__ == "__main__":
    fsdp_worker()

"""./run.sh gpu cannot rot: `tests/gpu.py --quick` (one decoder layer and one vision block at small widths,
the real vocabulary, a 112 x 56 image, 8 new tokens) takes the script's whole path on CPU in seconds --
without qwen-vl-utils and datasets, as on a bare GPU machine -- and prints its table: every part, finite
figures, the predictions tests/memory.py's arithmetic for the shapes it prints. A transformers without what
the project needs ends the script in one line; the qwen-vl-utils stand-in resizes as qwen-vl-utils does."""

import math
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import qwen_vl_utils
import torch
from PIL import Image

import gpu
import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PARTS = (
    ["load"] + [f"SFT {p}" for p in gpu.SFT_PARTS + ["step"]] + [f"RL {p}" for p in gpu.RL_PARTS + ["step"]]
)
COLUMNS = ["part", "seconds", "of step", "peak GB", "predicted GB", "measured/predicted", "tokens/s"]


def script(*flags, before="pass"):
    """tests/gpu.py FLAGS run as `python3 tests/gpu.py` runs it, after the statements `before` (which take
    packages away): (exit status, stdout, stderr)."""
    code = f"import runpy, sys; {before}; sys.argv = ['tests/gpu.py', *{list(flags)!r}]; "
    code += "runpy.run_path('tests/gpu.py', run_name='__main__')"
    cmd = [sys.executable, "-c", code]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def quick():
    """stdout of the short form on a machine without qwen-vl-utils and datasets."""
    status, out, err = script("--quick", before="sys.modules.update(qwen_vl_utils=None, datasets=None)")
    assert status == 0, out[-3000:] + err[-5000:]
    return out


def printed_table(out):
    """{part: {column: value}} read back from the table (a part's name fills its first 14 characters)."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("part "))
    assert re.split(r"\s\s+", lines[head].strip()) == COLUMNS, lines[head]
    rows = {}
    for line in lines[head + 1 :]:
        seconds, share, peak, predicted, ratio, *rate = line[14:].split()
        rows[line[:14].strip()] = dict(
            seconds=float(seconds),
            share=None if share == "-" else float(share.rstrip("%")) / 100,
            peak=float(peak) * 1e9,
            predicted=float(predicted) * 1e9,
            ratio=float(ratio),
            tokens_per_s=float(rate[0]) if rate else None,
        )
    return rows


def printed_shapes(out):
    """The numbers of the table's header: parameters, prompt tokens, patches, SFT examples and target tokens,
    G, new tokens, micro-batch."""
    pattern = (
        r"vocabulary 151,936: ([\d,]+) parameters.*\nprompt (\d+) tokens \((\d+) patches.*SFT: (\d+) "
        r"examples per rank of (\d+) target tokens; RL: 1 prompt per rank, G = (\d+), (\d+) new tokens; "
        r"micro-batch (\d+)"
    )
    return [int(x.replace(",", "")) for x in re.search(pattern, out).groups()]


def test_quick_form_prints_every_part_with_finite_figures(quick):
    assert re.search(
        r"gpu.py: python [\d.]+, torch \S+, transformers \S+, no GPU: CPU", quick
    )  # its versions
    assert "gpu.py: no qwen-vl-utils: data.py resizes images with a stand-in" in quick
    table = printed_table(quick)
    assert list(table) == PARTS
    for part, row in table.items():
        assert math.isfinite(row["seconds"]) and row["seconds"] >= 0, (part, row)
        assert row["peak"] > 0 and row["predicted"] > 0, (part, row)
        assert row["ratio"] == pytest.approx(row["peak"] / row["predicted"], abs=0.02), (part, row)
    for phase in ("SFT", "RL"):
        parts = {
            part: row for part, row in table.items() if part.startswith(phase) and not part.endswith("step")
        }
        step = table[f"{phase} step"]
        assert step["seconds"] == pytest.approx(sum(row["seconds"] for row in parts.values()), abs=0.005)
        assert sum(row["share"] for row in parts.values()) == pytest.approx(1, abs=0.03)
        assert step["peak"] == max(
            row["peak"] for row in parts.values()
        )  # the step's peak: its largest part's
        assert step["predicted"] == max(row["predicted"] for row in parts.values())
    assert [part for part, row in table.items() if row["tokens_per_s"]] == ["RL rollout"]
    assert table["RL rollout"]["tokens_per_s"] > 0
    folder = re.search(r"gpu.py: wrote (\S+)", quick).group(1)
    assert not os.path.exists(os.path.dirname(folder))  # the model folder was removed


def test_quick_form_under_torchrun_on_two_ranks():
    """Several GPUs run the script under torchrun (FSDP2): the same path on 2 CPU ranks (gloo), rank 0 writing
    the model folder for both, the peaks the larger of the two ranks'."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "tests/gpu.py",
    ]
    p = subprocess.run([*cmd, "--quick"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert p.stdout.count("gpu.py: wrote ") == 1 and "SFT: 2 steps x 8 examples" in p.stdout  # 4 per rank
    table = printed_table(p.stdout)
    assert list(table) == PARTS
    assert all(row["peak"] > 0 and math.isfinite(row["ratio"]) for row in table.values()), table
    P = printed_shapes(p.stdout)[0]
    # sharded over the 2 ranks, and rank 0 broadcasting the whole embedding (fp32, at most) as it loads
    assert table["load"]["predicted"] == pytest.approx(8 * P / 2 + 151_936 * 64 * 4, abs=0.6e6)


def test_quick_form_predicts_the_arithmetic_by_hand(quick):
    """The predictions, recomputed here term by term for the quick model (width 64, K/V width 2 x 16, vision
    width 32; one layer, one block): 8 bytes per parameter loaded (fp32 policy and reference), 20 in every
    part of a step (+ gradients, AdamW's moments), and each part's own term; the load measured within 25 %."""
    P, prompt, patches, examples, target, G, C, micro = printed_shapes(quick)
    table = printed_table(quick)
    V, H, kv, vit = 151_936, 64, 32, 32
    per_token, per_patch = 2 * 1 + 34, 2 * 1 + 34  # checkpointing: each layer's input, one layer recomputed
    states = 20 * P
    sft_update = 4 * (prompt + target) * H * per_token + 4 * patches * vit * per_patch  # 4 images
    sft_update += 3 * 4 * target * V * 4 + V * H * 4  # the logits of 4 targets (under a chunk), tied root
    rl_update = 4 * (prompt + C) * H * per_token + 1 * patches * vit * per_patch  # 1 image: shared
    rl_update += 3 * 4 * C * V * 4 + V * H * 4
    expected = {
        "load": 8 * P,
        "SFT encode": states,
        "SFT update": states + sft_update,
        "SFT optimizer": states + 2 * V * H * 4,  # AdamW's loop on CPU: sqrt(v) and its quotient, embedding
        "RL rollout": states + 2 * P + G * (prompt + C) * 2 * 1 * kv * 2,  # bf16 weights, K and V cache
        "RL reference": states + 3 * 4 * C * V * 4 + 4 * (prompt + C) * H * 34 + patches * vit * 34,
        "RL update": states + rl_update,
        "RL stats": states,
    }
    assert (examples, G, C, micro) == (4, 4, 8, 4)
    for part, value in expected.items():
        assert table[part]["predicted"] == pytest.approx(value, abs=0.6e6), part  # printed in GB to 3 places
    assert table["load"]["ratio"] == pytest.approx(1, abs=0.25), table["load"]


@pytest.mark.parametrize("world", [1, 4])
def test_the_real_runs_predictions_by_hand(world):
    """What the GPU run will print beside its measurements, for Qwen2-VL-2B (28 layers, 32 vision blocks) at
    the README's prompt (662 tokens, 2,048 patches), G = 4, 256 tokens, 4 SFT examples per rank: one GPU, or
    FSDP2 over 4 (the states sharded, the gathered bf16 policy of the rollout whole)."""
    P, V, H, kv, vit = 2_208_985_600, 151_936, 1536, 2 * 128, 1280
    args = types.SimpleNamespace(micro_batch=4, sft_batch=4 * world, num_generations=4, max_new_tokens=256)
    out = gpu.predict(memory.QWEN2_VL_2B, P, (662, 2048, 256), args, world, torch.device("cuda"))
    states = 20 * P / world  # fp32 weights, gradients, AdamW's 2 moments, the reference
    seq, logits, root = 662 + 256, 3 * 512 * V * 4, V * H * 4  # a chunk of 512 of the 4 x 256 tokens; tied
    sft_update = 4 * seq * H * (2 * 28 + 34) + 4 * 2048 * vit * (2 * 32 + 34) + logits + root  # 4 images
    rl_update = 4 * seq * H * (2 * 28 + 34) + 1 * 2048 * vit * (2 * 32 + 34) + logits + root  # 1: shared
    expected = {
        "load": 8 * P / world + (V * H * 4 if world > 1 else 0),  # torchrun: rank 0 broadcasts the embedding
        "SFT encode": states,
        "SFT update": states + sft_update,
        "SFT optimizer": states + 4 * P / world,  # CUDA's multi-tensor AdamW: sqrt(v) of all the rank's
        "RL rollout": states + 2 * P + 4 * seq * 2 * 28 * kv * 2,  # the policy gathered in bf16, K and V
        "RL reference": states + logits + 4 * seq * H * 34 + 2048 * vit * 34,
        "RL update": states + rl_update,
    }
    for part, value in expected.items():
        assert out[part] == pytest.approx(value, rel=1e-12), part
    assert out["RL step"] == max(out[f"RL {part}"] for part in gpu.RL_PARTS)
    assert (
        round(out["RL step"] / 1e9, 1) == {1: 53.0, 4: 15.6}[world]
    )  # 1 GPU: the optimizer step; 4: the rollout


def test_a_missing_feature_ends_the_run_in_one_line():
    """As on a machine whose transformers predates what grpo_vl.py calls: exit 2, one line naming it and the
    versions, before any model is built."""
    before = "import transformers; del transformers.PreTrainedModel.activation_checkpointing_enable"
    status, out, err = script("--quick", before=before)
    assert status == 2, out + err
    assert len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(
        r"gpu.py: error: transformers models have no activation_checkpointing_enable \(grpo_vl.load_models "
        r"calls it\) \(torch \S+, transformers \S+\)\n",
        err,
    ), err
    assert "wrote" not in out


@pytest.mark.parametrize("size", [(896, 448), (1000, 700), (30, 20), (3000, 2000)])
@pytest.mark.parametrize("max_pixels", [401408, 6272])
def test_the_stand_in_resizes_as_qwen_vl_utils(size, max_pixels):
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ele = {"image": image, "min_pixels": 3136, "max_pixels": max_pixels}
    ours, theirs = gpu.fetch_image(dict(ele), 14), qwen_vl_utils.fetch_image(dict(ele), image_patch_size=14)
    assert ours.size == theirs.size and ours.size[0] % 28 == 0 and ours.size[1] % 28 == 0
    assert 3136 <= ours.size[0] * ours.size[1] <= max(max_pixels, 3136)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))

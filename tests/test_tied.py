"""Tied embeddings (issue 20): Qwen2-VL-2B's lm_head is its embed_tokens (tie_word_embeddings). The tiny
model built tied (tests/tiny.py's 'tiny-tied') trains in tests/learning.py's run: 2 FSDP ranks against 1
process, a resume after a kill on 2 ranks, and the saved folder loads in transformers, still tied. Every run
goes through tests/tied_check.py, which checks after loading and after every optimizer step, on every rank,
that lm_head's weight is embed_tokens' weight: one parameter, under FSDP2 one sharded DTensor."""

import os

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import learning
import tiny

TIED = ["--model", tiny.model_dir("tiny-tied")]  # after LEARNS' own --model: this one counts
ONE = [*learning.ONE, "tests/tied_check.py"]  # then LEARNS' grpo_vl.py and flags: its main(), checked
TWO = [*learning.TWO, "tests/tied_check.py"]


def load(folder):
    return tf.AutoModelForImageTextToText.from_pretrained(folder)


def embeddings(model):
    return model.model.language_model.embed_tokens.weight


@pytest.fixture(scope="module")
def tied_one(tmp_path_factory):
    """Output folder of learning.py's run of the tied model, 1 process."""
    return learning.run(ONE, str(tmp_path_factory.mktemp("tied_one")), *TIED)


@pytest.fixture(scope="module")
def tied_two(tmp_path_factory):
    """The same run on 2 FSDP ranks (torchrun)."""
    return learning.run(TWO, str(tmp_path_factory.mktemp("tied_two")), *TIED)


def test_tied_two_ranks_match_one_process(tied_one, tied_two):
    """Tied, 2 FSDP ranks equal 1 process step by step and in the end, within the tolerance of the untied
    comparison (test_train.py); every weight moved from the start, and every RL step had a gradient."""
    one, two = learning.metrics(tied_one), learning.metrics(tied_two)
    assert [(m["phase"], m["step"]) for m in one] == [(m["phase"], m["step"]) for m in two] == learning.PHASES
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-9), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    assert min(m["grad_norm"] for m in one if m["phase"] == "rl") > 0  # RL trained too
    w1, w2 = (load(os.path.join(out, "checkpoint")).state_dict() for out in (tied_one, tied_two))
    start = load(tiny.model_dir("tiny-tied")).state_dict()
    assert w1.keys() == w2.keys() == start.keys()
    for k in start:
        assert not torch.equal(w1[k], start[k]), f"{k} did not move"
        assert torch.allclose(w1[k], w2[k], atol=1e-4), (k, (w1[k] - w2[k]).abs().max())


def test_tied_checkpoint_loads_in_transformers_still_tied(tied_one, tied_two):
    """OUT/checkpoint of either run loads with from_pretrained as a tied model whose embeddings trained, and
    its file holds them once: no lm_head beside embed_tokens (a copy, 467 MB for the 2B in bf16)."""
    start = embeddings(load(tiny.model_dir("tiny-tied")))
    for out in (tied_one, tied_two):
        folder = os.path.join(out, "checkpoint")
        model = load(folder)
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight is embeddings(model), out
        assert not torch.equal(embeddings(model), start), out  # trained
        saved = load_file(os.path.join(folder, "model.safetensors"))
        assert "lm_head.weight" not in saved, out
        assert torch.equal(saved["model.embed_tokens.weight"], embeddings(model)), out  # the hub's key name


def test_tied_resume_after_a_kill_on_two_ranks(tied_two, tmp_path):
    """Tied, on 2 FSDP ranks: killed (SIGKILL, every process) after RL step 2 of 5 and resumed (the tie
    checked after the resume too), the run ends within float tolerance of the uninterrupted one, as the
    untied run does (test_reliability.py), and the steps run after the resume moved the weights by more."""
    out = str(tmp_path / "killed")
    learning.kill_when(TWO, out, 4 + 2, *TIED)  # 4 SFT lines, then RL steps 1 and 2
    resumed_from = os.path.basename(os.path.realpath(os.path.join(out, "checkpoint")))
    assert resumed_from.startswith("rl-"), resumed_from
    since = learning.weights(out)
    learning.run(TWO, out, "--resume", *TIED)
    diff = learning.max_diff(learning.weights(tied_two), learning.weights(out))
    assert diff < 1e-6, f"resumed from {resumed_from}: max |diff| {diff:.3g} from the uninterrupted run"
    assert [(m["phase"], m["step"]) for m in learning.metrics(out)] == learning.PHASES
    learning.assert_learned(out, since, tol=1e-6)

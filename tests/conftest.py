import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

import data  # noqa: E402
import grpo_vl  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """(model, processor, eos ids, banned ids) of the tiny random Qwen2-VL, as --model tiny loads it."""
    model, processor, eos, banned = grpo_vl.load_model(grpo_vl.parse_args(["--model", "tiny"]))
    return model.eval(), processor, eos, banned


@pytest.fixture(scope="session")
def examples():
    return data.load_examples("synthetic:16", "train", seed=0)

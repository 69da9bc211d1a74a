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


@pytest.fixture(scope="session")
def learned_one(tmp_path_factory):
    """Output folder of tests/learning.py's run (4 SFT steps, 5 GRPO steps that really train), 1 process."""
    import learning

    return learning.run(learning.ONE, str(tmp_path_factory.mktemp("learned_one")))


@pytest.fixture(scope="session")
def learned_two(tmp_path_factory):
    """The same run on 2 FSDP ranks (torchrun)."""
    import learning

    return learning.run(learning.TWO, str(tmp_path_factory.mktemp("learned_two")))

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
torch.set_num_threads(2)

import data  # noqa: E402
import grpo_vl  # noqa: E402
import tiny as tiny_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """(model, processor, eos ids, banned ids) of the tiny random Qwen2-VL, as grpo_vl.py loads its folder."""
    run = tiny_run()
    return run.model.eval(), run.processor, run.eos, run.banned


def tiny_run(*flags):
    """grpo_vl.load_models of the tiny model (beta 0: no reference) in one CPU process: the run namespace."""
    args = grpo_vl.parse_args(tiny_fixtures.flags() + ["--beta", "0", *flags])
    return grpo_vl.load_models(args, 0, 1, torch.device("cpu"), None)


@pytest.fixture(scope="session")
def examples():
    return data.load_examples(tiny_fixtures.data_file(16), "train", seed=0)


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

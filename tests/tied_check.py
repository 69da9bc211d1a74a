"""grpo_vl.py with a check that a tied lm_head stays tied: run by test_tied.py, alone or under torchrun, as

    python tests/tied_check.py grpo_vl.py FLAGS   # grpo_vl.py's main(FLAGS), checked

Right after load_models and after every optimizer step (SFT's and GRPO's), on every rank: lm_head's weight
is embed_tokens' weight, one parameter (under FSDP2 one sharded DTensor), and the optimizer holds it once. A
tie broken by loading, sharding, a step or a resume would let the two drift apart; their values are compared
by test_tied.py's comparisons of whole runs. The run fails (exit 1) if no step was checked.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # as a torchrun script, without conftest.py
import grpo_vl as g  # noqa: E402

models = []  # the policy of the run, as load_models returned it
checked_steps = [0]


def assert_tied(model, where):
    embed = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight is embed, f"{where}: lm_head.weight is not embed_tokens.weight"


def load_models(*args, **kwargs):
    run = load_models_unchecked(*args, **kwargs)
    assert_tied(run.model, "after load_models")
    models.append(run.model)
    return run


def clip_and_step(opt):
    grad_norm = clip_and_step_unchecked(opt)
    model = models[-1]
    assert_tied(model, f"after optimizer step {checked_steps[0] + 1}")
    params = [p for group in opt.param_groups for p in group["params"]]
    embed = model.model.language_model.embed_tokens.weight
    assert sum(p is embed for p in params) == 1, "the optimizer does not hold the tied weight exactly once"
    checked_steps[0] += 1
    return grad_norm


load_models_unchecked = g.load_models
clip_and_step_unchecked = g.clip_and_step
g.load_models = load_models  # main() calls them by their module names: it calls the checked ones
g.clip_and_step = clip_and_step
assert sys.argv[1] == "grpo_vl.py", "usage: python tests/tied_check.py grpo_vl.py FLAGS"
g.main(sys.argv[2:])
assert checked_steps[0] > 0, "no optimizer step was checked"
print(f"rank {os.environ.get('RANK', 0)}: lm_head tied to embed_tokens after {checked_steps[0]} steps")

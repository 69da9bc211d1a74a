"""Each GRPO equation (G2-G9, README.md's "GRPO in one screen") pinned to numbers computed by hand."""

import math

import torch

import grpo_vl
from grpo_vl import completion_mask, group_advantages, grpo_loss

BETA = 0.04  # the eps of G5 is the constant grpo_vl.EPS, 0.2, which the numbers below assume


def test_g5_eps_is_the_papers_value():
    assert grpo_vl.EPS == 0.2


def test_g2_group_advantage_by_hand():
    # group 1: rewards 0, 1, 1, 2 -> mean 1, unbiased std sqrt((1+0+0+1)/3) = 0.8165
    # group 2: all equal -> A = 0 exactly, counted in frac_zero_std
    r = torch.tensor([0.0, 1.0, 1.0, 2.0, 0.1, 0.1, 0.1, 0.1])
    A, frac_zero = group_advantages(r, G=4)
    s = math.sqrt(2 / 3)
    expected = [-1 / (s + 1e-4), 0.0, 0.0, 1 / (s + 1e-4), 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(A, torch.tensor(expected), atol=1e-6)
    assert (A[4:] == 0).all()  # exactly zero, not 1e-13
    assert frac_zero == 0.5


def test_g2_a_flat_group_is_exactly_zero_even_where_float_rounding_is_not():
    # six equal rewards of 0.3: their float32 mean is not exactly 0.3, so (r - mean) / (std + 1e-4) would be
    # about 3e-4 for every completion (a push that no reward asked for); the flat group is set to 0 instead
    r = torch.full((6,), 0.3)
    assert ((r - r.mean()) / (r.std() + 1e-4)).abs().max() > 1e-4  # what the formula alone gives
    A, frac_zero = group_advantages(r, G=6)
    assert torch.equal(A, torch.zeros(6)) and frac_zero == 1.0


def test_g2_groups_are_contiguous():
    # two groups of two: [1, 0] and [5, 7]; a .repeat layout would mix them
    A, _ = group_advantages(torch.tensor([1.0, 0.0, 5.0, 7.0]), G=2)
    s1, s2 = math.sqrt(0.5), math.sqrt(2.0)  # unbiased std of two values 1 and 2 apart
    expected = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -1 / (s2 + 1e-4), 1 / (s2 + 1e-4)]
    assert torch.allclose(A, torch.tensor(expected), atol=1e-6)


def test_g3_g4_g5_per_token_by_hand():
    # one completion, two tokens; A = 1.5 (positive) and a second sequence with A = -2
    logp = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.5), math.log(0.2)]])
    old = torch.tensor([[math.log(0.25), math.log(0.2)], [math.log(0.25), math.log(0.4)]])
    ref = torch.tensor([[math.log(0.4), math.log(0.1)], [math.log(0.4), math.log(0.1)]])
    A = torch.tensor([1.5, -2.0])
    loss, D, clipped = grpo_loss(logp, old, ref, A, torch.ones(2, 2), BETA, n_completions=2)
    # ratios: [[2, 1], [2, 0.5]]
    # seq 0: t0 min(2*1.5, 1.2*1.5)=1.8 ; t1 min(1.5, 1.5)=1.5
    # seq 1: t0 min(2*-2, 1.2*-2)=-4    ; t1 min(0.5*-2, 0.8*-2)=-1.6 (the pessimistic side)
    # k3: D = q - log q - 1 with q = ref/pi: t0 q = 0.8 -> 0.8 - ln 0.8 - 1 ; t1 q = 0.5 -> 0.5 - ln 0.5 - 1
    d0, d1 = 0.8 - math.log(0.8) - 1, 0.5 - math.log(0.5) - 1
    assert torch.allclose(D, torch.tensor([[d0, d1], [d0, d1]]), atol=1e-6)
    L = torch.tensor([[1.8 - 0.04 * d0, 1.5 - 0.04 * d1], [-4 - 0.04 * d0, -1.6 - 0.04 * d1]])
    # G6: -(1/2) sum_i (1/2) sum_t L_it
    assert math.isclose(loss.item(), -L.mean(1).sum().item() / 2, rel_tol=1e-6)
    # clipping changed L only where the clipped term won: seq 0 t0 (rho > 1+eps, A > 0) and seq 1 t1
    # (rho < 1-eps, A < 0); seq 1 t0 (rho = 2, A < 0) keeps the unclipped, more pessimistic -4
    assert clipped.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_g4_k3_is_zero_at_reference_and_positive_elsewhere():
    logp = torch.log(torch.tensor([[0.3, 0.9, 0.01]]))
    _, D, _ = grpo_loss(logp, logp, logp, torch.zeros(1), torch.ones(1, 3), BETA, 1)
    assert torch.equal(D, torch.zeros(1, 3))
    _, D, _ = grpo_loss(logp, logp, logp - 0.3, torch.zeros(1), torch.ones(1, 3), BETA, 1)
    assert (D > 0).all() and torch.allclose(D, torch.full((1, 3), math.exp(-0.3) + 0.3 - 1))


def test_g7_mu1_loss_is_beta_kl_but_gradient_is_not_zero():
    logp = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.4, 0.1]]))
    loss, D, _ = grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0]), torch.ones(1, 2), BETA, 1)
    # value: -(A*1 - beta*mean D) = -1 + 0.04*mean(D)
    assert math.isclose(loss.item(), -1 + 0.04 * D.mean().item(), rel_tol=1e-6)
    loss.backward()
    # d/dlogp of -(rho*A)/2 = -A/2 per token at rho = 1, plus the KL term's 0.04*(1 - ref/pi)/2
    q = torch.tensor([0.8, 0.5])
    assert torch.allclose(logp.grad[0], -0.5 + 0.02 * (1 - q), atol=1e-6)


def test_g6_sequence_mean_weights_short_answers_more():
    # beta = 0 and rho = 1, so L_it = A_i: A = 1 over 4 tokens, A = 4 over 1 token (3 padded, inf there)
    logp = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, float("inf"), float("inf"), float("inf")]])
    A = torch.tensor([1.0, 4.0])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    loss, _, _ = grpo_loss(logp, logp, None, A, mask, 0.0, n_completions=2)
    assert loss.item() == -(1.0 + 4.0) / 2  # -((4/4) + (4/1)) / 2 completions: padding (even inf) ignored


def test_g9_mask_up_to_and_including_first_eos():
    eos = [9, 7]
    comp = torch.tensor([[1, 2, 9, 9, 9], [1, 7, 3, 9, 9], [1, 2, 3, 4, 5], [9, 9, 9, 9, 9]])
    mask, truncated = completion_mask(comp, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, False, True, False]

"""N(d; p), the ESD target, Eq. 13 and Eqs. 11-12 against hand computations on 2-vectors.

Tensors are 1x2x1x1 (or 2x2x1x1): two channels, so every projection is plane geometry.
"""

from __future__ import annotations

import math

import pytest
import torch

from recare.train.guidance import (
    esd_target, mse, normalized_direction, recare_erase_target, recare_loss, split_parallel,
)


def v(*xs):
    """A (1, len(xs), 1, 1) float32 tensor."""
    return torch.tensor(xs, dtype=torch.float32).view(1, -1, 1, 1)


def flat(t):
    return t.flatten().tolist()


def test_split_along_an_axis():
    d_par, d_orth = split_parallel(v(3, 4), v(1, 0))
    assert flat(d_par) == [3, 0] and flat(d_orth) == [0, 4]
    assert d_par.dtype == torch.float64 and d_orth.dtype == torch.float64


def test_split_along_the_diagonal():
    d_par, d_orth = split_parallel(v(3, 4), v(1, 1))
    # <d, p_hat> = 7 / sqrt 2, so d_par = 3.5 (1, 1), d_orth = (-0.5, 0.5)
    assert flat(d_par) == pytest.approx([3.5, 3.5], abs=1e-12)
    assert flat(d_orth) == pytest.approx([-0.5, 0.5], abs=1e-12)
    # the norm of p does not matter, only its direction
    d_par2, _ = split_parallel(v(3, 4), v(10, 10))
    assert torch.allclose(d_par, d_par2, atol=1e-12)


def test_split_sums_over_c_h_w_per_batch_element():
    d = torch.tensor([[3.0, 4.0], [3.0, 4.0]]).view(2, 2, 1, 1)
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1)
    d_par, d_orth = split_parallel(d, p)
    assert d_par.view(2, 2).tolist() == [[3, 0], [0, 4]]
    assert d_orth.view(2, 2).tolist() == [[0, 4], [3, 0]]
    # spatial positions are part of the same vector: a 1x1x1x2 split equals the 1x2x1x1 split
    d_par_hw, _ = split_parallel(torch.tensor([3.0, 4.0]).view(1, 1, 1, 2), torch.tensor([1.0, 1.0]).view(1, 1, 1, 2))
    assert d_par_hw.flatten().tolist() == pytest.approx([3.5, 3.5], abs=1e-12)


def test_zero_p_has_no_parallel_part():
    d_par, d_orth = split_parallel(v(3, 4), v(0, 0))
    assert flat(d_par) == [0, 0] and flat(d_orth) == [3, 4]


def test_normalized_direction_weights_only_the_parallel_part():
    assert flat(normalized_direction(v(3, 4), v(1, 0), weight=0.5)) == [1.5, 4]
    assert flat(normalized_direction(v(3, 4), v(1, 1), weight=0.0)) == pytest.approx([-0.5, 0.5], abs=1e-12)
    assert flat(normalized_direction(v(3, 4), v(1, 1), weight=2.0)) == pytest.approx([6.5, 7.5], abs=1e-12)
    # w = 1: N(d; p) = d
    d, p = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    assert torch.allclose(normalized_direction(d, p, 1.0), d.double(), atol=1e-12)


def test_esd_target_by_hand():
    eps_c, eps_0 = v(2, 0), v(1, -1)
    # d = (1, 1), p_hat = (1, 0): d_par = (1, 0), d_orth = (0, 1); N(w=0.5) = (0.5, 1)
    assert flat(esd_target(eps_c, eps_0, eta=2.0, weight=0.5)) == [1.5, -1.0]
    assert flat(esd_target(eps_c, eps_0, eta=3.0, weight=0.5)) == [1.0, -2.0]
    # w = 1, eta = 2: the target is the empty prompt's prediction
    assert flat(esd_target(eps_c, eps_0, eta=2.0, weight=1.0)) == pytest.approx([1.0, -1.0])
    # w = 1, any eta: plain guidance eps_c - (eta - 1)(eps_c - eps_0)
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(esd_target(a, b, eta=1.5), (a - 0.5 * (a - b)).double(), atol=1e-6)
    assert esd_target(a, b).dtype == torch.float64


def test_eq13_by_hand():
    eps_0 = v(1, 0)
    anchor = v(1, 2)      # d = (0, 2); d_par = 0.8 (1, 2) = (0.8, 1.6); d_orth = (-0.8, 0.4); N(w=.5) = (-0.4, 1.2)
    h1 = v(3, 0)          # d = (2, 0) along p: N(w=.5) = (1, 0)
    h2 = v(1, -1)         # d = (0, -1); d_par = (0.5, -0.5); d_orth = (-0.5, -0.5); N(w=.5) = (-0.25, -0.75)
    # mean over H = (0.375, -0.375); s = 2: eps_0 + 1 * (-0.4, 1.2) - 3 * (0.375, -0.375)
    target = recare_erase_target(eps_0, [anchor], [h1, h2], scale=2.0, weight=0.5)
    assert flat(target) == pytest.approx([-0.525, 2.325], abs=1e-12)
    # s = 3: eps_0 + 2 * (-0.4, 1.2) - 4 * (0.375, -0.375) = (-1.3, 3.9)
    assert flat(recare_erase_target(eps_0, [anchor], [h1, h2], scale=3.0, weight=0.5)) == pytest.approx([-1.3, 3.9])


def test_eq13_with_w1_is_plain_compositional_guidance():
    e0, a, h1, h2, h3 = (torch.randn(2, 4, 3, 3) for _ in range(5))
    s = 2.0
    plain = e0 + (s - 1) * (a - e0) + (-s - 1) * ((h1 - e0) + (h2 - e0) + (h3 - e0)) / 3
    got = recare_erase_target(e0, [a], [h1, h2, h3], scale=s, weight=1.0)
    assert got.dtype == torch.float64
    assert torch.allclose(got, plain.double(), atol=1e-5)
    with pytest.raises(ValueError):
        recare_erase_target(e0, [], [h1], s)


def test_loss_eq11_12_by_hand():
    pred_erase = v(1, 2).requires_grad_()
    pred_retain = v(0, 0).requires_grad_()
    erase_target = v(0, 0).double()          # MSE = (1 + 4) / 2 = 2.5
    retain_target = v(3, 1)                  # MSE = (9 + 1) / 2 = 5
    loss = recare_loss(pred_erase, erase_target, pred_retain, retain_target, retain_weight=0.5)
    assert loss.erase.item() == pytest.approx(2.5)
    assert loss.retain.item() == pytest.approx(5.0)
    assert loss.total.item() == pytest.approx(2.5 + 0.5 * 5.0)
    assert loss.total.dtype == torch.float32
    loss.total.backward()
    # d/dx mean((x - t)^2) = 2 (x - t) / n
    assert flat(pred_erase.grad) == pytest.approx([1.0, 2.0])
    assert flat(pred_retain.grad) == pytest.approx([0.5 * 2 * -3 / 2, 0.5 * 2 * -1 / 2])
    no_retain = recare_loss(pred_erase, erase_target, pred_retain, retain_target, retain_weight=0.0)
    assert no_retain.total.item() == pytest.approx(2.5) and no_retain.retain.item() == pytest.approx(5.0)


def test_mse_upcasts_half_and_never_differentiates_the_target():
    pred = v(1, 2).half()
    assert mse(pred, v(0, 0)).dtype == torch.float32
    target = v(0, 0).requires_grad_()
    p = v(1, 1).requires_grad_()
    mse(p, target).backward()
    assert target.grad is None and p.grad is not None
    assert math.isclose(mse(v(1, 1), v(1, 1)).item(), 0.0)


def test_original_esd_target_matches_the_original_formula():
    """The `esd` baseline's target is the original ESD's e_0 - eta_o (e_p - e_0) (train-esd.py), by hand."""
    from recare.config import TrainConfig, eta_from_negative_guidance

    e_p, e_0 = v(2, 0), v(1, -1)
    # eta_o = 1: e_0 - (e_p - e_0) = (1, -1) - (1, 1) = (0, -2)
    assert flat(esd_target(e_p, e_0, eta=eta_from_negative_guidance(1.0))) == pytest.approx([0.0, -2.0])
    # eta_o = 2: (1, -1) - 2 (1, 1) = (-1, -3); eta_o = 0.5: (0.5, -1.5)
    assert flat(esd_target(e_p, e_0, eta=eta_from_negative_guidance(2.0))) == pytest.approx([-1.0, -3.0])
    assert flat(esd_target(e_p, e_0, eta=eta_from_negative_guidance(0.5))) == pytest.approx([0.5, -1.5])
    # the preset: negative guidance 1, plain guidance (w = 1), the original's 1000 iterations at 1e-5, Adam
    esd = TrainConfig.for_method("esd").esd
    assert (esd.eta, esd.negative_guidance, esd.projection_weight) == (3.0, 1.0, 1.0)
    assert (esd.iterations, esd.learning_rate, esd.weight_decay) == (1000, 1e-5, 0.0)
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(esd_target(a, b, eta=esd.eta, weight=esd.projection_weight), (b - (a - b)).double(),
                          atol=1e-6)
    # stage 1's erase is not the baseline: eta 2 maps the concept onto the empty prompt, no push away
    assert TrainConfig.for_method("recare").stage1.esd.negative_guidance == 0.0


def test_adamw_without_weight_decay_is_the_original_esd_adam():
    """The `esd` preset's optimizer (AdamW, weight decay 0) takes exactly torch Adam's steps."""
    torch.manual_seed(0)
    start = torch.randn(5)
    grads = [torch.randn(5) for _ in range(4)]
    paths = []
    for make in (lambda p: torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0), lambda p: torch.optim.Adam([p], lr=1e-2)):
        p = torch.nn.Parameter(start.clone())
        opt = make(p)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        paths.append(p.detach().clone())
    assert torch.equal(paths[0], paths[1])
    assert not torch.equal(paths[0], start)

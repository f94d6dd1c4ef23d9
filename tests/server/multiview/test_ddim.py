"""DDIM schedule and update against the spec's numbers (§2.4), hand-written formulas and diffusers' scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from server.common.errors import BadInputError, CancelledError
from server.stages.multiview.ddim import ddim_sample, ddim_step, ddim_timesteps, scaled_linear_alphas_cumprod

SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return scaled_linear_alphas_cumprod(0.00085, 0.012, 1000)


def _randn(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------- schedule


def test_timesteps_75_steps_match_the_reference_log() -> None:
    ts = ddim_timesteps(75)
    assert len(ts) == 76  # "Running DDIM Sampling with 76 timesteps"
    assert ts[0] == 976 and ts[-1] == 1
    assert ts == list(range(976, 0, -13))  # stride 13


def test_timesteps_50_steps_match_the_reference_log() -> None:
    ts = ddim_timesteps(50)
    assert len(ts) == 49  # "Running DDIM Sampling with 49 timesteps"
    assert ts[0] == 961 and ts[-1] == 1
    assert ts == list(range(961, 0, -20))  # stride 20


def test_timesteps_50_equal_diffusers_leading_minus_its_first_entry() -> None:
    scheduler = DDIMScheduler(num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(50)
    assert ddim_timesteps(50) == scheduler.timesteps.tolist()[1:]


@pytest.mark.parametrize("num_steps", [1, 0, 1001])
def test_timesteps_reject_unusable_step_counts(num_steps: int) -> None:
    with pytest.raises(BadInputError, match=f"num_steps={num_steps}"):
        ddim_timesteps(num_steps)


def test_alphas_cumprod_is_ldm_linear_schedule(alphas_cumprod: torch.Tensor) -> None:
    assert alphas_cumprod.shape == (1000,)
    assert alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-15)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    reference = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    np.testing.assert_allclose(alphas_cumprod.numpy(), reference.numpy(), rtol=1e-5)


# -------------------------------------------------------------------------------------------------------------- step


def _hand_step(x, e, a, ap, eta, n=None):
    """DDIM eq. 12 written out in float64 numpy."""
    sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    out = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * e
    return out if n is None else out + sigma * n


def test_step_eta0_matches_hand_formula(alphas_cumprod: torch.Tensor) -> None:
    x, e = _randn(0), _randn(1)
    got = ddim_step(x, e, 976, 963, alphas_cumprod, eta=0.0)
    want = _hand_step(x.numpy(), e.numpy(), alphas_cumprod[976].item(), alphas_cumprod[963].item(), 0.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_step_eta1_with_fixed_noise_matches_hand_formula(alphas_cumprod: torch.Tensor) -> None:
    x, e, n = _randn(0), _randn(1), _randn(2)
    got = ddim_step(x, e, 500, 487, alphas_cumprod, eta=1.0, noise=n)
    a, ap = alphas_cumprod[500].item(), alphas_cumprod[487].item()
    want = _hand_step(x.numpy(), e.numpy(), a, ap, 1.0, n.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    # σ really enters: the same step without noise is different.
    assert not np.allclose(want, _hand_step(x.numpy(), e.numpy(), a, ap, 1.0))


@pytest.mark.parametrize(("t", "t_prev"), [(961, 941), (21, 1), (1, 0)])
def test_step_eta1_matches_diffusers_including_the_last_step(alphas_cumprod: torch.Tensor, t: int, t_prev: int) -> None:
    """diffusers' step (set_alpha_to_one=False, no clipping) is an independent implementation of the same update;
    at t = 1 its "previous timestep" is negative, so it uses ᾱ_0 — exactly the reference's last step."""
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler.set_timesteps(50)
    x, e, n = (v.float() for v in (_randn(3), _randn(4), _randn(5)))
    want = scheduler.step(e, t, x, eta=1.0, variance_noise=n).prev_sample
    got = ddim_step(x, e, t, t_prev, alphas_cumprod, eta=1.0, noise=n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_step_with_exact_eps_recovers_x0_when_alpha_prev_is_one() -> None:
    alphas = torch.tensor([1.0, 0.9, 0.5, 0.1], dtype=torch.float64)
    x0, e = _randn(6), _randn(7)
    x_t = math.sqrt(0.1) * x0 + math.sqrt(0.9) * e
    torch.testing.assert_close(ddim_step(x_t, e, 3, 0, alphas, eta=0.0), x0, rtol=0, atol=1e-12)


def test_step_noise_comes_from_the_generator(alphas_cumprod: torch.Tensor) -> None:
    x, e = _randn(0).float(), _randn(1).float()
    got = ddim_step(x, e, 500, 487, alphas_cumprod, eta=1.0, generator=torch.Generator().manual_seed(9))
    n = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, ddim_step(x, e, 500, 487, alphas_cumprod, eta=1.0, noise=n))


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_step_rejects_eta_outside_unit_interval(alphas_cumprod: torch.Tensor, eta: float) -> None:
    with pytest.raises(BadInputError, match="eta="):
        ddim_step(_randn(0), _randn(1), 500, 487, alphas_cumprod, eta=eta)


# -------------------------------------------------------------------------------------------------------------- loop


def test_loop_with_exact_eps_follows_the_deterministic_path(alphas_cumprod: torch.Tensor) -> None:
    """With η = 0 and the true ε of a single data point x0, every step keeps x on √ᾱ·x0 + √(1−ᾱ)·e, so the
    76-step loop ends at √ᾱ_0·x0 + √(1−ᾱ_0)·e (the reference stops at ᾱ_0, not at 1)."""
    x0, e = _randn(10), _randn(11)
    timesteps = ddim_timesteps(75)
    a_T = alphas_cumprod[timesteps[0]].item()
    x_T = math.sqrt(a_T) * x0 + math.sqrt(1 - a_T) * e

    def exact_eps(x: torch.Tensor, t: int) -> torch.Tensor:
        a = alphas_cumprod[t].item()
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    out = ddim_sample(exact_eps, x_T, timesteps, alphas_cumprod, eta=0.0)
    a0 = 1 - 0.00085
    torch.testing.assert_close(out, math.sqrt(a0) * x0 + math.sqrt(1 - a0) * e, rtol=0, atol=1e-10)


def test_loop_visits_timesteps_in_order_and_reports_each_step(alphas_cumprod: torch.Tensor) -> None:
    seen: list[int] = []
    calls: list[tuple[int, int]] = []

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(t)
        return torch.zeros_like(x)

    ddim_sample(
        eps_fn, _randn(0), ddim_timesteps(75), alphas_cumprod, 1.0, torch.Generator(), lambda i, n: calls.append((i, n))
    )
    assert seen == list(range(976, 0, -13))
    assert calls == [(i, 76) for i in range(1, 77)]


def test_loop_cancels_between_steps(alphas_cumprod: torch.Tensor) -> None:
    calls: list[tuple[int, int]] = []
    with pytest.raises(CancelledError, match="step 4 of 49"):
        ddim_sample(
            lambda x, t: torch.zeros_like(x),
            _randn(0),
            ddim_timesteps(50),
            alphas_cumprod,
            eta=0.0,
            callback=lambda step, total: calls.append((step, total)),
            should_cancel=lambda: len(calls) >= 3,
        )
    assert calls == [(1, 49), (2, 49), (3, 49)]


@pytest.mark.parametrize("shape", [SHAPE, (3, 4, 5, 7)])  # 420 values per draw: not a multiple of torch's 16
def test_loop_draws_the_noise_up_front_as_the_steps_would(alphas_cumprod: torch.Tensor, shape: tuple) -> None:
    """The loop's pre-drawn noise (one host-to-device copy per run) is number for number the noise each step would
    draw for itself from the same generator, so a seed gives the same latents as before."""
    timesteps = ddim_timesteps(10)
    x_T = _randn(3, shape).float()

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        return 0.1 * x + t / 1000.0

    got = ddim_sample(eps_fn, x_T, timesteps, alphas_cumprod, 1.0, torch.Generator().manual_seed(7))
    generator, x = torch.Generator().manual_seed(7), x_T
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        x = ddim_step(x, eps_fn(x, t), t, t_prev, alphas_cumprod, 1.0, generator)
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    assert not torch.equal(got, ddim_sample(eps_fn, x_T, timesteps, alphas_cumprod, 1.0,
                                            torch.Generator().manual_seed(8)))

"""DDIM sampling exactly as the LDM/Zero123 code runs it (spec §2.4).

Diffusers' ``DDIMScheduler`` cannot reproduce the reference schedules: for 75 steps its "leading" spacing gives 75
timesteps 1…963, whereas LDM's "uniform" discretisation gives 77 entries of which the sampler keeps 76 (976…1). The
schedule, one update step and the loop are therefore written out here as small pure functions.

Legend (Song et al., "Denoising Diffusion Implicit Models", eq. 12; the paper's α is the *cumulative* product):

==================  ======================================================================
code                paper
==================  ======================================================================
``x``               x_t, the current noisy latent
``eps``             ε_θ(x_t, t), the model's noise prediction (after classifier-free guidance)
``alpha_bar``       α_t  = ∏_{s≤t} (1 − β_s), i.e. ``alphas_cumprod[t]``
``alpha_bar_prev``  α_{t−1}, taken at the *previous DDIM timestep*, ``alphas_cumprod[t_prev]``
``sigma``           σ_t(η) = η·sqrt((1 − α_{t−1})/(1 − α_t))·sqrt(1 − α_t/α_{t−1})
``x0``              the "predicted x_0" term
``dir_xt``          the "direction pointing to x_t" term, sqrt(1 − α_{t−1} − σ_t²)·ε
``noise``           ε_t ~ N(0, I), the fresh noise of the "random noise" term
==================  ======================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from server.common.errors import BadInputError, CancelledError


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The DDIM timesteps the reference sampler visits, in sampling (descending) order.

    LDM's "uniform" discretisation takes c = T // S and the timesteps ``range(0, T, c) + 1`` (not truncated to S
    entries); the sampler then drops the largest entry (``timesteps[:-1]``) and walks the rest from high to low.
    S = 75 gives 76 steps 976, 963, …, 1 (stride 13); S = 50 gives 49 steps 961, 941, …, 1 (stride 20).

    Args:
        num_steps: S, the "DDIM steps" setting of the reference (75 for stage 1, 50 for stage 2).
        num_train_timesteps: T, the length of the training noise schedule.

    Returns:
        The integer timesteps, largest first. Their count may differ from ``num_steps`` (76 for 75, 49 for 50).

    Raises:
        BadInputError: if ``num_steps`` is outside 2…T (1 step would leave nothing after the drop).
    """
    if not 2 <= num_steps <= num_train_timesteps:
        raise BadInputError(f"num_steps={num_steps} is not allowed: use an integer from 2 to {num_train_timesteps}.")
    stride = num_train_timesteps // num_steps
    uniform = [t + 1 for t in range(0, num_train_timesteps, stride)]
    return uniform[:-1][::-1]


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """ᾱ_t of LDM's "linear" schedule (linear in sqrt(β), diffusers' ``scaled_linear``).

    Args:
        beta_start: β_0 (``linear_start``).
        beta_end: β_{T−1} (``linear_end``).
        num_train_timesteps: T.

    Returns:
        alphas_cumprod: [T] float64, ᾱ_t = ∏_{s≤t} (1 − β_s); computed in float64 as LDM does before storing it.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_sigma(alpha_bar: float, alpha_bar_prev: float, eta: float) -> float:
    """σ_t(η) of DDIM eq. 16 for one step (0 when η = 0)."""
    return eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: torch.Tensor,
    eta: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update x_t → x_{t_prev} (eq. 12), without clipping or thresholding of x_0.

    For the last step pass ``t_prev = 0``: the reference then uses ᾱ_prev = ``alphas_cumprod[0]`` (= 1 − β_0, not 1;
    diffusers' ``set_alpha_to_one=False``).

    Args:
        x: [B, C, H, W] x_t.
        eps: [B, C, H, W] ε prediction for x at t.
        t: current timestep (index into ``alphas_cumprod``).
        t_prev: the next (smaller) DDIM timestep, 0 for the last step.
        alphas_cumprod: [T] ᾱ.
        eta: η in [0, 1]; 0 is deterministic DDIM, 1 (the reference's setting) has DDPM-like variance.
        generator: source of the fresh noise when ``noise`` is not given. Noise is drawn on the generator's device
            in float32 and moved to x's device; None draws from torch's global RNG, as the reference does.
        noise: [B, C, H, W] fixed N(0, I) sample to use instead of drawing one.

    Returns:
        [B, C, H, W] x_{t_prev}, same dtype and device as x.

    Raises:
        BadInputError: if η is outside [0, 1] (the "direction" coefficient would be imaginary for large η).
    """
    if not 0.0 <= eta <= 1.0:
        raise BadInputError(f"eta={eta} is not allowed: DDIM's η must lie in [0, 1] (the reference uses 1).")
    alpha_bar = float(alphas_cumprod[t])
    alpha_bar_prev = float(alphas_cumprod[t_prev])
    sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)

    x0 = (x - math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha_bar)  # "predicted x_0"
    dir_xt = math.sqrt(1.0 - alpha_bar_prev - sigma**2) * eps  # "direction pointing to x_t"
    x_prev = math.sqrt(alpha_bar_prev) * x0 + dir_xt
    if sigma > 0.0:  # "random noise"
        if noise is None:
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        x_prev = x_prev + sigma * noise.to(device=x.device, dtype=x.dtype)
    return x_prev


def ddim_sample(
    eps_fn: Callable[[torch.Tensor, int], torch.Tensor],
    x_T: torch.Tensor,
    timesteps: list[int],
    alphas_cumprod: torch.Tensor,
    eta: float,
    generator: torch.Generator | None = None,
    callback: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run the DDIM loop over ``timesteps`` (descending), starting from x_T as-is.

    The reference starts from plain N(0, I) even though the first timestep (e.g. 976) is not fully noisy; so do we.

    Args:
        eps_fn: ``eps_fn(x, t) -> eps``, [B, C, H, W] → [B, C, H, W] (classifier-free guidance already applied).
        x_T: [B, C, H, W] starting latent.
        timesteps: from :func:`ddim_timesteps`, largest first.
        alphas_cumprod: [T] ᾱ.
        eta: η.
        generator: noise source for η > 0 (see :func:`ddim_step`). When given, every step's noise is drawn from it
            before the loop, in the order the steps would draw it (so the numbers are the same), and copied to x's
            device in one transfer: the loop then never waits for the host (:func:`predraw_noise`).
        callback: called as ``callback(step, total)`` after each step, step = 1…total.
        should_cancel: polled before every step; when it returns True the loop stops.

    Returns:
        [B, C, H, W] the final latent x_0.

    Raises:
        CancelledError: if ``should_cancel()`` returned True.
    """
    total = len(timesteps)
    pairs = [(t, timesteps[i + 1] if i + 1 < total else 0) for i, t in enumerate(timesteps)]
    noise = predraw_noise(x_T, pairs, alphas_cumprod, eta, generator) if generator is not None else {}
    x = x_T
    for i, (t, t_prev) in enumerate(pairs):
        if should_cancel is not None and should_cancel():
            raise CancelledError(f"Multi-view generation cancelled before denoising step {i + 1} of {total}.")
        x = ddim_step(x, eps_fn(x, t), t, t_prev, alphas_cumprod, eta, generator, noise.get(i))
        if callback is not None:
            callback(i + 1, total)
    return x


def predraw_noise(
    x: torch.Tensor,
    pairs: list[tuple[int, int]],
    alphas_cumprod: torch.Tensor,
    eta: float,
    generator: torch.Generator,
) -> dict[int, torch.Tensor]:
    """The fresh noise of every DDIM step that draws one (σ > 0), drawn now from ``generator``, on x's device.

    The draws are the very ones :func:`ddim_step` would make step by step (same generator, same order, same shape,
    float32), so sampling gives the same latents; drawing them up front turns one synchronising host-to-device copy
    per step into one copy per run, from page-locked memory when the target is a GPU.

    Args:
        x: [B, C, H, W] a latent of the loop (its shape, device and dtype are used).
        pairs: (t, t_prev) of each step, in loop order.
        alphas_cumprod: [T] ᾱ.
        eta: η in [0, 1].
        generator: the noise source (any device).

    Returns:
        {step index: [B, C, H, W] float32 noise on x's device} for the steps with σ > 0.
    """
    steps = [i for i, (t, t_prev) in enumerate(pairs)
             if ddim_sigma(float(alphas_cumprod[t]), float(alphas_cumprod[t_prev]), eta) > 0.0]
    if not steps:
        return {}
    drawn = torch.stack([torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
                         for _ in steps])
    if drawn.device != x.device:
        if drawn.device.type == "cpu" and x.device.type == "cuda":
            drawn = drawn.pin_memory()
        drawn = drawn.to(device=x.device, non_blocking=True)
    return dict(zip(steps, drawn.unbind(0), strict=True))

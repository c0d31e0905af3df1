"""ODE samplers for the flow-matching model: Euler and Heun, with classifier-free guidance.

The model predicts the velocity ``v = eps - x`` of ``x_t = (1 - t) x + t eps``, so sampling
integrates ``dx/dt = v`` from ``t = 1`` (noise) down to ``t = 0`` (data) on a uniform grid.
Guidance ``v = v_u + s (v_c - v_u)`` is applied only for ``t`` inside ``guidance_interval``
(Kynkäänniemi et al. 2024: guidance at the highest noise levels hurts diversity, at the lowest it
does little); outside, the conditional velocity alone is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

SAMPLERS = ("euler", "heun")
VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def guided_velocity(fn: VelocityFn, x: Tensor, t: float, labels: Tensor, null_class: int, cfg_scale: float,
                    interval: Sequence[float]) -> Tensor:
    tt = torch.full((x.shape[0],), t, device=x.device)
    if cfg_scale == 1.0 or not interval[0] <= t <= interval[1]:
        return fn(x, tt, labels)
    null = torch.full_like(labels, null_class)
    v = fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
    v_c, v_u = v.chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


@torch.no_grad()
def sample(fn: VelocityFn, noise: Tensor, labels: Tensor, null_class: int, steps: int = 50, method: str = "euler",
           cfg_scale: float = 1.0, guidance_interval: Sequence[float] = (0.0, 1.0)) -> Tensor:
    """Integrate from ``noise`` (t = 1) to data (t = 0). Heun costs two evaluations per step
    (one on the last step, which lands on t = 0 where the second slope is not needed)."""
    if method not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got '{method}'.")
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}.")
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t  # negative
        v = guided_velocity(fn, x, t, labels, null_class, cfg_scale, guidance_interval)
        x_euler = x + dt * v
        if method == "heun" and t_next > 0:
            v2 = guided_velocity(fn, x_euler, t_next, labels, null_class, cfg_scale, guidance_interval)
            x = x + dt * 0.5 * (v + v2)
        else:
            x = x_euler
    return x

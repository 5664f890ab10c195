"""Flow-matching utilities shared by fmer.py, fino.py and flowq.py.

Conventions: x0 ~ N(0, I) is the source sample, x1 the data sample, t in [0, 1] has shape
(..., 1) so it broadcasts over the last (feature) dimension. A velocity field is any callable
`velocity(x, t) -> dx/dt` with the shape of x.

Contents
- linear (optimal-transport) interpolation and its conditional target velocity;
- explicit Euler sampling that can return the intermediate states and velocities (the Euler polyline);
- the divergence of a velocity field: exact (d vector-Jacobian products) and Hutchinson's
  estimator with Rademacher probes (FMER Eq. 16);
- the tanh divergence correction (FMER Prop. 3 / Eq. 14);
- the flow entropy (FMER Thm. 2) and the constant that turns a N(0, I) latent into the
  tanh-squashed base distribution (FMER Eqs. 17-18).
All identities are checked numerically in tests/test_flow.py.
"""

import math

import torch

GAUSSIAN_ENTROPY_PER_DIM = 0.5 * (1.0 + math.log(2.0 * math.pi))
"""Entropy of N(0, 1) in nats: H(p_0) = d * this for a d-dimensional standard Gaussian."""

TANH_LOG_JACOBIAN_MEAN = -0.7491344149828754
"""E_{z ~ N(0,1)}[log(1 - tanh(z)^2)], by 200-node Gauss-Hermite quadrature (tested)."""

TANH_GAUSSIAN_ENTROPY_PER_DIM = GAUSSIAN_ENTROPY_PER_DIM + TANH_LOG_JACOBIAN_MEAN
"""Entropy of tanh(z), z ~ N(0, 1): 0.66980 nats per action dimension (FMER Eq. 18's H(p_0^a) / d)."""


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear (optimal-transport) path x_t = (1 - t) x0 + t x1 (FMER Sec. 3, sigma_min = 0)."""
    return (1.0 - t) * x0 + t * x1


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Conditional velocity of the linear path, d x_t / dt = x1 - x0 (FMER Eq. 2)."""
    return x1 - x0


def euler_sample(velocity, x0: torch.Tensor, steps: int, return_path: bool = False):
    """Integrate dx/dt = velocity(x, t) from t = 0 to 1 with `steps` explicit Euler steps (FMER Eq. 8).

    Returns x_1, and with `return_path` also the states x_{t_k} at t_k = k / steps for k = 0..steps-1 and the
    velocities u_k = velocity(x_{t_k}, t_k) evaluated there, each stacked on a new leading dimension: the Euler
    polyline is x_t = x_{t_k} + (t - t_k) u_k for t in [t_k, t_{k+1}].
    """
    dt = 1.0 / steps
    x = x0
    path, velocities = [], []
    for k in range(steps):
        t = torch.full_like(x[..., :1], k * dt)
        u = velocity(x, t)
        if return_path:
            path.append(x)
            velocities.append(u)
        x = x + dt * u
    if return_path:
        return x, torch.stack(path), torch.stack(velocities)
    return x


def rademacher_like(x: torch.Tensor) -> torch.Tensor:
    """Independent +-1 entries, each with probability 1/2."""
    return torch.randint_like(x, 0, 2).mul_(2).sub_(1)


def hutchinson_divergence(velocity, x: torch.Tensor, probe: torch.Tensor | None = None):
    """u = velocity(x) and the unbiased estimate eps^T (du/dx) eps of div u = tr(du/dx) (FMER Eq. 16), one probe per row.

    Rows are independent samples, so one vector-Jacobian product serves the whole batch. The product is taken with
    torch.func.vjp: the estimate is differentiable w.r.t. the parameters inside `velocity` by one ordinary backward
    (a double backward through the network), and torch.compile can trace it, where it cannot trace
    torch.autograd.grad(create_graph=True). Returns (u, div), div of shape x.shape[:-1].
    """
    if probe is None:
        probe = rademacher_like(x)
    u, vjp_fn = torch.func.vjp(velocity, x)
    (vjp,) = vjp_fn(probe)
    return u, (vjp * probe).sum(-1)


def exact_divergence(velocity, x: torch.Tensor):
    """u = velocity(x) and the exact div u = sum_i du_i/dx_i by d vector-Jacobian products (variance-free; d small).
    Returns (u, div) as hutchinson_divergence does."""
    u, vjp_fn = torch.func.vjp(velocity, x)
    basis = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    div = torch.zeros_like(u[..., 0])
    for i in range(x.shape[-1]):
        (row,) = vjp_fn(basis[i].expand_as(u))
        div = div + row[..., i]
    return u, div


def tanh_divergence_correction(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Prop. 3 (Eq. 14): div_a v(a, t) = div_z u(z, t) + this, where a = tanh(z), v = (1 - a^2) * u.

    The term is -2 sum_i tanh(z_i) u_i(z, t) = d/dt sum_i log(1 - tanh(z_{t,i})^2) along the flow.
    """
    return -2.0 * (torch.tanh(z) * u).sum(-1)


def gaussian_entropy(dim: int) -> float:
    """H(p_0) of a standard Gaussian in `dim` dimensions (Thm. 2's base term)."""
    return dim * GAUSSIAN_ENTROPY_PER_DIM


def flow_entropy(dim: int, divergence_integral: torch.Tensor) -> torch.Tensor:
    """Thm. 2: H(p_1) = H(p_0) + int_0^1 E_{p_t}[div u_t] dt (the integral enters with a plus sign).

    `divergence_integral` is any estimate of the integral: a Riemann sum over Euler states, or the
    single-time estimator div u(z_t, t) with t ~ U[0, 1] (Eq. 13), which equals it in expectation.
    """
    return gaussian_entropy(dim) + divergence_integral


def tanh_flow_entropy(dim: int, corrected_divergence_integral: torch.Tensor) -> torch.Tensor:
    """Eqs. 17-18: entropy of a = tanh(z_1) from the integral of div u + the Prop. 3 correction.

    The base term is the entropy of tanh(z_0), z_0 ~ N(0, I): 0.6698 nats per dimension.
    """
    return dim * TANH_GAUSSIAN_ENTROPY_PER_DIM + corrected_divergence_integral

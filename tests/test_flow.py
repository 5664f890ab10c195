"""Numerical checks of the flow-matching identities in common/flow.py (FMER Thm. 2, Prop. 3, Eqs. 16-18)."""

import math

import numpy as np
import pytest
import torch

from common.flow import (
    TANH_GAUSSIAN_ENTROPY_PER_DIM,
    TANH_LOG_JACOBIAN_MEAN,
    euler_sample,
    exact_divergence,
    flow_entropy,
    gaussian_entropy,
    hutchinson_divergence,
    interpolate,
    rademacher_like,
    tanh_divergence_correction,
    tanh_flow_entropy,
    target_velocity,
)


@pytest.fixture(autouse=True)
def float64():
    """Seeded, in double precision; the default dtype is restored afterwards for other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def random_field(dim: int, seed: int):
    """A smooth nonlinear time-dependent velocity field u(z, t) (a small random tanh MLP)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(dim + 1, 16, generator=g), torch.randn(16, dim, generator=g) / 4
    return lambda z, t: torch.tanh(torch.cat([z, t], -1) @ w1) @ w2


def test_interpolation_and_target_velocity():
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.rand(5, 1)
    xt = interpolate(x0, x1, t)
    assert torch.allclose(interpolate(x0, x1, torch.zeros(5, 1)), x0)
    assert torch.allclose(interpolate(x0, x1, torch.ones(5, 1)), x1)
    h = 1e-6  # d x_t / dt by finite differences is the target velocity
    assert torch.allclose((interpolate(x0, x1, t + h) - xt) / h, target_velocity(x0, x1), atol=1e-6)


def test_euler_sample_returns_the_evaluated_states():
    x0, v = torch.randn(4, 3), torch.randn(4, 3)
    seen_t = []
    x1, path, velocities = euler_sample(
        lambda x, t: seen_t.append(t[0, 0].item()) or v * (1 + t), x0, steps=5, return_path=True
    )
    assert path.shape == velocities.shape == (5, 4, 3)
    for k in range(5):
        assert torch.allclose(velocities[k], v * (1 + k / 5))
        assert torch.allclose(path[k], x0 + sum(velocities[:k]) / 5)
    assert torch.allclose(x1, path[-1] + velocities[-1] / 5)
    assert seen_t == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])


def test_exact_divergence_is_the_jacobian_trace():
    field = random_field(4, seed=0)
    z, t = torch.randn(6, 4, requires_grad=True), torch.rand(6, 1)
    _, div = exact_divergence(lambda x: field(x, t), z)
    for row in range(6):
        jac = torch.autograd.functional.jacobian(lambda x: field(x[None], t[row : row + 1])[0], z[row].detach())
        assert div[row].item() == pytest.approx(torch.trace(jac).item(), abs=1e-10)


@pytest.mark.parametrize("num_probes", [400, 6400])
def test_hutchinson_is_unbiased(num_probes):
    """The mean of n one-probe estimates matches the exact trace within 4 standard errors (shrinks as 1/sqrt(n))."""
    torch.manual_seed(1)
    field = random_field(5, seed=1)
    z0, t0 = torch.randn(1, 5), torch.rand(1, 1)
    z = z0.expand(num_probes, 5).clone()
    velocity = lambda x: field(x, t0.expand(num_probes, 1))
    exact = exact_divergence(velocity, z)[1][0]
    _, estimates = hutchinson_divergence(velocity, z)
    stderr = estimates.std() / math.sqrt(num_probes)
    assert estimates.std() > 1e-3  # the probes really vary
    assert abs(estimates.mean() - exact) < 4 * stderr


def test_hutchinson_gradient_equals_the_double_backward():
    """The torch.func.vjp form gives the value and the parameter gradient of eps^T (du/dz) eps that
    torch.autograd.grad(create_graph=True) gives (what the entropy loss of Eq. 15 differentiates)."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    z, probe = torch.randn(10, 3), rademacher_like(torch.empty(10, 3))
    velocity = lambda x: net(torch.cat([x, x[:, :1] ** 2], -1))
    params = list(net.parameters())[:-1]  # the output bias does not enter a divergence
    _, div = hutchinson_divergence(velocity, z, probe)
    grads = torch.autograd.grad(div.sum(), params)
    z_leaf = z.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(velocity(z_leaf), z_leaf, grad_outputs=probe, create_graph=True)
    reference = (vjp * probe).sum(-1)
    assert torch.allclose(div, reference, atol=1e-12)
    for g, r in zip(grads, torch.autograd.grad(reference.sum(), params)):
        assert torch.allclose(g, r, atol=1e-12)


def test_rademacher_probes():
    eps = rademacher_like(torch.empty(100_000))
    assert set(eps.unique().tolist()) == {-1.0, 1.0}
    assert abs(eps.mean().item()) < 0.02


def test_prop3_tanh_divergence_correction_against_autograd():
    """div_a v(a, t) with v = (1 - a^2) u(atanh a, t) equals div_z u - 2 sum tanh(z) u (Prop. 3, Eq. 14)."""
    dim = 3
    field = random_field(dim, seed=2)
    z = 1.5 * torch.randn(8, dim)
    t = torch.rand(8, 1)
    u, div = exact_divergence(lambda x: field(x, t), z)
    predicted = div + tanh_divergence_correction(z, u)

    _, div_a = exact_divergence(lambda a: (1 - a**2) * field(torch.atanh(a), t), torch.tanh(z))
    assert torch.allclose(div_a, predicted, atol=1e-8)
    # the correction is not negligible here, so a wrong sign or factor would fail above
    assert tanh_divergence_correction(z, u).abs().min() > 1e-3


def affine_flow_samples(a0, a1, b, n, steps=400):
    z0 = torch.randn(n, a0.shape[0])
    field = lambda z, t: z @ a0.T + t * (z @ a1.T) + b
    z1, path, _ = euler_sample(field, z0, steps, return_path=True)
    return field, z1, path


def test_thm2_entropy_of_an_affine_flow():
    """H(p_1) = H(p_0) + int_0^1 E[div u] dt (Thm. 2), against the closed-form Gaussian entropy of p_1."""
    torch.manual_seed(3)
    dim = 2
    a0 = torch.tensor([[0.3, 0.8], [-0.4, 0.2]])
    a1 = torch.tensor([[0.2, -0.5], [0.6, 0.4]])
    b = torch.tensor([0.5, -1.0])
    # closed form: p_1 = N(m, M M^T) with dM/dt = A(t) M, M(0) = I (fine Euler on the Jacobian)
    m = torch.eye(dim)
    for k in range(20_000):
        m = m + (a0 + (k + 0.5) / 20_000 * a1) @ m / 20_000
    closed_form = gaussian_entropy(dim) + torch.logdet(m).item()
    assert closed_form - gaussian_entropy(dim) == pytest.approx(0.5 + 0.3, abs=1e-4)  # tr A0 + tr A1 / 2

    field, z1, path = affine_flow_samples(a0, a1, b, n=20_000)
    empirical = 0.5 * torch.logdet(2 * math.pi * math.e * torch.cov(z1.T)).item()
    assert empirical == pytest.approx(closed_form, abs=0.03)

    # integral form: a Riemann sum of the exact divergence along the Euler states
    steps = path.shape[0]
    z_path = path[:, :64].reshape(-1, dim)
    t_path = (torch.arange(steps) / steps).repeat_interleave(64)[:, None]
    div = exact_divergence(lambda z: field(z, t_path), z_path)[1].view(steps, 64).mean(1)
    assert flow_entropy(dim, div.mean()).item() == pytest.approx(closed_form, abs=2e-3)

    # single-time estimator (Eq. 13): t ~ U[0, 1], z_t from the flow, one Hutchinson probe; unbiased
    n = 20_000
    k = torch.randint(0, steps, (n,))
    z_t = path[k, torch.arange(n) % path.shape[1]]
    t = (k / steps)[:, None]
    single = flow_entropy(dim, hutchinson_divergence(lambda z: field(z, t), z_t)[1])
    assert single.mean().item() == pytest.approx(closed_form, abs=4 * single.std().item() / math.sqrt(n) + 2e-3)
    assert gaussian_entropy(dim) - div.mean().item() != pytest.approx(closed_form, abs=0.1)  # the sign matters


def test_eqs17_18_action_entropy_of_a_tanh_squashed_flow():
    """Entropy of a = tanh(z_1) from the corrected divergence integral (Eqs. 17-18), against change of variables."""
    torch.manual_seed(4)
    dim = 2
    a0 = torch.tensor([[-0.2, 0.5], [-0.3, 0.1]])
    a1 = torch.tensor([[0.1, 0.0], [0.2, -0.3]])
    b = torch.tensor([0.4, -0.2])
    field, z1, path = affine_flow_samples(a0, a1, b, n=40_000)
    h_z1 = 0.5 * torch.logdet(2 * math.pi * math.e * torch.cov(z1.T)).item()
    log_jac = torch.log1p(-(torch.tanh(z1) ** 2)).sum(-1)
    direct = h_z1 + log_jac.mean().item()  # H(tanh z) = H(z) + E[sum log(1 - tanh^2 z)]

    steps = path.shape[0]
    z_t = path.reshape(-1, dim)[::20]
    t = (torch.arange(steps) / steps).repeat_interleave(path.shape[1])[::20, None]
    u, div = exact_divergence(lambda z: field(z, t), z_t)
    corrected = div + tanh_divergence_correction(z_t, u)
    flow_formula = tanh_flow_entropy(dim, corrected.mean()).item()
    assert flow_formula == pytest.approx(direct, abs=0.03)
    # without the tanh correction the formula would miss by far more than the tolerance
    assert abs(flow_entropy(dim, div.mean()).item() - direct) > 0.3


def test_tanh_base_entropy_constant():
    """0.6698 nats per dim: the entropy of tanh(z), z ~ N(0, 1), by integrating its density over a directly."""
    a = np.linspace(-1, 1, 2_000_001)[1:-1]
    z = np.arctanh(a)
    density = np.exp(-(z**2) / 2) / np.sqrt(2 * np.pi) / (1 - a**2)
    integrand = np.where(density > 0, -density * np.log(np.maximum(density, 1e-300)), 0.0)
    entropy = np.trapezoid(integrand, a)
    assert TANH_GAUSSIAN_ENTROPY_PER_DIM == pytest.approx(entropy, abs=1e-4)
    samples = torch.randn(2_000_000)
    assert TANH_LOG_JACOBIAN_MEAN == pytest.approx(torch.log1p(-(torch.tanh(samples) ** 2)).mean().item(), abs=3e-3)
    assert tanh_flow_entropy(3, torch.tensor(0.0)).item() == pytest.approx(3 * entropy, abs=3e-4)

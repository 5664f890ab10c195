"""fino.py: the noise-injection theory (Thm. 2, Prop. 1, Eq. 7), the GMM entropy, the beta update, FQL's pieces,
and end-to-end offline-to-online runs on tiny OGBench- and Minari-format datasets (CPU)."""

import math
import os

import numpy as np
import pytest
import torch
import tyro

from common.flow import interpolate, target_velocity
from fino import (
    MLP,
    Args,
    ReplayBuffer,
    act,
    candidate_logits,
    check_args,
    draw_noise,
    fit_gmm,
    fql_losses,
    gmm_entropy_bound,
    make_critic,
    make_nets,
    noise_std,
    noisy_flow_pair,
    resolve_args,
    save_checkpoint,
    select_candidates,
    update_beta,
)
from tests.conftest import ROOT, assert_one_line_error, run_dirs, run_script, scalars
from tests.fixtures import FiveRows, write_d4rl_file, write_minari_dataset, write_ogbench_dataset

TINY_NETS = Args(hidden_dim=16, num_layers=2, num_critics=2)
TS = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
ETAS = [0.0, 0.05, 0.1, 0.5, 1.0]


# ---- noise-injected flow matching (Eq. 7, Thm. 2, Prop. 1) ----------------------------------------------------------
@pytest.mark.parametrize("eta", ETAS)
def test_prop1_noise_variance_is_a_proper_variance_with_its_endpoints(eta):
    alpha2 = noise_std(TS, eta) ** 2
    polynomial = (eta**2 - 2 * eta) * TS**2 + 2 * eta * TS  # alpha_t^2 of Eq. 7, unclamped
    assert torch.allclose(alpha2, polynomial, atol=1e-12)  # so the clamp in noise_std never acts on [0, 1]
    assert (polynomial >= 0).all()
    assert noise_std(torch.tensor(0.0, dtype=torch.float64), eta) == 0.0  # no noise at the source
    assert noise_std(torch.tensor(1.0, dtype=torch.float64), eta).item() == pytest.approx(
        eta, abs=1e-12
    )  # std eta at the data end


@pytest.mark.parametrize("eta", ETAS)
def test_conditional_path_is_the_sigma_min_eta_ot_path(eta):
    """Given x1, x_t + eps_t ~ N(t x1, ((1 - t)^2 + alpha_t^2) I) and (1 - t)^2 + alpha_t^2 = (1 - (1 - eta) t)^2."""
    assert torch.allclose((1 - TS) ** 2 + noise_std(TS, eta) ** 2, (1 - (1 - eta) * TS) ** 2, atol=1e-12)
    # by sampling, through the function the training loss uses
    torch.manual_seed(0)
    n, x1 = 400_000, torch.tensor([0.7, -0.3], dtype=torch.float64)
    for t in (0.2, 0.5, 0.9):
        tt = torch.full((n, 1), t, dtype=torch.float64)
        x0, noise = torch.randn(n, 2, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
        noisy, _ = noisy_flow_pair(x0, x1.expand(n, 2), tt, noise, "paper", eta, 0.1)
        assert torch.allclose(noisy.mean(0), t * x1, atol=0.01)
        assert torch.allclose(noisy.std(0), torch.full((2,), 1 - (1 - eta) * t, dtype=torch.float64), rtol=0.01)


def bimodal_skewed(n: int, generator: torch.Generator) -> torch.Tensor:
    """A non-Gaussian action distribution in [-1, 1]^2: 70 % near (0.8, 0.8), 30 % uniform on a bar at y = -0.9."""
    pick = torch.rand(n, 1, generator=generator, dtype=torch.float64) < 0.7
    mode = 0.8 + 0.05 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    bar = torch.stack(
        [2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1, torch.full((n,), -0.9, dtype=torch.float64)], 1
    )
    return torch.where(pick, mode, bar)


def test_thm2_marginal_variance_at_least_standard_fm_closed_form_and_sampled():
    """Var(X_t^FINO) >= Var(X_t^FM) for all t: closed form t^2 Var(x1) + sigma_t^2 per dimension, checked by sampling."""
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x1 = bimodal_skewed(n, g)
    var_x1 = x1.var(0)
    for eta in (0.1, 0.5):
        fm_closed = TS[:, None] ** 2 * var_x1 + (1 - TS[:, None]) ** 2
        fino_closed = TS[:, None] ** 2 * var_x1 + (1 - (1 - eta) * TS[:, None]) ** 2
        assert (fino_closed >= fm_closed - 1e-12).all()
        assert (fino_closed[1:] > fm_closed[1:]).all()  # strictly larger for t > 0 when eta > 0
        for t in (0.25, 0.5, 0.75, 1.0):
            tt = torch.full((n, 1), t, dtype=torch.float64)
            x0, noise = (
                torch.randn(n, 2, generator=g, dtype=torch.float64),
                torch.randn(n, 2, generator=g, dtype=torch.float64),
            )
            fino_var = noisy_flow_pair(x0, x1, tt, noise, "paper", eta, 0.1)[0].var(0)
            fm_var = interpolate(x0, x1, tt).var(0)
            expected_gap = (1 - (1 - eta) * t) ** 2 - (1 - t) ** 2
            assert torch.allclose(fino_var, t**2 * var_x1 + (1 - (1 - eta) * t) ** 2, rtol=0.01)
            assert ((fino_var - fm_var) > 0.5 * expected_gap).all()  # the gap is there, well beyond sampling noise


def test_eta_zero_is_standard_flow_matching_exactly():
    torch.manual_seed(0)
    x0, x1, noise, t = torch.randn(64, 3), torch.rand(64, 3) * 2 - 1, torch.randn(64, 3), torch.rand(64, 1)
    for schedule, scale in (("paper", 0.1), ("code", 0.1)):
        noisy, target = noisy_flow_pair(x0, x1, t, noise, schedule, 0.0, scale)
        assert torch.equal(noisy, interpolate(x0, x1, t))
        assert torch.equal(target, target_velocity(x0, x1))
    noisy, target = noisy_flow_pair(x0, x1, t, noise, "paper", 0.1, 0.1)
    assert not torch.allclose(noisy, interpolate(x0, x1, t))
    assert torch.allclose(target, x1 - 0.9 * x0)  # Eq. 7's target x1 - (1 - eta) x0


def test_code_schedule_is_the_official_one():
    """The official code: input (1 - t) x0 + t x1 + noise_scale exp(10 (t - 1)) xi, target x1 - x0 (no (1 - eta))."""
    x0, x1, xi = torch.tensor([[0.5, -1.0]]).expand(3, 2), torch.tensor([[0.8, 0.3]]).expand(3, 2), torch.tensor([[1.0, -2.0]])
    t = torch.tensor([[0.0], [0.5], [1.0]])
    noisy, target = noisy_flow_pair(x0, x1, t, xi.expand(3, 2), "code", 0.1, 0.2)
    expected = (1 - t) * x0 + t * x1 + 0.2 * torch.exp(10 * (t - 1)) * xi
    assert torch.allclose(noisy, expected, atol=1e-7)
    assert torch.allclose(noisy[2], torch.tensor([0.8 + 0.2, 0.3 - 0.4]))  # at t = 1: x1 + noise_scale xi
    assert torch.allclose(target, torch.tensor([[0.3, 1.3]]).expand(3, 2))  # x1 - x0 at every t


def test_code_schedule_is_the_default():
    assert Args().noise_schedule == "code"
    fino = resolve_args(Args(dataset="antmaze-large-navigate-singletask-v0"))
    assert (fino.eta, fino.noise_scale, fino.entropy_guidance) == (0.1, 0.1, True)


# ---- GMM entropy ---------------------------------------------------------------------------------------------
def gaussian_entropy(cov: torch.Tensor) -> float:
    d = cov.shape[-1]
    return 0.5 * d * (1 + math.log(2 * math.pi)) + 0.5 * torch.logdet(cov).item()


def test_gmm_entropy_of_a_known_gaussian():
    torch.manual_seed(0)
    a = torch.tensor([[0.3, 0.0, 0.0], [0.1, 0.2, 0.0], [-0.05, 0.04, 0.1]], dtype=torch.float64)
    cov = a @ a.T
    x = (torch.randn(4, 3000, 3, dtype=torch.float64) @ a.T + torch.tensor([0.2, -0.1, 0.4])).float()
    true_h = gaussian_entropy(cov)
    weights, _, covs = fit_gmm(x, num_components=1)
    assert torch.allclose(gmm_entropy_bound(weights, covs), torch.full((4,), true_h, dtype=torch.float64), atol=0.05)
    # three components on one Gaussian: the bound is an upper bound, and at most log 3 above
    weights, _, covs = fit_gmm(x, num_components=3)
    h3 = gmm_entropy_bound(weights, covs)
    assert (h3 > true_h - 0.05).all() and (h3 < true_h + math.log(3) + 0.05).all()


def test_gmm_entropy_of_well_separated_mixtures_is_weight_plus_component_entropy():
    torch.manual_seed(1)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.tensor([[-20.0, 0.0], [20.0, 0.0], [0.0, 25.0]], dtype=torch.float64)
    scales = torch.tensor([0.5, 1.0, 0.2], dtype=torch.float64)
    n, states = 6000, 3
    comp = torch.multinomial(w, states * n, replacement=True).view(states, n)
    x = means[comp] + scales[comp, None] * torch.randn(states, n, 2, dtype=torch.float64)
    expected = -(w * w.log()).sum() + sum(
        w[j] * gaussian_entropy(scales[j] ** 2 * torch.eye(2, dtype=torch.float64)) for j in range(3)
    )
    weights, fitted_means, covs = fit_gmm(x, num_components=3)
    assert torch.allclose(gmm_entropy_bound(weights, covs), expected.expand(states), atol=0.05)
    assert torch.allclose(weights.sort(-1).values, w.sort().values.expand(states, 3), atol=0.03)


def test_gmm_batches_states_independently():
    """Scaling one state's samples by c shifts its entropy by d log c and leaves the other state alone."""
    torch.manual_seed(2)
    base = torch.rand(1, 2000, 4, dtype=torch.float64)
    x = torch.cat([base, 0.1 * base])
    weights, _, covs = fit_gmm(x)
    h = gmm_entropy_bound(weights, covs)
    assert h[0] - h[1] == pytest.approx(4 * math.log(10), abs=0.1)


def test_gmm_covariances_stay_positive_definite_on_degenerate_samples():
    """Clipped actions pile up on the boundary: duplicates, a constant dimension, and identical samples."""
    torch.manual_seed(3)
    x = torch.randn(4, 200, 3).clamp(-1, 1)
    x[0, :150] = 1.0  # most samples exactly on the corner
    x[1, :, 2] = -1.0  # one dimension constant
    x[2] = 0.3  # every sample identical
    x[3, :, 1] = x[3, :, 0]  # two dimensions collinear
    weights, _, covs = fit_gmm(x, reg=1e-6)
    assert torch.isfinite(weights).all() and torch.allclose(weights.sum(-1), torch.ones(4, dtype=torch.float64))
    assert (torch.linalg.eigvalsh(covs) > 0).all()
    torch.linalg.cholesky(covs)  # raises if any is not positive definite
    h = gmm_entropy_bound(weights, covs)
    assert torch.isfinite(h).all()
    assert h[2] < h[3] < gaussian_entropy(torch.eye(3, dtype=torch.float64))  # collapsed samples: very low entropy


# ---- beta update and candidate selection ---------------------------------------------------------------
def test_beta_update_moves_in_the_right_direction_on_both_sides_of_the_target():
    target, t = -2.0, torch.tensor
    assert update_beta(t(10.0), t(-1.0), target, 0.1).item() == pytest.approx(10.1)  # entropy above target: greedier
    assert update_beta(t(10.0), t(-3.5), target, 0.1).item() == pytest.approx(9.85)  # below: softer, more exploration
    assert update_beta(t(10.0), t(target), target, 0.1).item() == 10.0
    assert update_beta(t(0.05), t(-50.0), target, 0.1).item() == 0.0  # clipped at 0, never negative
    assert update_beta(t(10.0), t(5.0), target, 0.0).item() == 10.0  # beta_lr 0: fixed temperature


def test_candidate_selection_greedy_uniform_and_sharp():
    torch.manual_seed(0)
    q = -1.0 - torch.rand(2000, 4)
    assert torch.equal(select_candidates(q, 10.0, greedy=True), q.argmax(-1))
    counts = torch.bincount(select_candidates(q, 0.0, greedy=False), minlength=4).float() / 2000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.04)  # beta = 0: uniform over candidates
    sharp = select_candidates(q, 1e4, greedy=False)
    assert (sharp == q.argmax(-1)).float().mean() > 0.95
    mild = (select_candidates(q, 10.0, greedy=False) == q.argmax(-1)).float().mean()
    assert 0.3 < mild < 0.95  # larger beta -> greedier


def test_sampled_candidates_follow_the_softmax_of_the_candidate_logits():
    """Online acting draws candidate i with probability softmax(candidate_logits)_i (Gumbel-max): the frequencies of
    200k draws over one state's 3 candidates match the softmax to within 0.005."""
    torch.manual_seed(0)
    q = torch.tensor([[-1.0, -2.0, -4.0]]).expand(200_000, 3)
    expected = torch.softmax(candidate_logits(q[:1], 2.0), -1)[0]
    counts = torch.bincount(select_candidates(q, 2.0, greedy=False), minlength=3).float() / len(q)
    assert torch.allclose(counts, expected, atol=0.005), (counts, expected)


def test_act_fino_picks_among_candidates_and_fql_takes_one_sample():
    torch.manual_seed(0)
    onestep, critic = MLP(3 + 2, 2, 16, 2), make_critic(3, 2, TINY_NETS)
    obs = torch.randn(5, 3)
    greedy = act(obs, 10.0, onestep, critic, 6, "mean", greedy=True)
    assert greedy.shape == (5, 2) and (greedy.abs() <= 1).all()
    # the evaluation action is the candidate with the highest aggregated Q among K = 6 fresh ones, per state
    for q_agg in ("mean", "min"):
        torch.manual_seed(2)
        chosen = act(obs, 10.0, onestep, critic, 6, q_agg, greedy=True)
        torch.manual_seed(2)
        obs_rep = obs[:, None].expand(5, 6, 3)
        candidates = onestep(obs_rep, torch.randn(5, 6, 2)).clamp(-1, 1)
        q = critic(obs_rep.reshape(30, 3), candidates.reshape(30, 2))
        q = (q.mean(0) if q_agg == "mean" else q.min(0).values).view(5, 6)
        assert torch.allclose(chosen, candidates[torch.arange(5), q.argmax(1)])
    # FQL: clip(mu(s, z)) with a fresh z: reproducible from the seed, stochastic across calls
    torch.manual_seed(1)
    a1 = act(obs, 10.0, onestep, critic, 1, "mean", greedy=True)
    torch.manual_seed(1)
    z = torch.randn(5, 2)
    assert torch.allclose(a1, onestep(obs, z).clamp(-1, 1))
    assert not torch.allclose(a1, act(obs, 10.0, onestep, critic, 1, "mean", greedy=True))
    # batched draws for the entropy estimate: leading dimensions are independent calls
    assert act(obs.expand(7, 5, 3), 10.0, onestep, critic, 4, "min", greedy=False).shape == (7, 5, 2)


# ---- --algo and the per-task tables ---------------------------------------------------------------------------------
def test_algo_fql_is_fqls_own_protocol_and_per_task_flags():
    fql = resolve_args(Args(dataset="D4RL/relocate/cloned-v2", algo="fql"))
    assert (fql.eta, fql.entropy_guidance, fql.online_steps, fql.buffer_size, fql.eval_every) == (
        0.0,
        False,
        10**6,
        2 * 10**6,
        10**5,
    )
    assert (fql.alpha, fql.gamma, fql.q_agg) == (10000.0, 0.99, "min")  # FQL's O2O flags: min
    fino = resolve_args(Args(dataset="D4RL/relocate/cloned-v2"))
    assert (fino.eta, fino.entropy_guidance, fino.online_steps, fino.buffer_size, fino.eval_every) == (
        0.1,
        True,
        500_000,
        1_500_000,
        50_000,
    )
    assert (fino.alpha, fino.q_agg) == (10000.0, "mean")  # FINO's README: mean
    offline = resolve_args(Args(dataset="D4RL/relocate/cloned-v2", algo="fql", online_steps=0))
    assert (offline.alpha, offline.q_agg) == (30000.0, "min")  # FQL's offline table
    ogbench = resolve_args(Args(dataset="humanoidmaze-medium-navigate-singletask-task2-v0", algo="fql"))
    assert (ogbench.alpha, ogbench.gamma) == (100.0, 0.995)
    assert resolve_args(Args(dataset="humanoidmaze-medium-navigate-singletask-v0", algo="fql", online_steps=0)).alpha == 30.0
    # explicit flags win over --algo and the table
    mine = resolve_args(Args(dataset="D4RL/relocate/cloned-v2", algo="fql", alpha=1.0, q_agg="mean", eta=0.2, eval_every=7))
    assert (mine.alpha, mine.q_agg, mine.eta, mine.eval_every, mine.gamma) == (1.0, "mean", 0.2, 7, 0.99)


# ---- FQL skeleton ----------------------------------------------------------------------------------------------
def test_critic_ensemble_equals_independent_layernorm_mlps():
    torch.manual_seed(0)
    critic = make_critic(3, 2, Args(hidden_dim=8, num_layers=2, num_critics=2))
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for p in list(critic.ln_scales) + list(critic.ln_biases):
            p.add_(0.3 * torch.randn_like(p))
    obs, a = torch.randn(5, 3), torch.randn(5, 2)
    q = critic(obs, a)
    assert q.shape == (2, 5) and not torch.allclose(q[0], q[1])
    for k in range(2):
        x = torch.cat([obs, a], -1)
        for i in range(3):
            x = x @ critic.weights[i][k] + critic.biases[i][k]
            if i < 2:
                x = torch.nn.functional.layer_norm(torch.nn.functional.gelu(x, approximate="tanh"), (8,), eps=1e-6)
                x = x * critic.ln_scales[i][k] + critic.ln_biases[i][k]
        assert torch.allclose(q[k], x[:, 0], atol=1e-5)


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    nets = make_nets(3, 2, TINY_NETS)
    target = make_critic(3, 2, TINY_NETS)
    target.load_state_dict(nets["critic"].state_dict())
    batch = dict(
        observations=torch.randn(32, 3),
        actions=torch.rand(32, 2) * 2 - 1,
        rewards=-torch.rand(32),
        next_observations=torch.randn(32, 3),
        masks=torch.ones(32),
        **draw_noise(32, 2, torch.device("cpu")),
    )
    return nets, target, batch


def loss_args(**kw):
    return resolve_args(Args(flow_steps=3, alpha=10.0, gamma=0.99, q_agg="mean", **kw))


def test_each_loss_reaches_only_its_own_network():
    nets, target, batch = tiny_setup()
    args = loss_args()
    owners = dict(qf_loss={"critic"}, flow_loss={"flow"}, distill_loss={"onestep"}, actor_q_loss={"onestep"})
    for loss_name, owner in owners.items():
        nets.zero_grad(set_to_none=True)
        fql_losses(batch, nets, target, args)[loss_name].backward()
        for net_name, net in nets.items():
            touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
            assert touched == (net_name in owner), (loss_name, net_name)
        assert all(p.grad is None for p in target.parameters())


def test_termination_cuts_the_bootstrap_and_truncation_does_not():
    """The mask (1 - terminated) multiplies gamma Q'(s', a'): mask 0 gives y = r; a time-limit row keeps mask 1."""
    nets, target, batch = tiny_setup()
    args = loss_args()
    q = nets["critic"](batch["observations"], batch["actions"]).detach()
    torch.manual_seed(5)
    cut = fql_losses(dict(batch, masks=torch.zeros(32)), nets, target, args)["qf_loss"]
    assert cut.item() == pytest.approx((q - batch["rewards"]).pow(2).mean().item(), rel=1e-5)
    torch.manual_seed(5)
    kept = fql_losses(batch, nets, target, args)["qf_loss"]
    assert kept.item() != pytest.approx(cut.item(), rel=1e-3)


def test_total_loss_weights_distillation_by_alpha():
    nets, target, batch = tiny_setup()
    args = resolve_args(Args(flow_steps=3, alpha=30.0, gamma=0.99, q_agg="min"))
    torch.manual_seed(7)
    losses = fql_losses(batch, nets, target, args)
    expected = losses["qf_loss"] + losses["flow_loss"] + 30.0 * losses["distill_loss"] + losses["actor_q_loss"]
    assert losses["total_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_replay_buffer_prefilled_with_the_dataset_then_fifo_over_the_oldest_rows():
    buffer = ReplayBuffer(FiveRows(), capacity=7, device=torch.device("cpu"))
    assert buffer.size == 5 and torch.equal(buffer.storage["observations"][:5, 0], torch.arange(5.0))
    assert set(buffer.sample(500)["observations"][:, 0].tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}  # uniform over held rows
    for i in range(3):  # online rows land at 5, 6, then overwrite row 0 (the oldest offline row)
        buffer.add(np.array([10.0 + i]), np.zeros(2), 0.0, np.array([11.0 + i]), 0.0)
    assert buffer.size == 7 and buffer.pos == 1
    assert buffer.storage["observations"][:, 0].tolist() == [12.0, 1.0, 2.0, 3.0, 4.0, 10.0, 11.0]
    assert buffer.storage["masks"][0].item() == 0.0 and buffer.storage["rewards"][0].item() == 0.0


# ---- end to end -----------------------------------------------------------------------------------------------------
TINY = [
    "--hidden-dim",
    "16",
    "--num-layers",
    "2",
    "--batch-size",
    "32",
    "--flow-steps",
    "3",
    "--log-every",
    "50",
    "--eval-episodes",
    "1",
    "--entropy-states",
    "16",
    "--entropy-samples",
    "30",
    "--gmm-iters",
    "20",
    "--no-cuda",
]
OGBENCH_NAME = "pointmaze-medium-navigate-singletask-v0"


def run_fino(cwd, *flags):
    return run_script(cwd, "fino.py", *flags)


@pytest.fixture(scope="module")
def ogbench_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ogbench")
    write_ogbench_dataset(str(path), OGBENCH_NAME, num_episodes=3, episode_length=60)
    return str(path)


def test_smoke_ogbench_offline_online_beta_update_save_and_resume(tmp_path, ogbench_dir):
    # a 1000-step pointmaze episode must end online for charts/episodic_return
    flags = [
        "--dataset",
        OGBENCH_NAME,
        "--dataset-dir",
        ogbench_dir,
        "--offline-steps",
        "100",
        "--online-steps",
        "1100",
        "--eval-every",
        "600",
        "--beta-update-every",
        "500",
        "--num-candidates",
        "3",
        *TINY,
    ]
    result = run_fino(tmp_path, *flags, "--save-model")
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_dirs(tmp_path)
    logged = scalars(run_dir)
    for tag in [
        "losses/total_loss",
        "losses/qf_loss",
        "losses/flow_loss",
        "losses/distill_loss",
        "losses/actor_q_loss",
        "losses/qf_values",
        "charts/SPS",
        "charts/beta",
        "charts/entropy",
        "charts/episodic_return",
        "eval/success",
        "eval/episodic_return",
    ]:
        assert tag in logged, tag
    assert len(logged["losses/qf_loss"]) == 1200 // 50  # one update per step, offline and online
    assert [s for s, _ in logged["eval/success"]] == [100, 600, 1200]  # end of offline, every 600, the end
    assert [s for s, _ in logged["charts/entropy"]] == [600, 1100]  # every 500 online steps
    betas = {v for _, v in logged["charts/beta"]}
    assert 10.0 in betas and len(betas) > 1  # the beta update ran
    assert os.path.exists(os.path.join(run_dir, "fino.pt")) and os.path.exists(os.path.join(run_dir, "fino_offline.pt"))
    saved = torch.load(os.path.join(run_dir, "fino_offline.pt"), weights_only=False)
    assert saved["global_step"] == 100 and {"nets", "target_critic", "optimizer", "beta"} <= set(saved)

    # the online phase again, from the saved offline model
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    result = run_fino(resumed, *flags, "--load-model", os.path.join(run_dir, "fino_offline.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    (resumed_dir,) = run_dirs(resumed)
    logged = scalars(resumed_dir)
    assert min(s for s, _ in logged["losses/qf_loss"]) > 100  # no offline update was repeated
    assert [s for s, _ in logged["eval/success"]] == [600, 1200]


def test_smoke_fql_configuration(tmp_path, ogbench_dir):
    result = run_fino(
        tmp_path,
        "--dataset",
        OGBENCH_NAME,
        "--dataset-dir",
        ogbench_dir,
        "--eta",
        "0",
        "--no-entropy-guidance",
        "--offline-steps",
        "100",
        "--online-steps",
        "100",
        "--eval-every",
        "100",
        "--beta-update-every",
        "50",
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_dirs(tmp_path)
    logged = scalars(run_dir)
    assert {v for _, v in logged["charts/beta"]} == {10.0}  # no guidance: beta is never updated
    assert "charts/entropy" in logged and "eval/success" in logged  # the one-step sampler's entropy is still logged


def test_smoke_algo_fql_has_no_beta_estimate(tmp_path, ogbench_dir):
    flags = ["--dataset", OGBENCH_NAME, "--dataset-dir", ogbench_dir, "--algo", "fql", "--offline-steps", "100"]
    result = run_fino(tmp_path, *flags, "--online-steps", "100", "--eval-every", "100", "--beta-update-every", "50", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_dirs(tmp_path)
    logged = scalars(run_dir)
    assert "charts/entropy" not in logged and "charts/beta" not in logged
    assert [s for s, _ in logged["eval/success"]] == [100, 200]


def test_smoke_minari_offline_online(tmp_path):
    root = str(tmp_path / "minari")
    write_minari_dataset(root, "test/pendulum/random-v0", "Pendulum-v1", num_episodes=3, max_steps=50)
    result = run_fino(
        tmp_path,
        "--dataset",
        "test/pendulum/random-v0",
        "--dataset-dir",
        root,
        "--offline-steps",
        "100",
        "--online-steps",
        "250",
        "--eval-every",
        "150",
        "--beta-update-every",
        "200",
        "--num-candidates",
        "2",
        "--save-model",
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_dirs(tmp_path)
    logged = scalars(run_dir)
    assert {"eval/episodic_return", "charts/episodic_return", "charts/entropy", "losses/flow_loss"} <= set(logged)
    assert "eval/success" not in logged  # the metric is the return for a dataset without reference scores
    assert len({v for _, v in logged["charts/beta"]}) > 1
    assert os.path.exists(os.path.join(run_dir, "fino.pt"))


BAD_VALUES = [  # (flags, fragment of the one error line): every size, count, budget, rate and coefficient
    (["--offline-steps", "-1"], "--offline-steps and --online-steps must be non-negative"),
    (["--online-steps", "-5"], "--offline-steps and --online-steps must be non-negative"),
    (["--offline-steps", "0", "--online-steps", "0"], "nothing to do"),
    (["--buffer-size", "0"], "--buffer-size, --batch-size"),
    (["--batch-size", "0"], "--buffer-size, --batch-size"),
    (["--hidden-dim", "0"], "--hidden-dim"),
    (["--num-layers", "0"], "--num-layers"),
    (["--num-critics", "0"], "--num-critics"),
    (["--flow-steps", "-3"], "--flow-steps"),
    (["--eval-every", "0"], "--eval-every"),
    (["--eval-episodes", "0"], "--eval-episodes"),
    (["--log-every", "0"], "--log-every"),
    (["--beta-update-every", "0"], "--beta-update-every"),
    (["--learning-rate", "0"], "--learning-rate must be positive"),
    (["--learning-rate", "nan"], "--learning-rate must be positive"),
    (["--tau", "0"], "--tau must lie in (0, 1]"),
    (["--tau", "1.5"], "--tau must lie in (0, 1]"),
    (["--gamma", "0"], "--gamma must lie in (0, 1]"),
    (["--gamma", "1.01"], "--gamma must lie in (0, 1]"),
    (["--alpha", "-1"], "--alpha must be a non-negative number"),
    (["--alpha", "nan"], "--alpha must be a non-negative number"),
    (["--eta", "1.5"], "--eta must lie in [0, 1]"),
    (["--eta", "-0.1"], "--eta must lie in [0, 1]"),
    (["--noise-scale", "-1"], "--noise-scale must be non-negative"),
    (["--num-candidates", "0"], "--num-candidates must be at least 1"),
    (["--num-candidates", "1"], "entropy guidance needs at least 2 candidates"),
    (["--no-entropy-guidance", "--num-candidates", "4"], "--num-candidates applies to entropy guidance only"),
    (["--algo", "fql", "--num-candidates", "3"], "--num-candidates applies to entropy guidance only"),
    (["--beta", "-1"], "--beta and --beta-lr must be non-negative"),
    (["--beta-lr", "inf"], "--beta and --beta-lr must be non-negative"),
    (["--target-entropy", "nan"], "--target-entropy must be a finite number"),
    (["--entropy-states", "0"], "--entropy-states"),
    (["--entropy-samples", "2"], "--entropy-samples must be at least --gmm-components"),
    (["--gmm-components", "0"], "--gmm-components"),
    (["--gmm-iters", "0"], "--gmm-iters"),
    (["--gmm-tol", "0"], "--gmm-tol must be positive"),
    (["--gmm-reg", "-1e-6"], "--gmm-reg must be positive"),
    (["--preset", "nosuchtask"], "unknown --preset 'nosuchtask'"),
    (["--algo", "fql", "--online-steps", "0", "--preset", "scene-play-x"], "unknown --preset"),
]


@pytest.mark.parametrize("flags, fragment", BAD_VALUES)
def test_bad_values_are_one_line_errors_before_any_data_is_loaded(flags, fragment):
    """Parsed by tyro as on the command line, then checked: a one-line `error:` SystemExit (exit status 1), raised
    before main touches the dataset (the dataset flags here point nowhere)."""
    with pytest.raises(SystemExit) as caught:
        check_args(resolve_args(tyro.cli(Args, args=["--dataset-dir", "/nonexistent", *flags])))
    message = str(caught.value.code)
    assert message.startswith("error: ") and "\n" not in message and fragment in message, message


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """A text file, a checkpoint of another script, and a fino.py checkpoint of 8-wide networks."""
    path = tmp_path_factory.mktemp("checkpoints")
    (path / "notes.pt").write_text("not a checkpoint")
    torch.save({"script": "fmer.py", "actor": {}}, path / "fmer.pt")
    torch.manual_seed(0)
    small = Args(hidden_dim=8, num_layers=2)
    nets = make_nets(2, 2, small)
    optimizer = torch.optim.Adam(nets.parameters())
    state = dict(script="fino.py", nets=nets, target_critic=make_critic(2, 2, small), optimizer=optimizer, beta=10.0)
    save_checkpoint((str(path / "small.pt"), {**state, "global_step": 5, "args": {}}))
    return path


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--dataset-dir", "/nonexistent"], "OGBench dataset"),
        (["--num-candidates", "2", "--env-id", "Pendulum-v1"], "--env-id is only for dataset files"),
        ([], "entropy guidance needs at least 2 candidates (K = 1 for A = 2)"),  # K = ceil(A / 2) = 1
        (["--num-candidates", "2", "--no-cuda", "--cudagraphs"], "--cudagraphs needs a CUDA device"),
        (["--num-candidates", "2", "--load-model", "/nonexistent/fino.pt"], "no checkpoint at '/nonexistent/fino.pt'"),
        (["--num-candidates", "2", "--load-model", "{ckpt}/notes.pt"], "is not a checkpoint ("),
        (["--num-candidates", "2", "--load-model", "{ckpt}/fmer.pt"], "is not a checkpoint of fino.py"),
        (["--num-candidates", "2", *TINY, "--load-model", "{ckpt}/small.pt"], "holds networks of another size"),
        (["--num-candidates", "2", "--learning-rate", "1e30", "--offline-steps", "50", *TINY], "became non-finite at step"),
    ],
)
def test_bad_input_ends_with_one_line(tmp_path, ogbench_dir, bad_checkpoints, flags, fragment):
    flags = [f.replace("{ckpt}", str(bad_checkpoints)) for f in flags]
    if "/nonexistent" not in flags:
        flags = [*flags, "--dataset-dir", ogbench_dir]
    result = run_fino(tmp_path, "--dataset", OGBENCH_NAME, *flags)
    assert_one_line_error(result, fragment)
    if "became non-finite" in fragment:  # stopped at the first log step, before writing its metrics
        (run_dir,) = run_dirs(tmp_path)
        assert "losses/qf_loss" not in scalars(run_dir)


VALIDATION_WRAPPER = """
import runpy, sys
sys.path.insert(0, {root!r})
import common.datasets as datasets

load = datasets.load_dataset


def load_with_validation(*args, **kwargs):  # a held-out split made by hand: the first 100 rows
    data = load(*args, **kwargs)
    rows = {{k: getattr(data, k)[:100] for k in datasets.TRANSITION_KEYS}}
    data.validation = datasets.OfflineData(**rows, name="val", metric=data.metric, make_env=data.make_env)
    return data


datasets.load_dataset = load_with_validation
sys.argv = ["fino.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_eval_episodes_and_validation_do_not_touch_the_training_losses(tmp_path, ogbench_dir):
    """Three runs that differ only in --eval-episodes (1, 2) and in a hand-made validation split: identical training curves;
    every run logs val/<loss> at every log step, from its own split."""
    flags = ["--dataset", OGBENCH_NAME, "--dataset-dir", ogbench_dir, "--offline-steps", "100", "--online-steps", "100"]
    flags += ["--eval-every", "100", "--beta-update-every", "50", "--num-candidates", "2", *TINY]
    logs = []
    for name, extra in (("one", ["--eval-episodes", "1"]), ("two", ["--eval-episodes", "2"]), ("val", [])):
        (tmp_path / name).mkdir()
        if name == "val":
            wrapper = tmp_path / "with_validation.py"
            wrapper.write_text(VALIDATION_WRAPPER.format(root=ROOT, script=os.path.join(ROOT, "fino.py")))
            result = run_script(tmp_path / name, str(wrapper), *flags, *extra)
        else:
            result = run_fino(tmp_path / name, *flags, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        (run_dir,) = run_dirs(tmp_path / name)
        logs.append(scalars(run_dir))
    one, two, val = logs
    training = [tag for tag in one if tag.startswith("losses/")] + ["charts/beta", "charts/entropy"]
    assert len(training) == 8 and len(one["losses/qf_loss"]) == 4
    for tag in training:
        assert one[tag] == two[tag] == val[tag], tag
    assert [s for s, _ in one["eval/episodic_return"]] == [s for s, _ in two["eval/episodic_return"]] == [100, 200]
    for tag in ("qf_loss", "qf_values", "flow_loss", "distill_loss", "actor_q_loss", "total_loss"):
        assert [s for s, _ in val[f"val/{tag}"]] == [s for s, _ in one[f"val/{tag}"]] == [50, 100, 150, 200]
        assert val[f"val/{tag}"] != one[f"val/{tag}"]  # the hand-made split, not the fixture's own validation file


def test_file_dataset_run_is_named_after_the_files_base_name(tmp_path):
    path = str(tmp_path / "pendulum-random.npz")
    write_d4rl_file(path, "Pendulum-v1", num_episodes=2, max_steps=30)
    flags = ["--dataset", path, "--env-id", "Pendulum-v1", "--dataset-source", "file"]  # no reference scores: no --d4rl-name
    result = run_fino(tmp_path, *flags, "--algo", "fql", "--offline-steps", "50", "--online-steps", "0", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_dirs(tmp_path)
    assert os.path.basename(run_dir).startswith("pendulum-random__fino__1__")
    assert "eval/episodic_return" in scalars(run_dir)


@pytest.mark.parametrize("eta, expected", [(0.1, 0.2105), (0.5, 0.6796)])
def test_paper_target_leaves_the_injected_noise_out_of_the_learned_flow(eta, expected):
    """Around a point datum x1 = 0 the paper schedule's regression optimum is v(y, t) = k(t) y with k(t) =
    E[target * input] / E[input^2] (both Gaussian), so the flow from N(0, 1) ends with std exp(int_0^1 k dt):
    0.21 at eta = 0.1 and 0.68 at eta = 0.5 (closed form exp(-int c (1 - t) / (1 - c t)^2 dt), c = 1 - eta), not the
    sigma_min = eta of the path its input follows: the target x1 - (1 - eta) x0 does not carry the injected noise."""
    g = torch.Generator().manual_seed(0)
    ts, n = torch.linspace(0.0, 1.0, 101, dtype=torch.float64), 200_000
    slopes = []
    for t in ts:
        x0, xi = torch.randn(n, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)
        x_in, target = noisy_flow_pair(x0, torch.zeros(n, 1, dtype=torch.float64), t.expand(n, 1), xi, "paper", eta, 0.1)
        slopes.append((target * x_in).mean() / x_in.pow(2).mean())
    final_std = torch.trapezoid(torch.stack(slopes), ts).exp().item()
    assert final_std == pytest.approx(expected, abs=0.01)
    assert abs(final_std - eta) > 0.1

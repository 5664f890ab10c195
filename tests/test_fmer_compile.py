"""--compile: the compiled update computes what the eager one does (CPU inductor; tiny networks, compiling is slow)."""

import functools

import torch
import torch._inductor.config

import fmer

OBS_DIM, ACT_DIM, BATCH = 3, 2, 8


def one_step(compile_: bool, monkeypatch):
    """Build fmer's agent as the script does (seed 0) and run one update on a fixed batch (seed 1)."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # compiled code draws eager's random numbers
    args = fmer.Args(
        compile=compile_, hidden_dim=8, num_layers=1, num_candidates=2, flow_steps=2, batch_size=BATCH, learning_starts=8
    )
    torch.manual_seed(0)
    agent = fmer.make_agent(args, OBS_DIM, ACT_DIM, torch.device("cpu"))
    train_step = fmer.speed_up(functools.partial(fmer.update, agent=agent, args=args, entropy_on=True), args)
    act_fn = fmer.speed_up(functools.partial(fmer.act, agent=agent, args=args), args)
    initial = torch.cat([p.detach().flatten() for p in agent["actor"].parameters()])
    torch.manual_seed(1)
    obs, next_obs = torch.randn(BATCH, OBS_DIM), torch.randn(BATCH, OBS_DIM)
    actions, rewards = torch.rand(BATCH, ACT_DIM) * 2 - 1, torch.randn(BATCH)
    metrics = train_step(obs, actions, rewards, torch.zeros(BATCH), next_obs)
    params = {
        name: p.detach().clone() for key in ("actor", "critic", "critic_target") for name, p in agent[key].named_parameters()
    }
    params["log_alpha"] = agent["log_alpha"].detach().clone()
    assert not torch.equal(torch.cat([p.flatten() for p in agent["actor"].parameters()]), initial)  # it trained
    actions = act_fn(obs)
    return {k: v.item() for k, v in metrics.items()}, params, actions


def test_compile_matches_eager_fmer(monkeypatch):
    """One update (losses and every parameter after it) and the acting that follows, eager vs --compile."""
    eager_metrics, eager_params, eager_actions = one_step(False, monkeypatch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_metrics, compiled_params, compiled_actions = one_step(True, monkeypatch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled code really ran
    assert eager_metrics.keys() == compiled_metrics.keys() and "losses/entropy_loss" in eager_metrics
    for name, value in eager_metrics.items():
        assert abs(compiled_metrics[name] - value) <= 1e-5 * (1 + abs(value)), name
    for name, p in eager_params.items():
        assert torch.allclose(compiled_params[name], p, rtol=1e-5, atol=1e-6), name
    assert torch.allclose(compiled_actions, eager_actions, atol=1e-6)

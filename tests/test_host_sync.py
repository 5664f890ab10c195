"""--cudagraphs needs update and acting functions that never read a tensor's value on the host (`.item()`, `bool(t)`,
`if t:`, `nonzero`, ...): inside a CUDA graph such a read fails or is frozen at capture. No GPU here, so each
script's real step functions run on CPU under a dispatch mode that raises on every op that would sync. Adam's own
step is left out (replaced by a no-op): its `capturable=True` path, which --cudagraphs uses, is CUDA-only."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fino
import flowq
import fmer

SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t), `if t:`
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
}


class NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS:
            raise AssertionError(f"host sync inside a step function: {func}")
        return func(*args, **(kwargs or {}))


def without_adam_step(*optimizers) -> None:
    for optimizer in optimizers:
        if optimizer is not None:
            optimizer.step = lambda *args, **kwargs: None


def transitions(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """A random batch of 8 transitions (3-d observations, 2-d actions), plus `extra` keys."""
    batch = dict(
        observations=torch.randn(8, 3),
        actions=torch.rand(8, 2) * 2 - 1,
        rewards=torch.randn(8),
        next_observations=torch.randn(8, 3),
        masks=torch.ones(8),
    )
    return {**batch, **extra}


def test_the_detector_catches_a_host_sync():
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        if torch.randn(3).sum() > 0:
            pass


@pytest.mark.parametrize("entropy_on", [True, False])
def test_fmer_update_and_acting_never_sync(entropy_on):
    args = fmer.Args(hidden_dim=8, num_layers=1, num_candidates=3, flow_steps=2, batch_size=8, learning_starts=8)
    torch.manual_seed(0)
    agent = fmer.make_agent(args, 3, 2, torch.device("cpu"))
    without_adam_step(*(value for key, value in agent.items() if key.endswith("_optimizer")))
    batch = (torch.randn(8, 3), torch.rand(8, 2) * 2 - 1, torch.randn(8), torch.zeros(8), torch.randn(8, 3))
    with NoHostSync():
        fmer.update(*batch, agent=agent, args=args, entropy_on=entropy_on)
        fmer.act(torch.randn(1, 3), agent, args)


@pytest.mark.parametrize("algo", ["fino", "fql"])
def test_fino_update_and_acting_never_sync(algo):
    args = fino.resolve_args(fino.Args(algo=algo, hidden_dim=8, num_layers=2, num_critics=2))
    torch.manual_seed(0)
    nets = fino.make_nets(3, 2, args)
    target_critic = fino.make_critic(3, 2, args)
    optimizer = torch.optim.Adam(nets.parameters())
    without_adam_step(optimizer)
    batch = transitions(**fino.draw_noise(8, 2, torch.device("cpu")))
    guided, beta = algo == "fino", torch.tensor(1.0)
    with NoHostSync():
        fino.update(batch, dict(nets=nets, target_critic=target_critic, optimizer=optimizer), args)
        for greedy in (False, True):
            fino.act(torch.randn(1, 3), beta, nets["onestep"], nets["critic"], 4 if guided else 1, args.q_agg, greedy)


@pytest.mark.parametrize("schedule", ["learned", "t"])
def test_flowq_update_and_acting_never_sync(schedule):
    torch.manual_seed(0)
    args = flowq.with_domain_defaults(flowq.Args(hidden_dim=8, num_layers=2, batch_size=8, cuda=False, schedule=schedule))
    agent = flowq.make_agent(args, 3, 2, torch.device("cpu"))
    without_adam_step(agent["actor_optimizer"], agent["critic_optimizer"], agent["schedule_optimizer"])
    batch = transitions(terminals=torch.zeros(8), dones=torch.zeros(8))
    with NoHostSync():
        flowq.update(batch, torch.randn(8, 2), torch.rand(8, 1), agent, args)
        flowq.act(agent["actor"], torch.randn(1, 3), torch.randn(1, 2), args.flow_steps)

"""scripts/gemm_bound.py: it records exactly the matrix products of fino.py's FQL update and counts their FLOPs."""

import os
import sys

from tests.conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from gemm_bound import Args, flops, record_update  # noqa: E402


def test_recorded_products_are_the_fql_update_counted_by_hand():
    """FLOPs of one update, by hand (4-layer MLPs; 2 critics; 10 Euler steps): forward: mu(s', z'), Qbar(s', a'),
    Q(s, a), v(s, x_t, t), 10 x v for the distillation target, mu(s, z), Q(s, mu) with the critic frozen; backward:
    the weights of Q, v and mu, the inputs of every layer but the first (whose input needs no gradient), and the
    frozen critic's inputs of every layer (the gradient reaches the action). Any product missed, duplicated or
    miscounted (e.g. a bmm counted for one ensemble member) breaks the equality."""
    obs, act, batch, hidden, layers = 5, 3, 7, 16, 4
    calls = record_update(Args(obs_dim=obs, act_dim=act, batch_size=batch, hidden_dim=hidden))

    def mlp(fan_in: int, fan_out: int, first_layer: bool = True) -> int:
        return 2 * batch * (fan_in * hidden * first_layer + (layers - 1) * hidden**2 + hidden * fan_out)

    forward = 11 * mlp(obs + act + 1, act) + 2 * mlp(obs + act, act) + 3 * 2 * mlp(obs + act, 1)
    backward = 2 * (mlp(obs + act, 1) + mlp(obs + act, 1, False))  # critic: weights, inputs
    backward += 2 * mlp(obs + act, 1)  # frozen critic: inputs of every layer
    backward += mlp(obs + act + 1, act) + mlp(obs + act + 1, act, False) + mlp(obs + act, act) + mlp(obs + act, act, False)
    assert sum(flops(name, operands) for name, operands in calls) == forward + backward
    assert len(calls) == 112  # 65 addmm, 15 baddbmm, 14 bmm, 18 mm


def test_the_script_prints_the_ceiling(tmp_path):
    result = run_script(tmp_path, "scripts/gemm_bound.py", "--hidden-dim", "16", "--batch-size", "8", "--repeats", "2")
    assert result.returncode == 0, result.stderr
    assert "112 matrix products" in result.stdout and "updates/s" in result.stdout

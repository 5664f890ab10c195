"""Bad input to fmer.py ends in one `error:` line, no traceback, a non-zero exit (check_args, before any env is built,
except for the env id itself)."""

import pytest
from conftest import assert_one_line_error, run_script

PENDULUM = ["--env-id", "Pendulum-v1"]

BAD_INPUTS = [
    # zero or negative sizes, counts and budgets
    (["--total-timesteps", "0"], "--total-timesteps must be positive, got 0"),
    (["--hidden-dim", "0"], "--hidden-dim must be positive"),
    (["--num-layers", "0"], "--num-layers must be positive"),
    (["--num-candidates", "0"], "--num-candidates must be positive"),
    (["--flow-steps", "-1"], "--flow-steps must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--buffer-size", "0"], "--buffer-size must be positive"),
    (["--eval-episodes", "0"], "--eval-episodes must be positive"),
    (["--log-every", "0"], "--log-every must be positive"),
    # rates and coefficients out of range
    (["--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--gamma", "1.01"], "--gamma must be in (0, 1]"),
    (["--tau", "0"], "--tau must be in (0, 1]"),
    (["--tau", "1.5"], "--tau must be in (0, 1]"),
    (["--actor-lr", "0"], "--actor-lr must be a positive number"),
    (["--critic-lr", "-1e-3"], "--critic-lr must be a positive number"),
    (["--alpha-lr", "nan"], "--alpha-lr must be a positive number"),
    (["--alpha", "0"], "--alpha must be a positive number"),
    (["--adv-temperature", "0"], "--adv-temperature must be a positive number"),
    (["--reward-scale", "inf"], "--reward-scale must be a positive number"),
    (["--actor-lr-end", "1e-3"], "--actor-lr-end (0.001) must be in [0, --actor-lr (0.0003)]"),
    (["--target-ess-fraction", "1"], "--target-ess-fraction must be in (0, 1)"),
    (["--target-entropy", "nan"], "--target-entropy must be a finite number"),
    (["--entropy-off-step", "-1"], "--entropy-off-step must be non-negative"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    # budgets that cannot fit together, incompatible flags
    (["--learning-starts", "10", "--batch-size", "32"], "--learning-starts (10) must be at least --batch-size (32)"),
    (["--total-timesteps", "300", "--learning-starts", "300"], "--total-timesteps (300) must exceed --learning-starts"),
    (["--buffer-size", "500", "--learning-starts", "1000"], "--buffer-size (500) must hold the 1000 warm-up steps"),
    (["--adv-temperature-mode", "ess", "--weighting", "top1"], "--adv-temperature-mode ess has nothing to tune"),
    (["--kitchen-tasks", "4"], "--kitchen-tasks applies to FrankaKitchen-v1 only"),
    (["--env-id", "FrankaKitchen-v1", "--kitchen-tasks", "3"], "--kitchen-tasks must be one of [1, 2, 4, 7], got 3"),
    (["--cudagraphs", "--no-cuda"], "--cudagraphs needs a CUDA device"),
    # environments that cannot be used
    (["--env-id", "NoSuchEnv-v0"], "cannot make environment 'NoSuchEnv-v0'"),
    (["--env-id", "CartPole-v1"], "continuous (Box) actions are required"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[" ".join(flags) for flags, _ in BAD_INPUTS])
def test_bad_input_ends_with_one_error_line(tmp_path, flags, message):
    env_flags = [] if "--env-id" in flags else PENDULUM
    result = run_script(tmp_path, "fmer.py", *env_flags, *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()  # nothing was built

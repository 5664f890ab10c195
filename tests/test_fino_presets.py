"""fino.py's --preset auto against every per-task command of the official FQL and FINO READMEs: each command's
(alpha, gamma, q_agg) must come out of resolve_args for the dataset names our users pass (CPU, no data)."""

import pytest

import fino

# Transcribed from the READMEs' `python main.py` commands:
#   FQL  github.com/seohongpark/fql  719d04417cb0b206deddbc7d761b3e710c3d750c, README.md
#   FINO github.com/CTID282/FINO     de49317abaf6f86e258bba7ebee991c98f2e6360, README.md
# A flag a command omits has the official default (agents/fql.py, agents/fino.py): alpha 10, discount 0.99, q_agg mean.
# online: --online_steps > 0 (FQL's "Offline-to-online RL" section and line 47; FINO's main.py defaults to 500k, so
# all of FINO's commands are). Left out: FQL's pixel-based visual-* commands (lines 45, 176-184; fino.py has no image
# encoder), other agents' commands (--agent=agents/{iql,rebrac,ifql,sac}.py, lines 232-242, 286-292), and FINO's bare
# `python main.py` (line 16: the default env with default flags, not a per-task command).
# (README, line, env_name, online, alpha, gamma, q_agg); "{t}" stands for task1..task5 on 5 consecutive lines.
COMMANDS = [
    ("fql", 43, "antsoccer-arena-navigate-singletask-v0", False, 10.0, 0.995, "mean"),
    ("fql", 47, "scene-play-singletask-v0", True, 300.0, 0.99, "mean"),
    # FQL, Offline RL
    ("fql", 86, "antmaze-large-navigate-singletask-v0", False, 10.0, 0.99, "min"),
    ("fql", 88, "antmaze-giant-navigate-singletask-v0", False, 10.0, 0.995, "min"),
    ("fql", 90, "humanoidmaze-medium-navigate-singletask-v0", False, 30.0, 0.995, "mean"),
    ("fql", 92, "humanoidmaze-large-navigate-singletask-v0", False, 30.0, 0.995, "mean"),
    ("fql", 94, "antsoccer-arena-navigate-singletask-v0", False, 10.0, 0.995, "mean"),
    ("fql", 96, "cube-single-play-singletask-v0", False, 300.0, 0.99, "mean"),
    ("fql", 98, "cube-double-play-singletask-v0", False, 300.0, 0.99, "mean"),
    ("fql", 100, "scene-play-singletask-v0", False, 300.0, 0.99, "mean"),
    ("fql", 102, "puzzle-3x3-play-singletask-v0", False, 1000.0, 0.99, "mean"),
    ("fql", 104, "puzzle-4x4-play-singletask-v0", False, 1000.0, 0.99, "mean"),
    ("fql", 111, "antmaze-large-navigate-singletask-{t}-v0", False, 10.0, 0.99, "min"),
    ("fql", 117, "antmaze-giant-navigate-singletask-{t}-v0", False, 10.0, 0.995, "min"),
    ("fql", 123, "humanoidmaze-medium-navigate-singletask-{t}-v0", False, 30.0, 0.995, "mean"),
    ("fql", 129, "humanoidmaze-large-navigate-singletask-{t}-v0", False, 30.0, 0.995, "mean"),
    ("fql", 135, "antsoccer-arena-navigate-singletask-{t}-v0", False, 10.0, 0.995, "mean"),
    ("fql", 141, "cube-single-play-singletask-{t}-v0", False, 300.0, 0.99, "mean"),
    ("fql", 147, "cube-double-play-singletask-{t}-v0", False, 300.0, 0.99, "mean"),
    ("fql", 153, "scene-play-singletask-{t}-v0", False, 300.0, 0.99, "mean"),
    ("fql", 159, "puzzle-3x3-play-singletask-{t}-v0", False, 1000.0, 0.99, "mean"),
    ("fql", 165, "puzzle-4x4-play-singletask-{t}-v0", False, 1000.0, 0.99, "mean"),
    ("fql", 191, "antmaze-umaze-v2", False, 10.0, 0.99, "mean"),
    ("fql", 193, "antmaze-umaze-diverse-v2", False, 10.0, 0.99, "mean"),
    ("fql", 195, "antmaze-medium-play-v2", False, 10.0, 0.99, "mean"),
    ("fql", 197, "antmaze-medium-diverse-v2", False, 10.0, 0.99, "mean"),
    ("fql", 199, "antmaze-large-play-v2", False, 3.0, 0.99, "mean"),
    ("fql", 201, "antmaze-large-diverse-v2", False, 3.0, 0.99, "mean"),
    ("fql", 203, "pen-human-v1", False, 10000.0, 0.99, "min"),
    ("fql", 205, "pen-cloned-v1", False, 10000.0, 0.99, "min"),
    ("fql", 207, "pen-expert-v1", False, 3000.0, 0.99, "min"),
    ("fql", 209, "door-human-v1", False, 30000.0, 0.99, "min"),
    ("fql", 211, "door-cloned-v1", False, 30000.0, 0.99, "min"),
    ("fql", 213, "door-expert-v1", False, 30000.0, 0.99, "min"),
    ("fql", 215, "hammer-human-v1", False, 30000.0, 0.99, "min"),
    ("fql", 217, "hammer-cloned-v1", False, 10000.0, 0.99, "min"),
    ("fql", 219, "hammer-expert-v1", False, 30000.0, 0.99, "min"),
    ("fql", 221, "relocate-human-v1", False, 10000.0, 0.99, "min"),
    ("fql", 223, "relocate-cloned-v1", False, 30000.0, 0.99, "min"),
    ("fql", 225, "relocate-expert-v1", False, 30000.0, 0.99, "min"),
    # FQL, Offline-to-online RL
    ("fql", 251, "humanoidmaze-medium-navigate-singletask-v0", True, 100.0, 0.995, "mean"),
    ("fql", 253, "antsoccer-arena-navigate-singletask-v0", True, 30.0, 0.995, "mean"),
    ("fql", 255, "cube-double-play-singletask-v0", True, 300.0, 0.99, "mean"),
    ("fql", 257, "scene-play-singletask-v0", True, 300.0, 0.99, "mean"),
    ("fql", 259, "puzzle-4x4-play-singletask-v0", True, 1000.0, 0.99, "mean"),
    ("fql", 261, "antmaze-umaze-v2", True, 10.0, 0.99, "mean"),
    ("fql", 263, "antmaze-umaze-diverse-v2", True, 10.0, 0.99, "mean"),
    ("fql", 265, "antmaze-medium-play-v2", True, 10.0, 0.99, "mean"),
    ("fql", 267, "antmaze-medium-diverse-v2", True, 10.0, 0.99, "mean"),
    ("fql", 269, "antmaze-large-play-v2", True, 3.0, 0.99, "mean"),
    ("fql", 271, "antmaze-large-diverse-v2", True, 3.0, 0.99, "mean"),
    ("fql", 273, "pen-cloned-v1", True, 1000.0, 0.99, "min"),
    ("fql", 275, "door-cloned-v1", True, 1000.0, 0.99, "min"),
    ("fql", 277, "hammer-cloned-v1", True, 1000.0, 0.99, "min"),
    ("fql", 279, "relocate-cloned-v1", True, 10000.0, 0.99, "min"),
    # FINO (offline-to-online)
    ("fino", 23, "humanoidmaze-medium-navigate-singletask-v0", True, 100.0, 0.995, "mean"),
    ("fino", 25, "humanoidmaze-large-navigate-singletask-v0", True, 30.0, 0.995, "mean"),
    ("fino", 27, "antmaze-large-navigate-singletask-v0", True, 10.0, 0.99, "min"),
    ("fino", 29, "antmaze-giant-navigate-singletask-v0", True, 10.0, 0.995, "min"),
    ("fino", 31, "antsoccer-arena-navigate-singletask-v0", True, 30.0, 0.995, "mean"),
    ("fino", 33, "cube-double-play-singletask-v0", True, 300.0, 0.99, "mean"),
    ("fino", 35, "puzzle-4x4-play-singletask-v0", True, 1000.0, 0.99, "mean"),
    ("fino", 44, "humanoidmaze-medium-navigate-singletask-{t}-v0", True, 100.0, 0.995, "mean"),
    ("fino", 50, "humanoidmaze-large-navigate-singletask-{t}-v0", True, 30.0, 0.995, "mean"),
    ("fino", 56, "antmaze-large-navigate-singletask-{t}-v0", True, 10.0, 0.99, "min"),
    ("fino", 62, "antmaze-giant-navigate-singletask-{t}-v0", True, 10.0, 0.995, "min"),
    ("fino", 68, "antsoccer-arena-navigate-singletask-{t}-v0", True, 30.0, 0.995, "mean"),
    ("fino", 74, "cube-double-play-singletask-{t}-v0", True, 300.0, 0.99, "mean"),
    ("fino", 80, "puzzle-4x4-play-singletask-{t}-v0", True, 1000.0, 0.99, "mean"),
    ("fino", 90, "antmaze-umaze-v2", True, 10.0, 0.99, "mean"),
    ("fino", 92, "antmaze-umaze-diverse-v2", True, 10.0, 0.99, "mean"),
    ("fino", 94, "antmaze-medium-play-v2", True, 10.0, 0.99, "mean"),
    ("fino", 96, "antmaze-medium-diverse-v2", True, 10.0, 0.99, "mean"),
    ("fino", 98, "antmaze-large-play-v2", True, 3.0, 0.99, "mean"),
    ("fino", 100, "antmaze-large-diverse-v2", True, 3.0, 0.99, "mean"),
    ("fino", 102, "pen-cloned-v1", True, 1000.0, 0.99, "min"),
    ("fino", 104, "door-cloned-v1", True, 1000.0, 0.99, "min"),
    ("fino", 106, "hammer-cloned-v1", True, 1000.0, 0.99, "min"),
    ("fino", 108, "relocate-cloned-v1", True, 10000.0, 0.99, "mean"),
]


def dataset_forms(env_name: str) -> dict[str, dict]:
    """The Args an OGBench name (as is) or a D4RL env name (its Minari port; a D4RL file with --d4rl-name) gives."""
    if "singletask" in env_name:
        return {"ogbench": dict(dataset=env_name)}
    task, rest = env_name.split("-", 1)  # antmaze-umaze-v2 -> D4RL/antmaze/umaze-v1, pen-cloned-v1 -> D4RL/pen/cloned-v2
    minari_id = f"D4RL/{task}/{rest.rsplit('-', 1)[0]}-{'v1' if task == 'antmaze' else 'v2'}"
    return {"minari": dict(dataset=minari_id), "file": dict(dataset=f"/data/{env_name}.hdf5", d4rl_name=env_name)}


CASES = [
    pytest.param(algo, online, form, (alpha, gamma, q_agg), id=f"{algo}:{line + i}:{name}:{form_name}")
    for algo, line, env, online, alpha, gamma, q_agg in COMMANDS
    for i, name in enumerate([env.format(t=f"task{k}") for k in range(1, 6)] if "{t}" in env else [env])
    for form_name, form in dataset_forms(name).items()
]


@pytest.mark.parametrize("algo, online, form, expected", CASES)
def test_preset_auto_gives_each_readme_commands_flags(algo, online, form, expected):
    args = fino.resolve_args(fino.Args(algo=algo, online_steps=None if online else 0, **form))
    assert (args.alpha, args.gamma, args.q_agg) == expected

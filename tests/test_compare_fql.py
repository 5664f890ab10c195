"""scripts/compare_fql.py without JAX or real runs: the flag mapping, the log readers on synthetic logs in both
layouts, the check of the resolved flags, and the table's numbers."""

import ast
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

import fino
from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import compare_fql as cf  # noqa: E402

# every budget flag of compare_fql.Args (all values off their defaults) -> the official flag(s) it must set
BUDGET = dict(
    dataset=("antmaze-large-navigate-singletask-task3-v0", ["env_name"]),
    offline_steps=(3000, ["offline_steps"]),
    online_steps=(6000, ["online_steps"]),
    buffer_size=(12345, ["buffer_size"]),
    batch_size=(64, ["agent.batch_size"]),
    alpha=(3.5, ["agent.alpha"]),
    gamma=(0.995, ["agent.discount"]),
    q_agg=("min", ["agent.q_agg"]),
    tau=(0.01, ["agent.tau"]),
    learning_rate=(1e-3, ["agent.lr"]),
    flow_steps=(7, ["agent.flow_steps"]),
    eval_every=(1500, ["eval_interval"]),
    eval_episodes=(4, ["eval_episodes"]),
    log_every=(250, ["log_interval"]),
)
HARNESS = {"fql_dir", "jax_python", "setup_jax", "seeds", "jobs", "work_dir", "out", "skip_runs", "dataset_dir"}
OFFICIAL_FLAGS = (  # main.py's flags and agents/fql.py's config keys at 719d044, the ones the mapping uses
    "run_group seed env_name save_dir offline_steps online_steps buffer_size log_interval eval_interval save_interval "
    "eval_episodes video_episodes balanced_sampling".split()
)
OFFICIAL_CONFIG = (
    "lr batch_size actor_hidden_dims value_hidden_dims layer_norm actor_layer_norm discount tau q_agg alpha "
    "flow_steps normalize_q_loss".split()
)


def budget_args(**extra) -> cf.Args:
    return cf.Args(**{name: value for name, (value, _) in BUDGET.items()}, hidden_dim=48, num_layers=3, **extra)


def parse_ours(command: list[str]) -> dict[str, str]:
    flags, i = {}, 0
    while i < len(command):
        if command[i].startswith("--") and i + 1 < len(command) and not command[i + 1].startswith("--"):
            flags[command[i][2:]], i = command[i + 1], i + 2
        elif command[i].startswith("--"):
            flags[command[i][2:]], i = True, i + 1
        else:
            i += 1
    return flags


def parse_official(command: list[str]) -> dict:
    flags = {}
    for token in command[3:]:
        name, value = token[2:].split("=", 1)
        try:
            flags[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            flags[name] = value
    return flags


def test_every_budget_flag_has_its_official_counterpart_with_the_same_value():
    """All budget flags off their defaults, so a value hard-coded on either side is caught; a budget flag added to
    compare_fql.Args without a counterpart fails the first assertion."""
    assert {f.name for f in dataclasses.fields(cf.Args)} - HARNESS == set(BUDGET) | {"hidden_dim", "num_layers"}
    args = budget_args()
    ours, official = parse_ours(cf.our_command(args, 7, "run")), parse_official(cf.official_command(args, 7, "/x"))
    for name, (value, counterparts) in BUDGET.items():
        assert ours[name.replace("_", "-")] == str(value), name
        for counterpart in counterparts:
            assert official[counterpart] == value, (name, counterpart)
    assert ours["hidden-dim"] == "48" and ours["num-layers"] == "3"
    assert official["agent.actor_hidden_dims"] == official["agent.value_hidden_dims"] == (48, 48, 48)
    assert ours["seed"] == "7" and official["seed"] == 7
    # fixed on one side, set on the other; FQL as its code runs it
    assert ours["algo"] == "fql" and ours["num-critics"] == "2" and ours["no-normalize-q-loss"] is True
    assert official["agent.layer_norm"] is True and official["agent.actor_layer_norm"] is False
    assert official["agent.normalize_q_loss"] is False and official["save_interval"] > 9000
    assert ours["dataset-dir"] == os.path.abspath(args.dataset_dir) == cf.official_command(args, 7, "/x")[2]
    # every flag we pass is one of fino.py's
    fields = {f.name for f in dataclasses.fields(fino.Args)}
    for flag in ours:
        assert flag.replace("-", "_").removeprefix("no_") in fields, flag


def fake_official_tree(root, drop: str = "") -> str:
    os.makedirs(root / "agents")
    defines = "".join(f"flags.DEFINE_integer('{n}', 0, 'x')\n" for n in OFFICIAL_FLAGS if n != drop)
    (root / "main.py").write_text("from absl import flags\n" + defines)
    keys = "".join(f"            {k}=0,\n" for k in OFFICIAL_CONFIG if k != drop)
    (root / "agents" / "fql.py").write_text(f"def get_config():\n    return dict(\n            agent_name='fql',\n{keys})\n")
    return str(root)


def test_official_flags_are_checked_against_the_official_code(tmp_path):
    cf.check_official_flags(budget_args(), fake_official_tree(tmp_path / "full"))
    for drop in ("q_agg", "eval_interval"):
        with pytest.raises(SystemExit, match=drop):
            cf.check_official_flags(budget_args(), fake_official_tree(tmp_path / drop, drop))


def write_our_run(run_dir: str, curves: dict, hparams: dict) -> None:
    with SummaryWriter(run_dir) as writer:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hparams.items()))
        for tag, points in curves.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)


def write_official_run(save_dir: str, train: list[dict], evals: list[dict], flags: dict) -> None:
    """main.py's layout: {save_dir}/{project}/{run_group}/{exp_name}/ with CsvLogger files and flags.json."""
    run_dir = os.path.join(save_dir, "dummy", "compare_fql", "sd001_20260101_000000")
    os.makedirs(run_dir)
    for name, rows in (("train.csv", train), ("eval.csv", evals)):
        header = [k for k in rows[0] if k != "step"] + ["step"]  # CsvLogger: the first row's keys, `step` last
        lines = [",".join(header)] + [",".join(str(row.get(k, "")) for k in header) for row in rows]
        with open(os.path.join(run_dir, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(run_dir, "flags.json"), "w") as f:
        json.dump(flags, f)


def resolved(args: cf.Args, seed: int) -> tuple[dict, dict]:
    """What the two codes log when they resolved exactly the mapping: our hyperparameters text, the official flags.json."""
    hparams = {"algo": "fql", "eta": 0.0, "entropy_guidance": False, "exp_name": "fql"}
    flags = {"agent": {"agent_name": "fql"}}
    for _, ours, official in cf.mapping(args, seed):
        hparams.update({name.replace("-", "_"): value for name, value in ours.items()})
        for name, value in official.items():
            if name.startswith("agent."):
                flags["agent"][name[6:]] = list(value) if isinstance(value, tuple) else value
            else:
                flags[name] = value
    return hparams, flags


def test_readers_and_resolved_flags_on_synthetic_logs(tmp_path):
    args = budget_args()
    hparams, flags = resolved(args, 2)
    run_dir = str(tmp_path / "ours")
    write_our_run(run_dir, {"losses/qf_loss": [(250, 0.5), (500, 0.25)], "eval/success": [(3000, 0.2), (9000, 0.8)]}, hparams)
    scalars, text = cf.read_ours(run_dir)
    assert scalars["losses/qf_loss"][0].tolist() == [250, 500] and scalars["losses/qf_loss"][1].tolist() == [0.5, 0.25]
    assert scalars["eval/success"][1].tolist() == pytest.approx([0.2, 0.8])
    assert text["alpha"] == "3.5" and text["q_agg"] == "min" and text["entropy_guidance"] == "False"

    train = [
        {"training/critic/critic_loss": 1.5, "validation/x": 2.0, "step": 250},
        {"training/critic/critic_loss": 0.75, "step": 500},
    ]
    evals = [{"evaluation/success": 0.0, "step": 1}, {"evaluation/success": 0.5, "step": 3000}]
    write_official_run(str(tmp_path / "official"), train, evals, flags)
    columns, logged_flags = cf.read_official(str(tmp_path / "official"))
    assert columns["training/critic/critic_loss"][0].tolist() == [250, 500]
    assert columns["training/critic/critic_loss"][1].tolist() == [1.5, 0.75]
    assert columns["validation/x"][0].tolist() == [250]  # the empty cell of step 500 is skipped
    assert columns["evaluation/success"][0].tolist() == [1, 3000] and "step" not in columns

    assert cf.check_resolved(args, 2, text, logged_flags) == []
    text["tau"], logged_flags["agent"]["value_hidden_dims"], logged_flags["eval_interval"] = "0.005", [48, 48], 100
    problems = cf.check_resolved(args, 2, text, logged_flags)
    assert len(problems) == 3 and any("tau" in p for p in problems) and any("eval_interval" in p for p in problems)
    assert any("value_hidden_dims" in p for p in problems)
    text["tau"], text["eta"] = "0.01", "0.1"  # --algo fql must have turned FINO's noise off
    assert any("eta" in p for p in cf.check_resolved(args, 2, text, resolved(args, 2)[1]))


def test_summary_table_and_seed_band():
    args = cf.Args(seeds=[1, 2, 3], offline_steps=100, online_steps=100, eval_every=50)
    success = {  # (ours, official) eval/success curves; seed 3 of ours lacks its final evaluation
        1: ([(50, 0.1), (100, 0.2), (150, 0.3), (200, 0.4)], [(1, 0.9), (100, 0.0), (200, 1.0)]),
        2: ([(100, 0.4), (200, 0.6)], [(100, 0.5), (200, 0.5)]),
        3: ([(100, 0.6)], [(100, 1.0), (200, 0.0), (200, 0.25)]),  # logged twice: the last one counts
    }
    curve = lambda points: (np.array([s for s, _ in points]), np.array([v for _, v in points]))
    logs = {
        impl: {seed: {cf.METRICS[-1][1 + i]: curve(success[seed][i])} for seed in success} for i, impl in enumerate(cf.IMPLS)
    }
    walls = {"ours/1": 60.0, "ours/2": 120.0, "ours/3": 180.0, "official/1": 30.0, "official/2": 30.0}
    rows = {(r["impl"], r["seed"]): r for r in cf.summarize(args, logs, walls)}
    assert rows["ours", 1]["success_offline"] == 0.2 and rows["ours", 1]["success_final"] == 0.4
    assert math.isnan(rows["ours", 3]["success_final"]) and math.isnan(rows["official", 3]["wall_s"])
    assert rows["official", 3]["success_final"] == 0.25
    assert cf.mean_of(list(rows.values()), "ours", "success_final") == pytest.approx(0.5)  # NaN left out
    assert cf.mean_of(list(rows.values()), "official", "success_offline") == pytest.approx(0.5)
    text = cf.table(args, list(rows.values()), "719d04417cb0")
    assert "| 3 | 0.60 | - | 1.00 | 0.25 | 180 | - |" in text
    assert "| mean | 0.40 | 0.50 | 0.50 | 0.58 | 120 | 30 |" in text
    assert "official FQL (JAX) at 719d044\n" in text

    steps, mean, low, high = cf.seed_band([curve(success[1][0]), curve(success[2][0])])  # steps both logged
    assert steps.tolist() == [100, 200] and mean.tolist() == pytest.approx([0.3, 0.5])
    assert low.tolist() == pytest.approx([0.2, 0.4]) and high.tolist() == pytest.approx([0.4, 0.6])


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (dict(offline_steps=1000, eval_every=300), "must divide"),
        (dict(online_steps=500, eval_every=1000), "must divide"),
        (dict(seeds=[1, 1]), "distinct"),
        (dict(fql_dir=None), "--fql-dir"),
    ],
)
def test_bad_arguments_end_in_one_error_line(flags, fragment):
    args = dataclasses.replace(cf.Args(fql_dir="x"), **flags)
    with pytest.raises(SystemExit, match=fragment):
        cf.check_args(args)


def test_official_source_from_a_work_tree_a_bare_directory_or_plain_files(tmp_path):
    tree = tmp_path / "fql"
    tree.mkdir()
    (tree / "main.py").write_text("print('main')\n")
    git = lambda *a: subprocess.run(["git", *a], cwd=tree, check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("add", "main.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x")
    commit = git("rev-parse", "HEAD")
    assert cf.official_source(str(tree), str(tmp_path / "unused")) == (str(tree), commit)
    (tree / "main.py").write_text("print('changed')\n")
    assert cf.official_source(str(tree), str(tmp_path / "unused"))[1] == commit + " (modified)"
    subprocess.run(["git", "clone", "-q", "--bare", str(tree), str(tmp_path / "bare")], check=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert cf.official_source(str(tmp_path / "bare"), str(scratch)) == (str(scratch), commit)
    assert (scratch / "main.py").read_text() == "print('main')\n"
    plain = tree / "copy"  # files inside another repository: not a checkout of its own
    plain.mkdir()
    (plain / "main.py").write_text("")
    assert cf.official_source(str(plain), str(scratch))[1] == "unknown"
    with pytest.raises(SystemExit, match="bare git"):
        cf.official_source(str(tmp_path / "scratch" / ".."), str(scratch))

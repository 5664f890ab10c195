"""Bad datasets end with one `error:` line naming the data and what is wrong, checked once at load, for every source."""

import glob
import os
import shutil

import h5py
import numpy as np
import pytest

from common.datasets import ACTION_CLIP, load_dataset
from tests.conftest import assert_one_line_error, run_script
from tests.fixtures import write_d4rl_file, write_minari_dataset, write_ogbench_dataset

OGBENCH_NAME = "pointmaze-medium-navigate-singletask-v0"


@pytest.fixture(scope="module")
def hopper_arrays(tmp_path_factory):
    """The arrays of a small valid D4RL-layout Hopper file (3 episodes), to be broken by each case."""
    path = str(tmp_path_factory.mktemp("good") / "hopper.npz")
    write_d4rl_file(path, "Hopper-v5", num_episodes=3, max_steps=10)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def save(path, arrays):
    if path.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for k, v in arrays.items():
                f.create_dataset(k, data=v)


def with_value(arrays, key, row, value, column=None):
    a = arrays[key].astype(np.float32).copy()
    if column is None:
        a[row] = value
    else:
        a[row, column] = value
    return dict(arrays, **{key: a})


def truncated(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


# (case id, file name, how to write it from the valid arrays, env id, fragment of the one error line)
FILE_CASES = [
    ("nan-reward", "x.npz", lambda p, a: save(p, with_value(a, "rewards", 7, np.nan)), "Hopper-v5", "'rewards' has a non-finite value (nan) at row 7"),
    ("inf-obs-hdf5", "x.hdf5", lambda p, a: save(p, with_value(a, "observations", 4, np.inf, 2)), "Hopper-v5", "'observations' has a non-finite value (inf) at row 4"),
    ("nan-next-obs", "x.npz", lambda p, a: save(p, with_value(a, "next_observations", 12, np.nan, 0)), "Hopper-v5", "'next_observations' has a non-finite value (nan) at row 12"),
    ("nan-action", "x.hdf5", lambda p, a: save(p, with_value(a, "actions", 0, -np.nan, 1)), "Hopper-v5", "'actions' has a non-finite value (nan) at row 0"),
    ("short-rewards", "x.npz", lambda p, a: save(p, dict(a, rewards=a["rewards"][:-3])), "Hopper-v5", "arrays have different lengths"),
    ("missing-timeouts", "x.hdf5", lambda p, a: save(p, {k: v for k, v in a.items() if k != "timeouts"}), "Hopper-v5", "lacks timeouts"),
    ("no-rows", "x.npz", lambda p, a: save(p, {k: v[:0] for k, v in a.items()}), "Hopper-v5", "has no rows"),
    ("timeout-only", "x.npz", lambda p, a: save(p, {k: v[:1] for k, v in a.items() if k != "next_observations"} | {"timeouts": np.ones(1, bool)}), "Hopper-v5", "has no transition"),
    ("scalar-rewards", "x.npz", lambda p, a: save(p, dict(a, rewards=np.float32(1.0))), "Hopper-v5", "'rewards' is a scalar"),
    ("string-array", "x.npz", lambda p, a: save(p, dict(a, terminals=a["terminals"].astype(str))), "Hopper-v5", "'terminals' has non-numeric dtype"),
    ("fractional-terminal", "x.npz", lambda p, a: save(p, with_value(a, "terminals", 5, 0.5)), "Hopper-v5", "'terminals' must hold 0/1 flags but has 0.5 at row 5"),
    ("obs-dim", "x.npz", lambda p, a: save(p, a), "Walker2d-v5", "has 11-d observations but Walker2d-v5 has 17-d observations"),
    ("action-dim", "x.npz", lambda p, a: save(p, dict(a, actions=a["actions"][:, :2])), "Hopper-v5", "has 2-d actions but Hopper-v5 has 3-d ones"),
    ("actions-unscaled", "x.npz", lambda p, a: save(p, dict(a, actions=a["actions"] * 3.0)), "Hopper-v5", "have actions outside Hopper-v5's action bounds [-1, 1], by up to"),
    ("not-npz", "x.npz", lambda p, a: open(p, "w").write("observations,actions\n1,2\n"), "Hopper-v5", "is not an .npz archive"),
    ("npy-as-npz", "x.npz", lambda p, a: np.save(open(p, "wb"), a["rewards"]), "Hopper-v5", "is not an .npz archive"),
    ("truncated-npz", "x.npz", lambda p, a: (save(p, a), truncated(p)), "Hopper-v5", "is not an .npz archive"),
    ("pickled-npz", "x.npz", lambda p, a: np.savez(p, **dict(a, rewards=np.array([{}] * len(a["rewards"]), dtype=object))), "Hopper-v5", "cannot be read as an .npz archive"),
    ("empty-hdf5", "x.hdf5", lambda p, a: h5py.File(p, "w").close(), "Hopper-v5", "HDF5 file without top-level arrays"),
    ("groups-only-hdf5", "x.hdf5", lambda p, a: h5py.File(p, "w").create_group("infos").create_dataset("qpos", data=np.zeros(3)), "Hopper-v5", "HDF5 file without top-level arrays"),
    ("truncated-hdf5", "x.h5", lambda p, a: (save(p, a), truncated(p)), "Hopper-v5", "cannot be read as an HDF5 file"),
    ("text-as-hdf5", "x.hdf5", lambda p, a: open(p, "w").write("not hdf5"), "Hopper-v5", "cannot be read as an HDF5 file"),
    ("directory", "x.npz", lambda p, a: os.makedirs(p), "Hopper-v5", "is a directory, not a file"),
    ("other-suffix", "x.pkl", lambda p, a: open(p, "w").write("x"), "Hopper-v5", "must end in .npz, .hdf5, .h5"),
]  # fmt: skip


def assert_one_line(excinfo, fragment: str, *names: str) -> None:
    message = str(excinfo.value)
    assert message.startswith("error:") and "\n" not in message, message
    assert fragment in message and all(name in message for name in names), message


@pytest.mark.parametrize("case, file_name, write, env_id, fragment", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_dataset_file_ends_with_one_line(tmp_path, hopper_arrays, case, file_name, write, env_id, fragment):
    path = str(tmp_path / file_name)
    write(path, hopper_arrays)
    with pytest.raises(SystemExit) as excinfo:
        load_dataset(path, env_id=env_id)
    assert_one_line(excinfo, fragment, path)


def test_the_valid_file_loads(tmp_path, hopper_arrays):
    """The cases above break a file that loads: each error comes from the one defect put in."""
    path = str(tmp_path / "x.npz")
    save(path, hopper_arrays)
    assert len(load_dataset(path, env_id="Hopper-v5")) == len(hopper_arrays["rewards"])


@pytest.fixture(scope="module")
def minari_source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("minari-src"))
    write_minari_dataset(root, "test/hopper/bad-v0", "Hopper-v5", num_episodes=3, max_steps=8)
    return root


def break_minari_reward(main_data):
    with h5py.File(main_data, "r+") as f:
        f["episode_1/rewards"][2] = np.nan


def drop_minari_actions(main_data):
    with h5py.File(main_data, "r+") as f:
        del f["episode_2/actions"]


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (
            break_minari_reward,
            "Minari dataset 'test/hopper/bad-v0': 'rewards' has a non-finite value (nan) at episode 1, step 2",
        ),
        (truncated, "cannot be read"),
        (drop_minari_actions, "cannot be read"),
    ],
    ids=["nan-reward", "truncated-file", "missing-array"],
)
def test_bad_minari_dataset_ends_with_one_line(tmp_path, monkeypatch, minari_source, damage, fragment):
    root = str(tmp_path / "minari")
    shutil.copytree(minari_source, root)
    monkeypatch.setenv("MINARI_DATASETS_PATH", root)
    (main_data,) = glob.glob(os.path.join(root, "test", "hopper", "bad-v0", "data", "*.hdf5"))
    damage(main_data)
    with pytest.raises(SystemExit) as excinfo:
        load_dataset("test/hopper/bad-v0", dataset_dir=root)
    assert_one_line(excinfo, fragment, "test/hopper/bad-v0")


@pytest.fixture(scope="module")
def ogbench_source(tmp_path_factory):
    dataset_dir = str(tmp_path_factory.mktemp("ogbench-src"))
    write_ogbench_dataset(dataset_dir, OGBENCH_NAME, num_episodes=2, episode_length=12)
    return dataset_dir


def edit_npz(path, edit):
    with np.load(path) as f:
        raw = {k: f[k] for k in f.files}
    np.savez(path, **edit(raw))


@pytest.mark.parametrize(
    "suffix, damage, fragment",
    [
        ("", lambda p: edit_npz(p, lambda r: with_value(r, "observations", 5, np.nan, 1)), "'observations' has a non-finite value (nan) at row 5"),
        ("-val", truncated, "is not an .npz archive"),
        ("", lambda p: edit_npz(p, lambda r: {k: v for k, v in r.items() if k != "qpos"}), "lacks 'qpos', which OGBench needs to relabel"),
        ("-val", lambda p: edit_npz(p, lambda r: dict(r, actions=r["actions"][:-1])), "arrays have different lengths"),
    ],
    ids=["nan-observation", "truncated-val", "missing-qpos", "short-val-actions"],
)  # fmt: skip
def test_bad_ogbench_dataset_ends_with_one_line(tmp_path, ogbench_source, suffix, damage, fragment):
    dataset_dir = str(tmp_path / "ogbench")
    shutil.copytree(ogbench_source, dataset_dir)
    damage(os.path.join(dataset_dir, f"pointmaze-medium-navigate-v0{suffix}.npz"))
    with pytest.raises(SystemExit) as excinfo:
        load_dataset(OGBENCH_NAME, dataset_dir=dataset_dir)
    assert_one_line(excinfo, fragment, "pointmaze-medium-navigate-v0")


def test_slightly_outside_actions_are_clipped_with_a_note(tmp_path, hopper_arrays, capsys):
    path = str(tmp_path / "x.npz")
    save(path, dict(hopper_arrays, actions=hopper_arrays["actions"] * 1.05))
    data = load_dataset(path, env_id="Hopper-v5")
    outside = int((np.abs(hopper_arrays["actions"] * 1.05).max(axis=1) > 1).sum())
    assert outside > 0 and data.actions.abs().max().item() <= 1.0 - 1e-5 + 1e-7
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:") and "action bounds" in line]
    assert len(notes) == 1 and f"{outside} of {len(data)} transitions" in notes[0] and "clipped" in notes[0]


def gaussian_raw_actions(actions, std=1.0, seed=0):
    """The raw samples of a Gaussian policy with mean `actions` (before the clip the simulator applies)."""
    return (actions + std * np.random.default_rng(seed).standard_normal(actions.shape)).astype(np.float32)


def test_raw_gaussian_actions_are_refused_naming_clip_actions(tmp_path, hopper_arrays):
    path = str(tmp_path / "raw.npz")
    raw = gaussian_raw_actions(hopper_arrays["actions"])
    assert np.abs(raw).max() > 2.0  # far beyond ACTION_TOLERANCE
    save(path, dict(hopper_arrays, actions=raw))
    with pytest.raises(SystemExit) as excinfo:
        load_dataset(path, env_id="Hopper-v5")
    assert_one_line(excinfo, "outside Hopper-v5's action bounds [-1, 1]", path, "rerun with --clip-actions")


def test_clip_actions_loads_raw_gaussian_actions_with_a_note(tmp_path, hopper_arrays, capsys):
    path = str(tmp_path / "raw.npz")
    raw = gaussian_raw_actions(hopper_arrays["actions"])
    save(path, dict(hopper_arrays, actions=raw))
    data = load_dataset(path, env_id="Hopper-v5", clip_actions=True)
    actions = data.actions.numpy()
    outside = np.abs(raw) > 1.0
    rows = outside.any(axis=1)
    assert 0 < rows.sum() < len(raw) and len(data) == len(raw)
    assert np.abs(actions).max() <= ACTION_CLIP
    np.testing.assert_array_equal(
        actions[rows], np.clip(raw[rows].astype(np.float64), -ACTION_CLIP, ACTION_CLIP).astype(np.float32)
    )
    np.testing.assert_array_equal(actions[~rows], raw[~rows])
    excess = np.abs(raw.astype(np.float64))[outside] - 1.0
    notes = [line for line in capsys.readouterr().out.splitlines() if "action bounds" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: dataset file {path}: --clip-actions clipped"), notes
    assert f"{rows.sum()} of {len(raw)} transitions ({outside.sum()} of {raw.size} entries)" in notes[0], notes[0]
    assert f"by up to {excess.max():.3g} of the half-range (mean {excess.mean():.3g} " in notes[0], notes[0]


def test_clip_actions_leaves_actions_inside_the_bounds_alone(tmp_path, hopper_arrays, capsys):
    path = str(tmp_path / "x.npz")
    save(path, hopper_arrays)
    data = load_dataset(path, env_id="Hopper-v5", clip_actions=True)
    np.testing.assert_array_equal(data.actions.numpy(), hopper_arrays["actions"])
    notes = [line for line in capsys.readouterr().out.splitlines() if "action bounds" in line]
    assert len(notes) == 1 and "none clipped" in notes[0], notes


def scale_minari_actions(root):
    (main_data,) = glob.glob(os.path.join(root, "test", "hopper", "bad-v0", "data", "*.hdf5"))
    with h5py.File(main_data, "r+") as f:
        for episode in f.values():
            episode["actions"][...] = episode["actions"][()] * 3.0


def scale_ogbench_actions(dataset_dir):
    for suffix in ("", "-val"):
        edit_npz(
            os.path.join(dataset_dir, f"pointmaze-medium-navigate-v0{suffix}.npz"),
            lambda r: dict(r, actions=r["actions"] * 3.0),
        )


@pytest.mark.parametrize("source", ["minari", "ogbench"])
def test_clip_actions_applies_to_every_source(tmp_path, monkeypatch, minari_source, ogbench_source, capsys, source):
    """Minari and OGBench data with actions 3x their env's bounds: refused by default, clipped with one note per split."""
    root = str(tmp_path / source)
    monkeypatch.setenv("MINARI_DATASETS_PATH", root)  # restored after the test (the loader sets it from dataset_dir)
    shutil.copytree(minari_source if source == "minari" else ogbench_source, root)
    (scale_minari_actions if source == "minari" else scale_ogbench_actions)(root)
    name, splits = ("test/hopper/bad-v0", 1) if source == "minari" else (OGBENCH_NAME, 2)
    with pytest.raises(SystemExit) as excinfo:
        load_dataset(name, dataset_dir=root)
    assert_one_line(excinfo, "action bounds", "rerun with --clip-actions")
    data = load_dataset(name, dataset_dir=root, clip_actions=True)
    assert data.actions.abs().max().item() <= ACTION_CLIP
    notes = [line for line in capsys.readouterr().out.splitlines() if "--clip-actions clipped" in line]
    assert len(notes) == splits, notes


def test_flowq_refuses_a_nan_reward_file_without_traceback(tmp_path, hopper_arrays):
    """End to end: the NaN-reward D4RL-layout file that used to train to the end now stops flowq.py before training."""
    path = str(tmp_path / "nan_reward.npz")
    save(path, with_value(hopper_arrays, "rewards", 3, np.nan))
    result = run_script(tmp_path, "flowq.py", "--dataset", path, "--env-id", "Hopper-v5", "--total-steps", "1", "--no-cuda")
    assert_one_line_error(result, "'rewards' has a non-finite value (nan) at row 3")

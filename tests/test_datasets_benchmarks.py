"""Scores comparable with the papers' tables: D4RL reference scores for D4RL-named files (more in later tests)."""

import h5py
import numpy as np
import pytest

from common.datasets import D4RL_REF_SCORES, load_dataset
from tests.fixtures import write_d4rl_file


def test_d4rl_reference_table_matches_d4rl_infos():
    """Spot values copied from d4rl/infos.py (REF_MIN_SCORE, REF_MAX_SCORE) and the table's coverage."""
    assert D4RL_REF_SCORES["hopper-medium-v2"] == (-20.272305, 3234.3)
    assert D4RL_REF_SCORES["halfcheetah-medium-expert-v2"] == (-280.178953, 12135.0)
    assert D4RL_REF_SCORES["walker2d-medium-replay-v2"] == (1.629008, 4592.3)
    assert D4RL_REF_SCORES["ant-random-v0"] == (-325.6, 3879.7)
    assert D4RL_REF_SCORES["pen-human-v1"] == (96.262799, 3076.8331017826877)
    assert D4RL_REF_SCORES["hammer-cloned-v0"] == (-274.856578, 12794.134825156867)
    assert D4RL_REF_SCORES["door-expert-v1"] == (-56.512833, 2880.5693087298737)
    assert D4RL_REF_SCORES["relocate-human-v1"] == (-6.425911, 4233.877797728884)
    assert D4RL_REF_SCORES["antmaze-large-diverse-v2"] == (0.0, 1.0) == D4RL_REF_SCORES["antmaze-umaze-v0"]
    assert D4RL_REF_SCORES["kitchen-mixed-v0"] == (0.0, 4.0)
    for task in ("halfcheetah", "hopper", "walker2d"):
        for kind in ("random", "medium", "medium-replay", "medium-expert", "expert"):
            assert f"{task}-{kind}-v2" in D4RL_REF_SCORES
    for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"):
        assert f"antmaze-{maze}-v0" in D4RL_REF_SCORES and f"antmaze-{maze}-v2" in D4RL_REF_SCORES
    assert len(D4RL_REF_SCORES) == 4 * (5 * 3 + 2) + 12 + 4 * 3 * 2 + 3


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("d4rl") / "hopper-medium-v2.hdf5")
    write_d4rl_file(path, "Hopper-v5", num_episodes=2, max_steps=10)
    return path


def test_d4rl_named_file_reports_the_normalized_score(hopper_file, capsys):
    data = load_dataset(hopper_file, env_id="Hopper-v5")
    assert data.metric == "normalized_score"
    assert data.normalize_score(3234.3) == pytest.approx(100.0) and data.normalize_score(-20.272305) == pytest.approx(0.0)
    assert data.normalize_score(1607.0) == pytest.approx(100 * (1607.0 + 20.272305) / (3234.3 + 20.272305))
    assert "note:" not in capsys.readouterr().out


def test_explicit_d4rl_name_scores_any_file(tmp_path, hopper_file, capsys):
    path = str(tmp_path / "mine.npz")
    with h5py.File(hopper_file, "r") as f:
        np.savez(path, **{k: f[k][()] for k in f.keys()})
    data = load_dataset(path, env_id="Hopper-v5", d4rl_name="hopper-expert-v2")
    assert data.metric == "normalized_score" and data.normalize_score(3234.3) == pytest.approx(100.0)

    data = load_dataset(path, env_id="Hopper-v5")  # 'mine' is no D4RL name: raw return, said once
    assert data.metric == "return" and data.normalize_score is None
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no D4RL reference scores" in notes[0] and path in notes[0]

    with pytest.raises(SystemExit) as e:
        load_dataset(path, env_id="Hopper-v5", d4rl_name="hoper-medium-v2")
    assert str(e.value).startswith("error:") and "\n" not in str(e.value) and "hopper-medium-v2" in str(e.value)
    with pytest.raises(SystemExit, match="a walker2d dataset, but evaluated in Hopper-v5"):
        load_dataset(path, env_id="Hopper-v5", d4rl_name="walker2d-medium-v2")
    with pytest.raises(SystemExit, match="only for dataset files"):
        load_dataset("mujoco/hopper/medium-v0", d4rl_name="hopper-medium-v2", dataset_dir=str(tmp_path))

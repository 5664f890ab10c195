"""The three scripts share one skeleton: the common Args block and the shared functions are the same text in each, so a
`diff` between two scripts shows only the algorithms. A change to one copy must be made to all three."""

import inspect
import os

import pytest

import fino
import flowq
import fmer
from tests.conftest import ROOT

SCRIPTS = (fmer, fino, flowq)
SHARED = (
    "CriticEnsemble",
    "evaluate",
    "require",
    "speed_up",
    "check_finite",
    "request_stop",
    "save_checkpoint",
    "load_checkpoint",
    "resume_args",
    "restore",
    "rng_states",
)


@pytest.mark.parametrize("name", SHARED)
def test_shared_code_is_the_same_text_in_all_three_scripts(name):
    sources = {module.__name__: inspect.getsource(getattr(module, name)) for module in SCRIPTS}
    assert len(set(sources.values())) == 1, f"{name} differs between {', '.join(sources)}"


def test_the_common_args_block_is_the_same_text_in_all_three_scripts():
    """From `class Args:` to the first blank line: the flags every script has (experiment, seed, device, speed path,
    checkpoints, run folder, resume), word for word."""
    blocks = set()
    for module in SCRIPTS:
        text = open(os.path.join(ROOT, f"{module.__name__}.py")).read()
        start = text.index("class Args:\n")
        blocks.add(text[start : text.index("\n\n", start)])
    assert len(blocks) == 1
    assert "    resume: str | None = None" in blocks.pop()


def test_save_checkpoint_replaces_no_file_when_a_later_write_fails(tmp_path, monkeypatch):
    """A replay buffer and its checkpoint are written together: if the second write dies (disk full, a kill), both
    files of the previous step stay as they were, so --resume still finds a checkpoint and a buffer of one step."""
    buffer_path, checkpoint_path = str(tmp_path / "buffer.pt"), str(tmp_path / "fmer.pt")
    fmer.save_checkpoint((buffer_path, {"global_step": 1}), (checkpoint_path, {"global_step": 1}))
    real_save = fmer.torch.save

    def save_then_fail(obj, path):
        if path.startswith(checkpoint_path):
            raise OSError("disk full")
        real_save(obj, path)

    monkeypatch.setattr(fmer.torch, "save", save_then_fail)
    with pytest.raises(OSError):
        fmer.save_checkpoint((buffer_path, {"global_step": 2}), (checkpoint_path, {"global_step": 2}))
    monkeypatch.undo()
    assert [fmer.torch.load(p)["global_step"] for p in (buffer_path, checkpoint_path)] == [1, 1]

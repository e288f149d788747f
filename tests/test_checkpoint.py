import pytest
import torch

from recipes.callbacks import AtomicCheckpointIO
from tarsier_train.checkpoint import find_latest_checkpoint, resolve_resume


def _touch(path, content=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    _touch(tmp_path / "checkpoints" / "step-000100.ckpt")
    best = _touch(tmp_path / "checkpoints" / "step-001000.ckpt")
    _touch(tmp_path / "checkpoints" / "step-000200.ckpt")
    _touch(tmp_path / "checkpoints" / "step-002000.ckpt.partial")  # an interrupted save
    assert find_latest_checkpoint(tmp_path) == best


def test_resume_modes(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing to resume yet: a fresh start
    ckpt = _touch(tmp_path / "checkpoints" / "step-000002.ckpt")
    assert resolve_resume("auto", tmp_path) == ckpt
    assert resolve_resume(str(ckpt), tmp_path) == ckpt
    with pytest.raises(ValueError, match="resume=auto"):
        resolve_resume(None, tmp_path)
    with pytest.raises(FileNotFoundError, match="allowed: null, auto"):
        resolve_resume(str(tmp_path / "missing.ckpt"), tmp_path)


def test_atomic_save_round_trips(tmp_path):
    path = tmp_path / "checkpoints" / "step-000001.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
    assert list(path.parent.iterdir()) == [path]


def test_interrupted_save_leaves_previous_checkpoint_valid(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    old = tmp_path / "checkpoints" / "step-000001.ckpt"
    io.save_checkpoint({"step": 1}, old)

    def crash_midway(checkpoint, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, tmp_path / "checkpoints" / "step-000002.ckpt")
    assert find_latest_checkpoint(tmp_path) == old
    assert torch.load(old)["step"] == 1

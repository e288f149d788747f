"""Every config file composes and validates; bad configs fail before compute with a useful message."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tarsier_train.config import ConfigError, redact, validate_config

from conftest import REPO, run_train

CONF = REPO / "conf"
GROUP_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF)


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=False)


def _required_values(group: str, option: str) -> list[str]:
    if (group, option) == ("model", "qwen2_vl"):
        return ["model.path=/models/qwen"]
    if (group, option) == ("data", "shards"):
        return ["data.train_shards=/d/train-*.tar", "data.val_shards=/d/val-*.tar"]
    if (group, option) == ("data", "mixture"):
        return ["data.val_shards=/d/val-*.tar"]
    return []


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_config_file_composes_and_validates(path: Path):
    group, option = path.parent.relative_to(CONF).as_posix(), path.stem
    overrides = ["recipe=sft", f"{group}={option}", *_required_values(group, option)]
    validate_config(_compose(overrides))


def test_missing_required_value_is_named():
    with pytest.raises(ConfigError, match=r"model\.path: required value is missing"):
        validate_config(_compose(["recipe=sft", "model=qwen2_vl"]))


def test_unknown_argument_names_key_and_allowed_values():
    cfg = _compose(["recipe=sft", "+data.batchsize=4", "+objective.lr=3"])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    message = str(error.value)
    assert "data.batchsize: not an argument of datamodules.toyworld.ToyWorldDataModule" in message
    assert "batch_size" in message and "num_frames" in message
    assert "objective.lr: not an argument of recipes.lm.LMRecipe" in message  # both problems in one error


def test_bad_target_is_reported():
    with pytest.raises(ConfigError, match=r"data\._target_='datamodules.nope.Missing' cannot be imported"):
        validate_config(_compose(["recipe=sft", "data._target_=datamodules.nope.Missing"]))


def test_redact_hides_secret_looking_values():
    assert redact({"a": {"api_key": "s3cret", "wandb_token": "t"}, "lr": 1}) == {
        "a": {"api_key": "<redacted>", "wandb_token": "<redacted>"}, "lr": 1}


@pytest.mark.parametrize("args, expected", [
    (["recipe=nosuch"], ["recipe", "sft"]),
    (["recipe=sft", "model=nosuch"], ["model", "tiny_qwen2_vl", "qwen2_vl"]),
    (["recipe=sft", "data=nosuch"], ["data", "toyworld", "shards"]),
    (["recipe=sft", "optim.lrr=1"], ["optim.lrr"]),
    (["recipe=sft", "+trainer.max_stepz=3"], ["trainer.max_stepz", "max_steps"]),
    (["recipe=sft", "resume=/nope/step-000001.ckpt"], ["resume", "auto"]),
    ([], ["recipe"]),
])
def test_bad_command_lines_fail_before_compute(args, expected, tmp_path, cache_root):
    result = run_train(args, cwd=tmp_path, cache_root=cache_root, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for word in expected:
        assert word in output, output[-3000:]
    assert "building model" not in output  # nothing was built
    assert not (tmp_path / "outputs" / "sft" / "checkpoints").exists()


def test_choice_values_are_checked_against_their_literals():
    with pytest.raises(ConfigError, match=r"data\.frame_sampling='random': allowed values are uniform, segment, fps"):
        validate_config(_compose(["recipe=sft", "data.frame_sampling=random"]))

"""Every config file composes and validates; bad configs fail before compute with a useful message."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tarsier_train.config import ConfigError, redact, validate_config

from conftest import REPO, run_train

CONF = REPO / "conf"
GROUP_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF and p.parent.name != "common")


@pytest.fixture(autouse=True)
def _clear_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=False)


SHARDS = ["data.train_shards=/d/train-*.tar", "data.val_shards=/d/val-*.tar"]
STAGES = {  # the values each stage needs from its user
    "sft": [],
    "pretrain": ["model.path=/models/qwen", "data.sources=[{shards: /d/a-*.tar}]", "data.val_shards=/d/val-*.tar"],
    "sft_grounded": ["init_from=/runs/pretrain", *SHARDS],
    "sft_instruct": ["init_from=/runs/sft_grounded", *SHARDS],
    "dpo": ["init_from=/runs/sft_instruct", *SHARDS],
    "dpo_precompute": ["init_from=/runs/sft_instruct", *SHARDS],
    "sample": ["init_from=/runs/sft_instruct", *SHARDS],
    "evaluate": ["benchmark=toyworld_dream", "init_from=/runs/sft"],
}
# what each benchmark or judge option needs from its user, under recipe=evaluate
EVALUATE = {"benchmark": ["benchmark.annotations=/b/a.jsonl", "benchmark.video_dir=/b/videos"],
            "judge": ["judge.base_url=http://127.0.0.1:8000/v1", "judge.model=judge"]}


def _overrides(group: str, option: str) -> list[str]:
    if group == "recipe":
        return [f"recipe={option}", *STAGES[option]]
    if group == "experiment":  # experiment=toyworld_<stage> scales that stage down: it needs nothing more
        return [f"recipe={option.removeprefix('toyworld_')}", f"experiment={option}"]
    if group in EVALUATE or (group, option) in (("data", "benchmark"), ("objective", "evaluate")):
        required = EVALUATE[group] if group in EVALUATE and option not in ("toyworld_dream", "exact") else []
        benchmark = [] if group == "benchmark" else ["benchmark=toyworld_dream"]
        return ["recipe=evaluate", *benchmark, f"{group}={option}", *required]
    return ["recipe=sft", f"{group}={option}", *_required_values(group, option)]


def _required_values(group: str, option: str) -> list[str]:
    if (group, option) in (("model", "qwen2_vl"), ("model", "qwen2_5_vl"), ("model", "qwen3_vl"), ("model", "tarsier1")):
        return ["model.path=/models/local"]
    if (group, option) in (("data", "shards"), ("data", "pairs"), ("data", "sampling")):
        return ["data.train_shards=/d/train-*.tar", "data.val_shards=/d/val-*.tar"]
    if (group, option) == ("data", "mixture"):
        return ["data.val_shards=/d/val-*.tar"]
    return []


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_config_file_composes_and_validates(path: Path):
    group, option = path.parent.relative_to(CONF).as_posix(), path.stem
    validate_config(_compose(_overrides(group, option)))


def test_stage_recipes_default_to_tarsier2_values():
    """DESIGN.md's table: lr, warm-up, steps per stage; SFT-1 tags events with frames; 16 frames for SFT."""
    expected = {"pretrain": (2e-5, 1000, 200_000), "sft_grounded": (2e-5, 250, 5000), "sft_instruct": (2e-6, 250, 5000),
                "dpo": (1e-6, 100, 1000)}
    for stage, (lr, warmup, steps) in expected.items():
        cfg = _compose(_overrides("recipe", stage))
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.trainer.max_steps) == (lr, warmup, steps), stage
        assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.grad_clip) == ([0.9, 0.999], 1e-6, 0.01, 1.0)
        assert (cfg.model.dtype, cfg.trainer.precision, cfg.data.max_pixels) == ("bfloat16", "bf16-mixed", 460800)
        assert cfg.run_name == stage
    assert _compose(_overrides("recipe", "sft_grounded")).data.task == "video/grounding"
    assert _compose(_overrides("recipe", "sft_instruct")).data.task is None
    assert list(_compose(_overrides("recipe", "pretrain")).data.num_frames) == [8, 16, 32, 64, 128]
    assert _compose(_overrides("recipe", "sft_instruct")).model.path == "/runs/sft_grounded"  # init_from is the model
    dpo = _compose(_overrides("recipe", "dpo")).objective.loss
    assert (dpo.beta, dpo.loss_type) == (0.1, "sigmoid")
    precompute = _compose(_overrides("recipe", "dpo_precompute"))
    assert (precompute.mode, precompute.callbacks.checkpoint, precompute.objective.reference) == ("predict", None, "precomputed")


def test_unknown_mode_is_named_with_the_allowed_values():
    with pytest.raises(ConfigError, match="mode='train': allowed values are fit, predict"):
        validate_config(_compose(["recipe=sft", "mode=train"]))


def test_evaluate_without_a_benchmark_names_the_benchmarks():
    with pytest.raises(Exception, match="You must specify 'benchmark'") as error:
        _compose(["recipe=evaluate"])
    assert "toyworld_dream" in str(error.value) and "dream1k" in str(error.value)


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
    assert redact({"a": {"api_key": "s3cret", "wandb_token": "t", "max_new_tokens": 64}, "Password": "p", "lr": 1}) == {
        "a": {"api_key": "<redacted>", "wandb_token": "<redacted>", "max_new_tokens": 64}, "Password": "<redacted>",
        "lr": 1}


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


def test_low_precision_weights_and_unknown_dtypes_are_refused_before_compute():
    """Training bf16 weights directly rounds Tarsier2-sized updates away: refused, with what to use instead."""
    with pytest.raises(ConfigError, match=r"trainer\.precision=bf16-true: .*allowed for training: 32-true, bf16-mixed"):
        validate_config(_compose(["recipe=sft", "trainer.precision=bf16-true"]))
    with pytest.raises(ConfigError, match=r"model\.dtype='bf16': allowed values are float32, bfloat16, float16"):
        validate_config(_compose(["recipe=sft", "model.dtype=bf16"]))
    validate_config(_compose(["recipe=sft", "trainer.precision=bf16-mixed", "model.dtype=bfloat16"]))
    cfg = _compose(["recipe=sft", "model=qwen2_vl", "model.path=/models/qwen"])
    assert cfg.callbacks.hf_export.dtype == "bfloat16"  # exported as loaded, whatever the fp32 masters

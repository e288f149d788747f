"""Config values are held to their schema before anything is built: type and range, each problem naming the key, the
value and what is allowed (the schema: each `_target_`'s signature, tarsier_train.config.schema for the rest)."""

from pathlib import Path

import pytest
import torch

from tarsier_train.config import ConfigError, validate_config
from tarsier_train.config.types import NonEmptyList, PositiveInt, describe, value_problems

from conftest import run_train
from test_config import _clear_hydra, _compose  # noqa: F401 - _clear_hydra: autouse fixture

FRAME_COUNTS = "a positive int or a non-empty list of positive ints"


def _problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        validate_config(_compose(["recipe=sft", *overrides]))
    return str(error.value)


@pytest.mark.parametrize("overrides, expected", [
    # wrong type
    (["data.num_frames=abc"], f"data.num_frames='abc': expected {FRAME_COUNTS}"),
    (["data.batch_size=2.5"], "data.batch_size=2.5: expected a positive int"),
    (["data.batch_size='8'"], "data.batch_size='8': expected a positive int"),
    (["seed=abc"], "seed='abc': expected an int"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]: expected a list of 2 numbers in [0, 1)"),
    (["callbacks.checkpoint=5"], "callbacks.checkpoint=5: expected a config node with a _target_ or null"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc': expected an int"),  # Lightning's own hint
    # bool is not an int, an int or a word is not a bool
    (["data.batch_size=true"], "data.batch_size=true: expected a positive int"),
    (["model.trainable.llm=1"], "model.trainable.llm=1: expected a bool (true or false)"),
    (["model.gradient_checkpointing=yes"], "model.gradient_checkpointing='yes': expected a bool (true or false)"),
    # out of range
    (["data.batch_size=-3"], "data.batch_size=-3: must be >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1: must be >= 0"),
    (["data.num_frames=0"], "data.num_frames=0: must be >= 1"),
    (["data.target_fps=0"], "data.target_fps=0: must be > 0"),
    (["data.max_skipped_fraction=1.5"], "data.max_skipped_fraction=1.5: must be in [0, 1]"),
    (["data.min_pixels=-1"], "data.min_pixels=-1: must be >= 1"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2: must be in [0, 1]"),
    (["optim.vision_layer_decay=0"], "optim.vision_layer_decay=0: must be in (0, 1]"),
    (["optim.lr_scale.vision=-1"], "optim.lr_scale.vision=-1: must be >= 0"),
    (["model.lora.dropout=1.0"], "model.lora.dropout=1.0: must be in [0, 1)"),
    (["callbacks.checkpoint.keep_last=0"], "callbacks.checkpoint.keep_last=0: must be >= 1"),
    (["trainer.max_steps=-1"], "objective.lr_schedule.total_steps=-1: must be >= 1"),  # through ${trainer.max_steps}
    # bad list element, empty list
    (["data.num_frames=[8,0]"], "data.num_frames[1]=0: must be >= 1"),
    (["data.num_frames=[8,x]"], "data.num_frames[1]='x': expected a positive int"),
    (["data.num_frames=[]"], "data.num_frames=[]: must not be empty"),
    (["model.lora.target_modules=[q_proj,3]"], "model.lora.target_modules[1]=3: expected a string"),
    (["data.sources=[{shards: train, weight: 0}]"], "data.sources[0].weight=0: must be > 0"),
    (["data.sources=[{shards: train, num_frames: [8, -1]}]"], "data.sources[0].num_frames[1]=-1: must be >= 1"),
    # choices
    (["data.video_backend=ffmpeg"], "data.video_backend='ffmpeg': allowed values are pyav, decord, torchcodec"),
    (["model.dtype=fp32"], "model.dtype='fp32': allowed values are float32, bfloat16, float16"),
    (["resume=5"], "resume=5: allowed values are null, auto, or a path to a .ckpt file"),
    # unknown and missing keys of the groups without a _target_
    (["+optim.lr_decay=0.5"], "optim.lr_decay: unknown key (allowed: betas, eps, grad_clip, lr, lr_scale, "
                              "min_lr_ratio, vision_layer_decay, warmup_steps, weight_decay)"),
    (["+model.lora.bias=none"], "model.lora.bias: unknown key (allowed: alpha, dropout, parts, rank, target_modules)"),
    (["model.lora.parts=[llm,bogus]"], "model.lora.parts[1]='bogus': allowed values are llm, merger, vision"),
    # the model families' keys
    (["model.dir.family=qwen9"], "model.dir.family='qwen9': allowed values are qwen2_vl, qwen2_5_vl, qwen3_vl"),
    (["model=tiny_tarsier1", "model.dir.image_size=0"], "model.dir.image_size=0: must be >= 1"),
    (["+optim.lr_scale.decoder=2"], "optim.lr_scale.decoder: unknown key (allowed: llm, merger, vision)"),
    (["~optim.eps"], "optim.eps: required value is missing"),
    (["data.sources=[{weight: 1.0}]"], "data.sources[0].shards: required value is missing"),
    (["data.sources=[{shards: train, frames: 8}]"],
     "data.sources[0].frames: unknown key (allowed: frame_sampling, num_frames, shards, task, weight)"),
])
def test_bad_value_names_key_value_and_what_is_allowed(overrides, expected):
    assert expected in _problems(*overrides)


def test_evaluate_values_are_checked_before_the_model_is_built():
    """recipe=evaluate's own keys: the benchmark, its data, the generation, the judge and the scoring."""
    with pytest.raises(ConfigError) as error:
        validate_config(_compose([
            "recipe=evaluate", "benchmark=toyworld_dream", "benchmark.num_clips=0", "data.num_frames=-2",
            "data.batch_size=0", "objective.temperature=-1", "objective.top_p=1.5", "objective.max_new_tokens=0",
            "callbacks.scoring.max_concurrency=0", "callbacks.predictions.commit_every_s=0",
            "judge=autodq", "judge.base_url=http://127.0.0.1:1/v1", "judge.model=m", "judge.max_retries=-1"]))
    message = str(error.value)
    for expected in ("benchmark.num_clips=0: must be >= 1", "data.num_frames=-2: must be >= 1",
                     "data.batch_size=0: must be >= 1", "objective.temperature=-1: must be >= 0",
                     "objective.top_p=1.5", "objective.max_new_tokens=0: must be >= 1",
                     "callbacks.scoring.max_concurrency=0: must be >= 1", "callbacks.predictions.commit_every_s=0",
                     "judge.max_retries=-1: must be >= 0"):
        assert expected in message, message
    with pytest.raises(ConfigError, match=r"benchmark.scoring='accuracy'.*caption"):
        validate_config(_compose(["recipe=evaluate", "benchmark=mvbench", "benchmark.annotations=/a.jsonl",
                                  "benchmark.video_dir=/v", "benchmark.scoring=accuracy"]))


def test_dpo_loss_settings_are_checked_before_the_model_is_built():
    cfg = _compose(["recipe=dpo", "experiment=toyworld_dpo", "objective.loss.beta=0", "objective.loss.loss_type=foo"])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert "objective.loss.beta=0: must be > 0" in str(error.value)
    assert "objective.loss.loss_type='foo': allowed values are sigmoid, hinge" in str(error.value)
    validate_config(_compose(["recipe=dpo", "experiment=toyworld_dpo", "objective.loss.loss_type=[sigmoid,sft]",
                              "objective.loss.loss_weights=[1.0,0.2]"]))


def test_every_problem_is_in_one_error():
    message = _problems("data.num_frames=abc", "data.batch_size=-3", "optim.eps=0", "model.lora.rank=-1")
    assert len(message.splitlines()) == 1 + 4, message


@pytest.mark.parametrize("overrides", [
    ["data.max_pixels=null", "data.total_pixels=null", "data.decode_timeout_s=null", "optim.grad_clip=null",
     "data.max_tokens_per_row=null"],  # Optional: null accepted
    ["optim.lr=1", "data.target_fps=1", "optim.lr_scale.vision=0"],  # an int is a number
    ["data.num_frames=[8,16]", "data.batch_size=1", "data.num_workers=0", "optim.lr=0", "optim.warmup_steps=0"],
    ["data.batch_size=${trainer.accumulate_grad_batches}"],  # an interpolation is checked as what it resolves to
    ["data.batch_size=${hydra:job.num}"],  # one that only resolves inside a Hydra run is checked there
    ["trainer.devices=[0,1]", "trainer.precision=32", "trainer.val_check_interval=0.5"],  # Lightning's own hints
])
def test_good_values_are_accepted(overrides):
    validate_config(_compose(["recipe=sft", *overrides]))


def test_values_reached_through_interpolation_are_checked_where_they_are_used():
    message = _problems("optim.warmup_steps=-1", "optim.lr=abc")
    assert "optim.warmup_steps=-1: must be >= 0" in message
    assert "objective.lr_schedule.warmup_steps=-1: must be >= 0" in message
    assert "objective.optimizer.lr='abc': expected a non-negative number" in message


@pytest.mark.parametrize("value, hint", [
    (5, torch.Tensor),                     # a class no YAML value can be: not interpreted
    ("x", int | torch.Tensor),             # a union with such a member: not interpreted
    ([1, "a"], list[torch.nn.Module]),
    ("/data/x", Path),
    ({"_target_": "torch.nn.Linear"}, int),  # a node with its own _target_ is checked as a node
])
def test_hints_that_cannot_be_interpreted_never_refuse(value, hint):
    assert value_problems(value, hint, "key") == []


def test_hints_read_as_words():
    assert describe(PositiveInt | NonEmptyList[PositiveInt]) == FRAME_COUNTS
    assert describe(dict[str, PositiveInt] | None) == "a mapping of strings to positive ints or null"
    assert value_problems({"a": 1, "b": 0}, dict[str, PositiveInt], "k") == ["k.b=0: must be >= 1"]


@pytest.mark.parametrize("override, expected", [
    ("data.num_frames=abc", f"data.num_frames='abc': expected {FRAME_COUNTS}"),
    ("data.batch_size=-3", "data.batch_size=-3: must be >= 1"),
])
def test_bad_values_on_the_command_line_fail_before_compute(override, expected, tmp_path, cache_root):
    result = run_train(["recipe=sft", override], cwd=tmp_path, cache_root=cache_root, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ConfigError" in output and expected in output, output[-3000:]
    assert "building model" not in output

"""One global batch gives one gradient however it is split: the same 8 samples as 1 x 8, 2 x 4 accumulated and
2 ranks x 4 (FSDP2 on gloo) through the real recipes and Lightning Trainer, for the LM loss (a mean over the step's
target tokens) and for DPO (sigmoid over the step's pairs + 'sft' over its chosen tokens). The micro-batches hold
very different token counts (short answers first), so a mean of per-micro-batch means fails this."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tarsier_train.data.transform import IGNORE_INDEX
from tarsier_train.models import load_processor

from conftest import REPO
from step_gradients_job import NUM_SAMPLES, FixedBatches, one_step_trainer, recipe_and_collate, samples

pytestmark = pytest.mark.slow
SPLITS = {"1x8": (1, 1), "2x4_accumulated": (1, 2), "2_ranks_x4": (2, 1)}  # (processes, micro-batches per step)
TOLERANCE = {"atol": 2e-6, "rtol": 1e-4}  # fp32 sums in another order


@pytest.fixture(scope="module")
def gradients(tmp_path_factory, tiny_model_dir) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    scratch = tmp_path_factory.mktemp("step_gradients")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = {}
    for objective in ("lm", "dpo"):
        for split, (devices, accumulate) in SPLITS.items():
            job = scratch / f"{objective}-{split}.json"
            output = scratch / f"{objective}-{split}.pt"
            job.write_text(json.dumps({"objective": objective, "devices": devices, "accumulate": accumulate,
                                       "model_dir": tiny_model_dir, "output": str(output)}))
            run = subprocess.run([sys.executable, str(REPO / "tests" / "step_gradients_job.py"), str(job)], cwd=scratch,
                                 env=env, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, f"{objective} {split}:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
            result[objective, split] = torch.load(output)
    return result


@pytest.mark.parametrize("objective", ["lm", "dpo"])
@pytest.mark.parametrize("split", ["2x4_accumulated", "2_ranks_x4"])
def test_a_split_global_batch_gives_the_one_batch_gradient(gradients, objective, split):
    whole, parts = gradients[objective, "1x8"], gradients[objective, split]
    assert whole.keys() == parts.keys() and len(whole) > 50  # every trained parameter of the tiny model
    assert sum(g.abs().sum() for g in whole.values()) > 0
    for name, gradient in whole.items():
        torch.testing.assert_close(parts[name], gradient, **TOLERANCE, msg=f"{objective} {split}: {name}")


def test_a_step_without_any_target_token_stops_the_run_and_says_why(tiny_model_dir):
    """Every answer cut away (truncation, masking, a template that labels nothing): the first step fails naming the
    three causes, instead of logging loss 0.0 for as long as the run lasts."""
    processor = load_processor(tiny_model_dir)
    batches = samples(processor, "lm")
    for sample in batches:
        sample["labels"][:] = IGNORE_INDEX
    recipe, collate = recipe_and_collate("lm", tiny_model_dir, processor)
    with pytest.raises(RuntimeError, match=r"holds a target token.*\(template\).*\(truncation\).*\(masking\)"):
        one_step_trainer().fit(recipe, datamodule=FixedBatches(batches, collate, NUM_SAMPLES))

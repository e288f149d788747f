"""Our DPO losses against the installed TRL: the same tiny policy/reference and pair batch through
`trl.DPOTrainer._compute_loss` and through `tarsier_train.losses.dpo`, for every supported loss type."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import trl
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.trainer.dpo_trainer import DataCollatorForPreference

from tarsier_train.losses import (
    DPOLossSettings,
    dpo_loss,
    pair_logps,
    sequence_logps,
    summed_token_cross_entropy,
)
from tarsier_train.losses.dpo import LOSS_TYPES

# Pairs of different lengths both ways (LD-DPO's shared length), one-token answers, prompts of different lengths.
PAIRS = [
    {"prompt_ids": [5, 9, 14], "chosen_ids": [20, 31, 42, 53, 64], "rejected_ids": [70, 81]},
    {"prompt_ids": [7, 8], "chosen_ids": [11], "rejected_ids": [12, 13, 33, 44]},
    {"prompt_ids": [3, 17, 25, 40], "chosen_ids": [90, 91, 92], "rejected_ids": [93, 94, 95]},
    {"prompt_ids": [6], "chosen_ids": [100, 60, 50, 40], "rejected_ids": [101]},
]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]
ALL_TYPES = list(LOSS_TYPES)
CASES = {
    **{name: {"loss_type": name} for name in ALL_TYPES if name not in ("exo_pair", "robust")},
    "exo_pair": {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    "robust": {"loss_type": "robust", "label_smoothing": 0.1},
    "aot-label_smoothing": {"loss_type": "aot", "label_smoothing": 0.2},
    "aot_unpaired-label_smoothing": {"loss_type": "aot_unpaired", "label_smoothing": 0.2},
    "hinge-beta": {"loss_type": "hinge", "beta": 0.7},
    "sppo_hard-beta": {"loss_type": "sppo_hard", "beta": 0.5},
    "discopop-tau": {"loss_type": "discopop", "discopop_tau": 0.5, "beta": 0.3},
    "mpo-weighted-list": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "sigmoid-ld_alpha": {"loss_type": "sigmoid", "ld_alpha": 0.5},
    "sft-ipo-ld_alpha-0": {"loss_type": ["sft", "ipo"], "ld_alpha": 0.0},
    "apo_zero-nca_pair-ld_alpha": {"loss_type": ["apo_zero", "nca_pair"], "ld_alpha": 0.3},
    "sigmoid-forward_kl": {"loss_type": "sigmoid", "f_divergence_type": "forward_kl"},
    "ipo-js_divergence": {"loss_type": "ipo", "f_divergence_type": "js_divergence"},
    "sigmoid_norm-robust-alpha_divergence": {"loss_type": ["sigmoid_norm", "robust"], "label_smoothing": 0.2,
                                             "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    "every-type": {"loss_type": ALL_TYPES, "loss_weights": [0.1 * (i + 1) for i in range(len(ALL_TYPES))],
                   "label_smoothing": 0.1, "ld_alpha": 0.6, "beta": 0.2},
}


@pytest.fixture(scope="module")
def models() -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    """A policy and a different reference; a wide init so log-ratios span several nats and accuracies are mixed."""
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5, pad_token_id=0)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config).eval()
    torch.manual_seed(1)
    reference = Qwen2ForCausalLM(config).eval()
    return policy, reference


@pytest.fixture(scope="module")
def tokenizer():
    from tarsier_train.models.tiny import build_tokenizer

    return build_tokenizer(128)  # DPOTrainer needs one; PAIRS are token ids already


def trl_loss(models, tokenizer, settings: dict, tmp_path) -> tuple[torch.Tensor, dict[str, float], trl.DPOTrainer]:
    """TRL's own loss and logged metrics for PAIRS, from a real DPOTrainer built with these settings."""
    from datasets import Dataset

    policy, reference = (copy.deepcopy(m) for m in models)
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, save_strategy="no", **settings)
    dataset = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    trainer = trl.DPOTrainer(policy, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    loss = trainer._compute_loss(trainer.model, trainer.data_collator(PAIRS), return_outputs=False)
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    return loss, {name: logged[name][-1] for name in METRICS}, trainer


def our_loss(models, settings: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    policy, reference = models
    config = DPOLossSettings(**settings)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    chosen, rejected = sequence_logps(policy(**inputs).logits, labels).split_chosen_rejected()
    with torch.no_grad():
        ref_chosen, ref_rejected = sequence_logps(reference(**inputs).logits, labels).split_chosen_rejected()
    return dpo_loss(chosen, rejected, *pair_logps(ref_chosen, ref_rejected, config.ld_alpha), config)


@pytest.mark.parametrize("settings", CASES.values(), ids=CASES.keys())
def test_loss_and_metrics_equal_trl(models, tokenizer, settings, tmp_path):
    expected_loss, expected_metrics, trainer = trl_loss(models, tokenizer, settings, tmp_path)
    loss, metrics = our_loss(models, settings, trainer.data_collator(PAIRS))
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5, abs=1e-6)
    assert {name: metrics[name].item() for name in METRICS} == pytest.approx(expected_metrics, rel=1e-5, abs=1e-6)


def test_gradients_equal_trl(models, tokenizer, tmp_path):
    settings = CASES["every-type"]
    expected_loss, _, trainer = trl_loss(models, tokenizer, settings, tmp_path)
    expected_loss.backward()
    models[0].zero_grad()
    our_loss(models, settings, trainer.data_collator(PAIRS))[0].backward()
    expected = dict(trainer.model.named_parameters())
    for name, param in models[0].named_parameters():
        # Relative to the tensor's norm: single entries near 0 carry float32 noise from TRL's chunked LM head
        error = (param.grad - expected[name].grad).norm() / expected[name].grad.norm()
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"
    models[0].zero_grad()


def test_inputs_are_not_trivial(models):
    """Guard for the equality tests: mixed reward accuracies and log-ratios of several nats."""
    batch = DataCollatorForPreference(pad_token_id=0)(PAIRS)
    _, metrics = our_loss(models, {"loss_type": "sigmoid"}, batch)
    assert 0.0 < metrics["rewards/accuracies"].item() < 1.0
    # beta 0.1: mean log-ratios beyond 2 nats
    assert min(abs(metrics["rewards/chosen"].item()), abs(metrics["rewards/rejected"].item())) > 0.2


def test_every_trl_loss_type_is_supported_and_tested():
    help_text = trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(re.findall(r"`'(\w+)'`", help_text)) == set(LOSS_TYPES)
    tested = {name for case in CASES.values() for name in ([case["loss_type"]] if isinstance(case["loss_type"], str)
                                                          else case["loss_type"])}
    assert tested == set(LOSS_TYPES)


def test_sequence_logps_matches_lm_cross_entropy(models):
    batch = DataCollatorForPreference(pad_token_id=0)(PAIRS)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    logits = models[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = sequence_logps(logits, labels)
    loss_sum, num_tokens = summed_token_cross_entropy(logits, labels)
    torch.testing.assert_close(-logps.summed.sum(), loss_sum)
    assert logps.num_tokens.tolist() == [5, 1, 3, 4, 2, 4, 3, 1] and num_tokens.item() == 23


def test_defaults_are_tarsier2s():
    settings = DPOLossSettings()
    assert (settings.loss_type, settings.beta, settings.weights) == (["sigmoid"], 0.1, [1.0])


def test_settings_errors_name_every_bad_field():
    with pytest.raises(ValueError) as error:
        DPOLossSettings(loss_type=["sigmoid", "dpo"], loss_weights=[1.0], ld_alpha=2.0, beta=0.0)
    message = str(error.value)
    for expected in ("loss_type=['dpo']", "'sigmoid_norm'", "loss_weights", "ld_alpha=2.0", "beta=0.0"):
        assert expected in message
    with pytest.raises(ValueError, match="label_smoothing=0.1: only"):
        DPOLossSettings(loss_type="sigmoid", label_smoothing=0.1)  # cDPO in old TRL; ignored by TRL >= 0.29
    with pytest.raises(ValueError, match="'exo_pair' needs it > 0"):
        DPOLossSettings(loss_type="exo_pair")
    with pytest.raises(ValueError, match="'robust' needs it in"):
        DPOLossSettings(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="f_divergence_type='js_divergence': only loss_type"):
        DPOLossSettings(loss_type="bco_pair", f_divergence_type="js_divergence")

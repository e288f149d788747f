import pytest

from tarsier_train.eval.event_f1 import corpus_event_score, parse_events, score_description

REF = [("red", "circle", "moves left"), ("red", "circle", "grows")]


def test_exact_match_scores_one():
    score = score_description("The red circle moves left. The red circle grows.", REF)
    assert (score.precision, score.recall, score.f1) == (1.0, 1.0, 1.0)


def test_partial_and_wrong_events():
    score = score_description("The red circle moves left. The blue circle grows.", REF)
    assert score.num_matched == 1 and score.precision == 0.5 and score.recall == 0.5


def test_garbage_sentences_count_against_precision():
    score = score_description("The red circle moves left. Blah blah. The.", REF)
    assert score.num_predicted == 3 and score.precision == pytest.approx(1 / 3) and score.recall == 0.5


def test_repeated_event_matches_once():
    score = score_description("The red circle grows. The red circle grows.", REF)
    assert score.num_matched == 1 and score.precision == 0.5


def test_empty_prediction_scores_zero():
    assert score_description("", REF).f1 == 0.0
    assert parse_events("") == []


def test_corpus_score_is_micro_averaged():
    total = corpus_event_score([("The red circle moves left.", REF), ("The red circle grows.", REF[1:])])
    assert (total.num_matched, total.num_predicted, total.num_reference) == (2, 2, 3)
    assert total.f1 == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))


class _ScriptedModel:
    """Stands in for a VLM in `greedy_description`: answers each prompt with the next scripted text."""

    def __init__(self, tokenizer, answers):
        import torch

        self.device, self.tokenizer, self.answers = torch.device("cpu"), tokenizer, list(answers)

    def eval(self):
        return self

    def generate(self, input_ids, **kwargs):
        import torch

        answer = self.tokenizer(self.answers.pop(0), add_special_tokens=False)["input_ids"]
        return torch.cat([input_ids, torch.tensor([answer], dtype=input_ids.dtype)], dim=1)


def test_evaluate_grounding_scores_spans_of_every_held_out_clip(cache_root, processor):
    import json

    import webdataset as wds

    from tarsier_train.eval.describe import evaluate_grounding
    from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

    shards = toyworld_shards(cache_root / "toyworld", ToyWorldSpec(num_train_clips=48, num_val_clips=4))["val"]
    records = [json.loads(raw["json"]) for raw in
               wds.WebDataset(shards, shardshuffle=False, nodesplitter=None, workersplitter=None)]
    pairs: list[tuple[str, str]] = []
    silent = evaluate_grounding(_ScriptedModel(processor.tokenizer, [""] * len(records)), processor, shards, outputs=pairs)
    references = [reference for _, reference in pairs]
    assert len(pairs) == len(records) and all(reference.startswith("<frame: ") for reference in references)
    assert 0 < silent.num_reference <= sum(len(r["extra_info"]["events"]) for r in records)
    assert (silent.num_exact, silent.iou_sum) == (0, 0.0)

    perfect = _ScriptedModel(processor.tokenizer, references)
    score = evaluate_grounding(perfect, processor, shards)
    assert (score.exact_accuracy, score.mean_iou, score.num_reference) == (1.0, 1.0, silent.num_reference)

    plain = [" ".join(e["text"] for e in r["extra_info"]["events"]) for r in records]  # right events, no spans
    assert evaluate_grounding(_ScriptedModel(processor.tokenizer, plain), processor, shards).num_exact == 0

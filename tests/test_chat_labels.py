"""Labels from the chat templates real checkpoints ship (no `{% generation %}` markers): token by token, exactly the
assistant answers and their end-of-turn tokens are targets, for single-turn, multi-turn, text-only, multi-image, DPO
pair and packed batches, with Qwen2-VL / Qwen2.5-VL / Qwen3-VL templates and our own; a template that would train on
nothing fails before any compute."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.video_utils import VideoMetadata

from tarsier_train.data.chat_labels import OFFSET_KWARGS, ChatTemplateError, encoded_target_mask, target_mask
from tarsier_train.data.packing import PackingCollator, rope_index_of
from tarsier_train.data.pairs import (
    CHOSEN_TARGETS,
    REJECTED_TARGETS,
    PairCollator,
    SharedPrefixPairCollator,
    pair_inputs,
)
from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import IGNORE_INDEX, NoTargetError, VideoTextTransform
from tarsier_train.data.video import encode_mp4
from tarsier_train.models import load_processor
from tarsier_train.toyworld import generate_clip, render_frames

from conftest import run_train
from published_templates import NO_ANSWERS, QWEN2_VL, model_dir_with_template, published_processor

PUBLISHED = ["qwen2_vl", "qwen2_5_vl"]  # through our transform; Qwen3-VL's video timestamps below, processor level
PROMPT = "Describe the video in detail."


@pytest.fixture(scope="module")
def video() -> bytes:
    return encode_mp4(render_frames(generate_clip(np.random.default_rng(0))))


@pytest.fixture(scope="module", params=["builtin", *PUBLISHED])
def transform(request, tiny_model_dir, tmp_path_factory) -> VideoTextTransform:
    """Our tiny model's template, or a model directory saved with Qwen's published one, as a user's checkpoint."""
    family = request.param
    model_dir = (tiny_model_dir if family == "builtin"
                 else model_dir_with_template(tiny_model_dir, tmp_path_factory.mktemp("dirs") / family, family))
    return VideoTextTransform(load_processor(str(model_dir)), FrameSampler(num_frames=4))


def _user(text: str, *media: dict) -> dict:
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


def _assistant(text: str, **extra) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text, **extra}], **extra}


VIDEO_ITEM = {"type": "video", "video": {"video_file": "k.mp4"}}


def _record(*messages: dict) -> dict:
    return {"messages": list(messages), "task": "video/caption"}


def _answer_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]


def labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    """The contiguous runs of labelled tokens, in order."""
    runs, current = [], []
    for value in labels.tolist():
        if value != IGNORE_INDEX:
            current.append(value)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _header_ids(tokenizer) -> list[int]:
    return tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


def test_single_turn_labels_exactly_the_answer_and_its_end_of_turn(transform, video):
    tokenizer = transform.processor.tokenizer
    out = transform(canonical_sample("k", _record(_user(PROMPT, VIDEO_ITEM), _assistant("The red circle grows."))),
                    [video])
    answer = _answer_ids(tokenizer, "The red circle grows.")
    assert labelled_runs(out["labels"]) == [answer]
    start = (out["labels"] != IGNORE_INDEX).nonzero()[0].item()
    header, newline = _header_ids(tokenizer), tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][start - len(header):start].tolist() == header  # right after the generation prompt
    assert out["input_ids"][start + len(answer):].tolist() == newline  # the newline between turns is not a target
    assert (out["labels"] == torch.where(out["labels"] != IGNORE_INDEX, out["input_ids"], IGNORE_INDEX)).all()


def test_every_assistant_turn_is_a_target_unless_the_record_says_loss_false(transform, video):
    tokenizer = transform.processor.tokenizer
    turns = [_user(PROMPT, VIDEO_ITEM), _assistant("The red circle grows."), _user("And then?"),
             _assistant("It moves left.")]
    both = transform(canonical_sample("k", _record(*turns)), [video])
    assert labelled_runs(both["labels"]) == [_answer_ids(tokenizer, "The red circle grows."),
                                             _answer_ids(tokenizer, "It moves left.")]
    turns[1] = {**turns[1], "loss": False}
    last_only = transform(canonical_sample("k", _record(*turns)), [video])
    assert torch.equal(last_only["input_ids"], both["input_ids"])
    assert labelled_runs(last_only["labels"]) == [_answer_ids(tokenizer, "It moves left.")]


@pytest.mark.parametrize("answers", [("", ""), ("Red.", "")])
def test_a_sample_with_nothing_to_learn_is_rejected(transform, answers):
    """Blank answers (an evaluation record's, whose text lives in `reference`) and answers marked "loss": false are
    not targets; a sample left with none is skipped, never trained on as an empty target."""
    first, last = answers
    record = _record(_user("Hello."), {**_assistant(first), "loss": False}, _user("And?"), _assistant(last))
    with pytest.raises(NoTargetError, match="no target token"):
        transform(canonical_sample("k", record), [])


def test_text_only_and_a_system_message(transform):
    tokenizer = transform.processor.tokenizer
    record = _record({"role": "system", "content": "Answer briefly."}, _user("Which colour is the circle?"),
                     _assistant("Red."))
    out = transform(canonical_sample("t", record), [])
    assert labelled_runs(out["labels"]) == [_answer_ids(tokenizer, "Red.")]
    text = tokenizer.decode(out["input_ids"])
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")  # the record's, not the default one
    assert "pixel_values" not in out and "pixel_values_videos" not in out


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render_frames(generate_clip(np.random.default_rng(seed)))[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_multi_image_turns_keep_their_images_and_label_only_answers(transform):
    tokenizer = transform.processor.tokenizer
    image = {"type": "image", "image": {"image_file": "a.png"}}
    record = _record(_user("What differs?", image, image), _assistant("The colour."), _user("Now this one.", image),
                     _assistant("A square."))
    sample = canonical_sample("m", record)
    assert [turn.num_media for turn in sample.history] == [2]
    out = transform(sample, [_png(1), _png(2), _png(3)])
    assert labelled_runs(out["labels"]) == [_answer_ids(tokenizer, "The colour."), _answer_ids(tokenizer, "A square.")]
    assert len(out["image_grid_thw"]) == 3
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    first_answer = (out["labels"] != IGNORE_INDEX).nonzero()[0].item()
    per_image = int(out["image_grid_thw"][0].prod()) // 4
    assert (out["input_ids"][:first_answer] == image_pad).sum() == 2 * per_image  # two images before the first answer
    assert not (out["labels"][out["input_ids"] == image_pad] != IGNORE_INDEX).any()


def test_the_generation_prompt_is_exactly_what_precedes_the_answer(transform, video):
    """The sampler and validation generate from this prompt: training must label what follows it, token for token."""
    sample = canonical_sample("k", _record(_user(PROMPT, VIDEO_ITEM), _assistant("The red circle grows.")))
    task_input = transform.prepare(sample, [video])
    trained, prompt = transform.training_inputs(task_input), transform.generation_inputs(task_input)
    start = (trained["labels"] != IGNORE_INDEX).nonzero()[0].item()
    assert torch.equal(prompt["input_ids"][0], trained["input_ids"][:start])


def test_dpo_pairs_label_only_the_compared_answers(transform, video):
    tokenizer = transform.processor.tokenizer
    answer = {"type": "text", "text": "", "chosen": "The red circle grows.", "rejected": "The blue square moves."}
    record = _record(_user(PROMPT, VIDEO_ITEM), _assistant("A red circle."), _user("Describe it again."),
                     {"role": "assistant", "content": [answer]})
    sample = canonical_sample("p", record)
    pair = pair_inputs(transform, sample, transform.prepare(sample, [video]))
    chosen, rejected = _answer_ids(tokenizer, "The red circle grows."), _answer_ids(tokenizer, "The blue square moves.")
    # the earlier turn is context shared by both answers, never a target
    assert labelled_runs(pair["chosen"]["labels"]) == [chosen]
    assert labelled_runs(pair["rejected"]["labels"]) == [rejected]
    rows = PairCollator(tokenizer.pad_token_id)([pair])
    assert labelled_runs(rows["labels"][0]) == [chosen] and labelled_runs(rows["labels"][1]) == [rejected]


def test_shared_prefix_pair_targets_are_the_two_answers(transform, video, tiny_model_dir):
    tokenizer = transform.processor.tokenizer
    answer = {"type": "text", "text": "", "chosen": "The red circle grows.", "rejected": "It moves left."}
    sample = canonical_sample("p", _record(_user(PROMPT, VIDEO_ITEM), {"role": "assistant", "content": [answer]}))
    pair = pair_inputs(transform, sample, transform.prepare(sample, [video]))
    batch = SharedPrefixPairCollator(tokenizer.pad_token_id, rope_index_of(tiny_model_dir))([pair])
    # targets are shifted (position t predicts t + 1): both answers' first tokens come from the prefix's last position
    answers = ((batch[CHOSEN_TARGETS][0], "The red circle grows."), (batch[REJECTED_TARGETS][0], "It moves left."))
    for targets, text in answers:
        assert targets[targets != IGNORE_INDEX].tolist() == _answer_ids(tokenizer, text)


def test_packed_rows_label_each_samples_answers(transform, video, tiny_model_dir):
    tokenizer = transform.processor.tokenizer
    first = transform(canonical_sample("a", _record(_user(PROMPT, VIDEO_ITEM), _assistant("The red circle grows."))),
                      [video])
    second = transform(canonical_sample("b", _record(_user("Which colour?"), _assistant("Red."), _user("Shape?"),
                                                     _assistant("A circle."))), [])
    batch = PackingCollator(tokenizer.pad_token_id, rope_index_of(tiny_model_dir))([first, second])
    assert batch["input_ids"].shape[0] == 1  # one row holds both
    expected = [_answer_ids(tokenizer, text) for text in ("The red circle grows.", "Red.", "A circle.")]
    assert sorted(labelled_runs(batch["labels"][0])) == sorted(expected)


def test_our_template_and_qwens_label_the_same_conversation_identically(processor, video):
    """With a system message both templates render the same text, so the labels must be the same tokens."""
    record = _record({"role": "system", "content": "You are a helpful assistant."}, _user(PROMPT, VIDEO_ITEM),
                     _assistant("The red circle grows."), _user("And then?"), _assistant("It moves left."))
    ours = VideoTextTransform(processor, FrameSampler(num_frames=4))(canonical_sample("k", record), [video])
    qwen = VideoTextTransform(published_processor(processor, "qwen2_vl"), FrameSampler(num_frames=4))(
        canonical_sample("k", record), [video])
    assert torch.equal(ours["input_ids"], qwen["input_ids"]) and torch.equal(ours["labels"], qwen["labels"])


def test_qwen3_vl_labels_survive_its_timestamped_video_expansion(tiny_model_dir, tmp_path):
    """Qwen3-VL's processor writes `<t seconds>` text between the frames it expands: the spans still land on the
    answers."""
    qwen3 = load_processor(str(model_dir_with_template(tiny_model_dir, tmp_path / "qwen3_vl", "qwen3_vl")))
    frames = render_frames(generate_clip(np.random.default_rng(0)))[:8]
    messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": PROMPT}]},
                {"role": "assistant", "content": [{"type": "text", "text": "The red circle grows."}]},
                {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "It moves left."}]
    metadata = VideoMetadata(total_num_frames=8, fps=4.0, frames_indices=list(range(8)))
    encoded = qwen3.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                        processor_kwargs={**OFFSET_KWARGS, "videos_kwargs": {
                                            "do_sample_frames": False, "video_metadata": [metadata]}})
    ids = encoded["input_ids"][0]
    assert "seconds>" in qwen3.tokenizer.decode(ids)  # the expansion inserted text before the answers
    labels = torch.where(encoded_target_mask(qwen3, messages, encoded), ids, IGNORE_INDEX)
    assert labelled_runs(labels) == [_answer_ids(qwen3.tokenizer, "The red circle grows."),
                                     _answer_ids(qwen3.tokenizer, "It moves left.")]


def test_spans_shift_past_expanded_placeholders_and_never_cut_a_token():
    """Text 'ab<P>cd' whose placeholder <P> (3 chars at 2..5) the processor expanded to 9 chars: the answer 'cd'
    (chars 5..7) is tokens 3..4 of the expanded text; a token across the answer's start is an error."""
    replacements = [{"span": (2, 5), "new_span": (2, 11)}]
    offsets = torch.tensor([[0, 1], [1, 2], [2, 11], [11, 12], [12, 13]])
    assert target_mask([(5, 7)], offsets, replacements).tolist() == [False, False, False, True, True]
    assert target_mask([(0, 2)], offsets, replacements).tolist() == [True, True, False, False, False]
    merged = torch.tensor([[0, 1], [1, 2], [2, 11], [11, 13]])
    with pytest.raises(ChatTemplateError, match="crosses the boundary"):
        target_mask([(5, 6)], merged, replacements)


@pytest.mark.parametrize("template, message", [
    (NO_ANSWERS, "no token of an assistant answer"),
    # ignores add_generation_prompt: the assistant header would become a target
    (QWEN2_VL.replace("{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", ""), "labels '<|im_start|>"),
    # a thinking-style generation prompt the rendered turns do not repeat: not prefix-wise
    (QWEN2_VL.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n\n</think>\n{% endif %}"),
     "prefix-wise"),
])
def test_a_template_that_cannot_be_labelled_fails_before_any_compute(processor, template, message):
    with pytest.raises(ChatTemplateError, match=message):
        VideoTextTransform(published_processor(processor, "qwen2_vl", chat_template=template))


@pytest.mark.slow
def test_train_py_learns_from_a_model_dir_with_qwens_published_template(tmp_path, tiny_model_dir, cache_root):
    """`model=qwen2_vl model.path=<a dir with Qwen's own template>` trains: targets in every step, the loss falls;
    a dir whose template labels nothing fails with the reason before any step."""
    model_dir = model_dir_with_template(tiny_model_dir, tmp_path / "qwen_template")
    args = ["recipe=sft", "model=qwen2_vl", "data.num_train_clips=48", "data.num_val_clips=2", "data.batch_size=4",
            "data.num_workers=0", "logger=csv", "trainer.log_every_n_steps=1", "trainer.max_steps=10",
            "trainer.val_check_interval=10", "optim.warmup_steps=2"]
    run_train([*args, f"model.path={model_dir}"], cwd=tmp_path, cache_root=cache_root)
    rows = [row for row in csv.DictReader(open(tmp_path / "outputs" / "sft" / "logs" / "metrics.csv"))
            if row.get("train/loss")]
    losses = [float(row["train/loss"]) for row in rows]
    targets = [float(row["train/target_tokens"]) for row in rows]
    assert len(losses) == 10 and min(targets) > 0
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    silent = model_dir_with_template(tiny_model_dir, tmp_path / "no_answers", chat_template=NO_ANSWERS)
    failed = run_train([*args, f"model.path={silent}", "run_name=silent"], cwd=tmp_path, cache_root=cache_root,
                       check=False)
    assert failed.returncode != 0 and "no token of an assistant answer" in failed.stderr
    assert not (tmp_path / "outputs" / "silent" / "checkpoints").exists()

"""Which tokens are targets, for any chat template a checkpoint ships: no `{% generation %}` markers needed.

Each trained assistant turn is located by rendering the conversation up to it (ending with the template's own
generation prompt) and through it: the answer is the difference, from the end of the generation prompt to the end
of the turn, without the whitespace the template puts between turns (so the end-of-turn token, `<|im_end|>` or
`</s>`, is a target and the newline after it is not, as in templates that carry generation markers). The template
must render prefix-wise (each shorter conversation a prefix of the longer one) and no token may straddle an answer's
boundary; otherwise training could not match generation, and the error says so. Character spans become token
positions through the processor's offsets, shifted past the expanded media placeholders.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import ProcessorMixin

TARGET_FLAG = "loss"  # an assistant message with "loss": false is context, not a target (as ms-swift's records)
# What transformers' processor returns so character spans can be found among the expanded tokens (>= 5.12).
OFFSET_KWARGS = {"return_offsets_mapping": True, "return_text_replacement_offsets": True}
PROBE_ANSWER = "A red circle moves left."
PROBE = [{"role": "user", "content": [{"type": "text", "text": "Describe the video in detail."}]},
         {"role": "assistant", "content": [{"type": "text", "text": PROBE_ANSWER}]}]


TEMPLATE_ADVICE = (
    "Labels are the tokens a template adds between rendering the conversation up to an answer with "
    "add_generation_prompt=True and rendering it through the answer; give the model directory a chat template "
    "(chat_template.jinja, or chat_template in processor_config.json) that renders assistant turns and the generation "
    "prompt as the published Qwen2-VL / Qwen2.5-VL / Qwen3-VL templates do")


class ChatTemplateError(ValueError):
    """A chat template whose answers cannot be located as token spans: training on it would learn nothing, or the
    wrong tokens."""


def render(processor: ProcessorMixin, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def is_target(message: dict[str, Any]) -> bool:
    return message["role"] == "assistant" and message.get(TARGET_FLAG, True) is not False


def answer_spans(processor: ProcessorMixin, messages: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """Character spans of the trained assistant answers (end-of-turn token included) in the rendered conversation."""
    full = render(processor, messages)
    spans = []
    for index, message in enumerate(messages):
        if not is_target(message):
            continue
        before = render(processor, messages[:index], add_generation_prompt=True)
        through = render(processor, messages[: index + 1])
        if before.startswith(through):
            raise ChatTemplateError(
                f"the chat template renders no token of an assistant answer (turn {index}): the conversation through "
                f"the answer ends {through[-60:]!r}, its generation prompt ends {before[-60:]!r}. " + TEMPLATE_ADVICE)
        if not (through.startswith(before) and full.startswith(through)):
            raise ChatTemplateError(
                f"the chat template does not render conversations prefix-wise at turn {index} (a shorter conversation "
                f"is not the start of a longer one, e.g. earlier reasoning is dropped), so answer tokens cannot be "
                f"located: prompt ends {before[-60:]!r}, turn renders as {through[len(before) - 60:][:120]!r}. "
                + TEMPLATE_ADVICE)
        spans.append((len(before), max(len(before), len(through.rstrip()))))
    return spans


def target_mask(spans: Sequence[tuple[int, int]], offsets: torch.Tensor,
                replacements: Sequence[dict[str, Any]]) -> torch.Tensor:
    """(n,) bool: the tokens inside the spans. `offsets` (n, 2) are character offsets in the text after the media
    placeholders were expanded, `replacements` the processor's record of those expansions."""
    placeholder_ends = [r["span"][1] for r in replacements]
    chars_gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = torch.zeros(len(offsets), dtype=torch.bool)
    for span in spans:
        start, end = (char + chars_gained[bisect.bisect_right(placeholder_ends, char)] for char in span)
        straddles = ((starts < start) & (ends > start)) | ((starts < end) & (ends > end))
        if straddles.any():
            raise ChatTemplateError(
                f"a token crosses the boundary of an answer (characters {span}): the tokenizer merges the prompt's "
                "end or the turn's end into the answer, so its labels would not match what the model generates")
        mask |= (starts < end) & (ends > start) & (ends > starts)
    return mask


def encoded_target_mask(processor: ProcessorMixin, messages: Sequence[dict[str, Any]],
                        encoded: dict[str, Any]) -> torch.Tensor:
    """(n,) bool: the target tokens of one conversation the processor encoded with OFFSET_KWARGS."""
    if "offset_mapping" not in encoded or "text_replacement_offsets" not in encoded:
        raise ChatTemplateError(f"{type(processor).__name__} does not report token offsets and where it expanded the "
                                "media placeholders (transformers >= 5.12 processors do), so answers cannot be located")
    return target_mask(answer_spans(processor, messages), encoded["offset_mapping"][0],
                       encoded["text_replacement_offsets"][0])


def check_template_labels(processor: ProcessorMixin) -> None:
    """Fail before any compute if the processor's chat template would train on nothing, or on more than the answer
    (a template that ignores add_generation_prompt would make the assistant header a target)."""
    encoded = processor.apply_chat_template(PROBE, tokenize=True, return_dict=True, return_tensors="pt",
                                            processor_kwargs=OFFSET_KWARGS)
    mask = encoded_target_mask(processor, PROBE, encoded)
    labelled = processor.tokenizer.decode(encoded["input_ids"][0][mask])
    if not labelled.startswith(PROBE_ANSWER):
        raise ChatTemplateError(
            "the model's chat template labels "
            + (f"{labelled!r} for the answer {PROBE_ANSWER!r}" if labelled else "no token of an assistant answer")
            + ": training would learn nothing or the wrong tokens (train/target_tokens 0). " + TEMPLATE_ADVICE)

"""Chat templates written the way Qwen publishes them with its checkpoints (no `{% generation %}` markers), and tiny
model directories whose processors carry them: what a user's real checkpoint directory looks like to our data path.

QWEN2_VL: Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (one line, a default system prompt, `add_vision_id`).
QWEN3_VL: Qwen3-VL-*-Instruct (whitespace-controlled blocks, no default system prompt, string or list content; its
tool-call and tool-response branches left out).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import (
    AutoProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

QWEN3_VL = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# A template that never renders the assistant's answers: a model directory carrying it trains on nothing.
NO_ANSWERS = (
    "{% for message in messages %}{% if message['role'] != 'assistant' %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILIES = {"qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN2_VL, "qwen3_vl": QWEN3_VL}


def published_processor(tiny_processor, family: str, chat_template: str | None = None):
    """The tiny model's tokenizer and image/video settings in the processor class of `family`, with its published
    template (or `chat_template`)."""
    template = chat_template or FAMILIES[family]
    tokenizer, pixels = tiny_processor.tokenizer, tiny_processor.video_processor.size
    images = Qwen2VLImageProcessor(size=pixels)
    if family == "qwen3_vl":
        return Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template,
                                video_processor=Qwen3VLVideoProcessor(size=pixels, do_sample_frames=False))
    processor_class = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else type(tiny_processor)
    return processor_class(image_processor=images, tokenizer=tokenizer, chat_template=template,
                           video_processor=Qwen2VLVideoProcessor(size=pixels, do_sample_frames=False))


def model_dir_with_template(tiny_model_dir: str, target: Path, family: str = "qwen2_vl",
                            chat_template: str | None = None) -> Path:
    """A copy of the tiny Qwen2-VL directory whose processor is `family`'s, saved with its published template (or
    `chat_template`) the way a checkpoint directory carries it."""
    shutil.copytree(tiny_model_dir, target)
    tiny = AutoProcessor.from_pretrained(target, local_files_only=True)
    processor = published_processor(tiny, family, chat_template)
    processor.tokenizer.chat_template = processor.chat_template
    processor.save_pretrained(target)
    return target

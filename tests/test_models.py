import json
from pathlib import Path

import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from tarsier_train.models import load_model, tiny_qwen_vl_dir
from tarsier_train.models.tiny import SPECIAL_TOKENS


def test_tiny_model_is_cached_and_reloads_with_transformers(tiny_model_dir, cache_root):
    files = {p.name: p.stat().st_mtime_ns for p in Path(tiny_model_dir).iterdir()}
    assert tiny_qwen_vl_dir(str(cache_root / "models")) == tiny_model_dir  # reused, not rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in Path(tiny_model_dir).iterdir()} == files
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert config["text_config"]["hidden_size"] == 128 and config["vision_config"]["depth"] == 2
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def test_tokenizer_has_qwen2_vl_special_tokens_and_whole_toy_words(processor):
    tokenizer = processor.tokenizer
    for token in SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert tokenizer.tokenize(token) == [token]
    assert tokenizer.tokenize("The red circle moves left.") == ["The", "Ġred", "Ġcircle", "Ġmoves", "Ġleft", "."]
    text = "The yellow triangle disappears."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_build_is_deterministic_for_a_seed(tmp_path, tiny_model_dir):
    other = tiny_qwen_vl_dir(str(tmp_path))
    a, b = load_model(tiny_model_dir), load_model(other)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name

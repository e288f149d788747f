"""The released Tarsier2 layouts, rebuilt from the tiny Qwen2-VL (config nesting, weight names, processor files as
the public code reads them), convert to a plain Qwen2-VL directory that computes exactly what the original does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from published_templates import QWEN2_VL
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2VLProcessor

from tarsier_train.models import load_model, load_processor
from tarsier_train.models.convert import (
    QWEN2_VL_CHAT_TEMPLATE,
    REPORT,
    convert_tarsier2,
    detect_layout,
    main,
    plain_model_dir,
    tarsier2_config,
)

REPO = Path(__file__).resolve().parents[1]
# transformers 5 saves Qwen2-VL under its legacy names; the released Tarsier2 names wrap those
RELEASED_PREFIXES = (("visual.", "vision_tower."), ("model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head."))
# Tarsier's processor tokenises its template directly, so the template repeats the pad token per visual token itself
TARSIER_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                    "{% for item in message['content'] %}"
                    "{% if item['type'] in ['image', 'video'] %}<|vision_start|>{{ '<|image_pad|>' * "
                    "item['num_vision_tokens'] }}<|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
                    "<|im_end|>\n{% endfor %}")


def _released_config(plain: dict) -> dict:
    """A transformers-4.4x flat Qwen2-VL text config inside Tarsier's LlavaConfig, nested as in Tarsier2's config."""
    text, vision = plain["text_config"], plain["vision_config"]
    ids = {k: plain[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    flat = {k: v for k, v in text.items() if k not in ("model_type", "layer_types", "rope_parameters", "dtype")}
    flat |= ids | {"model_type": "qwen2_vl", "rope_theta": text["rope_parameters"]["rope_theta"],
                   "rope_scaling": {"type": "mrope", "mrope_section": text["rope_parameters"]["mrope_section"]},
                   "tie_word_embeddings": plain["tie_word_embeddings"],
                   "spatial_merge_size": vision["spatial_merge_size"],
                   "attn_implementation": "flash_attention_2", "torch_dtype": "float32"}
    released_vision = {k: vision[k] for k in ("depth", "embed_dim", "hidden_size", "hidden_act", "mlp_ratio",
                                              "num_heads", "patch_size", "spatial_merge_size", "temporal_patch_size")}
    released_vision |= {"model_type": "qwen2_vl", "in_chans": vision["in_channels"], "spatial_patch_size":
                        vision["patch_size"], "attn_implementation": "flash_attention_2"}
    return {"architectures": ["TarsierForConditionalGeneration"], "model_type": "llava",
            "image_token_index": plain["image_token_id"], "ignore_index": -100, "projection_head": None,
            "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "image_newline_idx": 32002, "image_new_idx": 32003, "text_config": flat, "vision_config": released_vision,
            "torch_dtype": "float32", "transformers_version": "4.46.1"}


def _released_name(name: str) -> str:
    return next(new + name[len(old):] for old, new in RELEASED_PREFIXES if name.startswith(old))


def _write_weights(tensors: dict[str, torch.Tensor], dst: Path, num_shards: int) -> None:
    if num_shards == 1:
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        return
    names, weight_map = sorted(tensors), {}
    for i in range(num_shards):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names[i::num_shards]}, dst / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names[i::num_shards], shard)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def released_tarsier2_dir(plain_dir: str, dst: Path, num_shards: int = 2, extra: dict | None = None,
                          drop: str | None = None) -> Path:
    """The tiny model written the way Tarsier2-7b(-0115) / Tarsier2-Recap-7b ship: TarsierProcessor's files around a
    Qwen2VLImageProcessor (`size: {min_pixels, max_pixels}`) and a Qwen2 tokenizer."""
    plain = Path(plain_dir)
    dst.mkdir(parents=True)
    config = json.loads((plain / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(_released_config(config), indent=2))
    with safe_open(plain / "model.safetensors", "pt") as handle:
        tensors = {_released_name(k): handle.get_tensor(k) for k in handle.keys() if k != drop}
    _write_weights(tensors | (extra or {}), dst, num_shards)
    shutil.copy(plain / "tokenizer.json", dst)
    shutil.copy(plain / "generation_config.json", dst)
    tokenizer = json.loads((plain / "tokenizer_config.json").read_text())
    tokenizer.pop("backend")
    tokenizer |= {"tokenizer_class": "Qwen2Tokenizer", "processor_class": "TarsierProcessor",
                  "additional_special_tokens": tokenizer.pop("extra_special_tokens"), "padding_side": "left"}
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    image = json.loads((plain / "processor_config.json").read_text())["image_processor"]
    low, high = image["size"]["shortest_edge"], image["size"]["longest_edge"]
    image |= {"processor_class": "TarsierProcessor", "size": {"min_pixels": low, "max_pixels": high},
              "min_pixels": low, "max_pixels": high}
    (dst / "preprocessor_config.json").write_text(json.dumps(image))
    (dst / "processor_config.json").write_text(json.dumps({
        "processor_class": "TarsierProcessor", "image_token": "<|image_pad|>", "patch_size": 14, "merge_size": 2,
        "temporal_patch_size": 2, "max_seq_len": 16384}))
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": TARSIER_TEMPLATE}))
    return dst


@pytest.fixture(scope="module")
def original(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def video_inputs(processor) -> dict[str, torch.Tensor]:
    frames = np.random.default_rng(0).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video", "video": frames},
                                             {"type": "text", "text": "Describe the video."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "The red circle grows."}]}]
    return dict(processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                              processor_kwargs={"videos_kwargs": {"do_sample_frames": False}}))


@pytest.mark.parametrize("release,num_shards", [("Tarsier2-7b-0115", 2), ("Tarsier2-Recap-7b", 1)])
def test_converted_release_computes_exactly_what_the_original_does(tiny_model_dir, original, processor, video_inputs,
                                                                    tmp_path, release, num_shards):
    released = released_tarsier2_dir(tiny_model_dir, tmp_path / release, num_shards)
    assert detect_layout(released) == "tarsier2"
    converted = Path(convert_tarsier2(released, tmp_path / "plain"))
    assert detect_layout(converted) == "qwen2_vl" and not list(tmp_path.glob(".*staging*"))
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"] and config["model_type"] == "qwen2_vl"
    index = converted / "model.safetensors.index.json"
    assert index.is_file() == (num_shards > 1)
    files = sorted(converted.glob("*.safetensors"))
    assert len(files) == num_shards
    names = [name for path in files for name in safe_open(path, "pt").keys()]
    assert all(n.startswith(("model.visual.", "model.language_model.", "lm_head.")) for n in names)
    assert any(n.startswith("model.visual.merger.") for n in names) and len(names) == len(original.state_dict())

    model = load_model(str(converted))
    expected, actual = original.state_dict(), model.state_dict()
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)
    with torch.no_grad():
        logits = model(**video_inputs).logits
        assert torch.equal(logits, original(**video_inputs).logits)
    assert video_inputs["pixel_values_videos"].shape[0] > 0 and logits.shape[1] == video_inputs["input_ids"].shape[1]

    loaded = load_processor(str(converted))
    assert isinstance(loaded, Qwen2VLProcessor) and loaded.chat_template == QWEN2_VL
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.image_processor.size == processor.image_processor.size == loaded.video_processor.size
    assert loaded.video_processor.do_sample_frames is False
    report = json.loads((converted / REPORT).read_text())
    assert report["num_tensors"] == len(names) and report["source_chat_templates"] == {
        "chat_template.json": TARSIER_TEMPLATE}


def test_published_template_is_qwens():
    assert QWEN2_VL_CHAT_TEMPLATE == QWEN2_VL


def test_an_unmapped_or_missing_weight_fails_naming_it(tiny_model_dir, tmp_path):
    extra = {"multi_modal_projector.linear_1.weight": torch.zeros(2, 2)}
    released = released_tarsier2_dir(tiny_model_dir, tmp_path / "extra", extra=extra)
    with pytest.raises(ValueError, match=r"unmapped weights.*multi_modal_projector\.linear_1\.weight"):
        convert_tarsier2(released, tmp_path / "plain")
    assert not (tmp_path / "plain").exists() and not list(tmp_path.glob(".*staging*"))
    released = released_tarsier2_dir(tiny_model_dir, tmp_path / "missing", drop="visual.merger.ln_q.weight")
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model\.visual\.merger\.ln_q\.weight"):
        convert_tarsier2(released, tmp_path / "plain")


def test_disagreeing_image_token_ids_fail(tiny_model_dir):
    released = _released_config(json.loads((Path(tiny_model_dir) / "config.json").read_text()))
    assert tarsier2_config(released).image_token_id == released["image_token_index"]
    with pytest.raises(ValueError, match="image_token_index"):
        tarsier2_config(released | {"image_token_index": released["image_token_index"] + 1})


def test_layouts_are_detected(tiny_model_dir, tmp_path):
    assert detect_layout(tiny_model_dir) == "qwen2_vl"
    for name, config in {"tarsier1": {"architectures": ["TarsierForConditionalGeneration"], "model_type": "llava",
                                      "text_config": {"model_type": "llama"}, "vision_config": {}},
                         "tarsier1_default": {"architectures": ["TarsierForConditionalGeneration"],
                                              "model_type": "llava", "text_config": {}},
                         "plain_qwen3": {"model_type": "qwen3_vl"},
                         "llava": {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert detect_layout(tmp_path / "tarsier1") == detect_layout(tmp_path / "tarsier1_default") == "tarsier1"
    assert detect_layout(tmp_path / "plain_qwen3") == "qwen3_vl"
    with pytest.raises(ValueError, match="unknown model layout.*LlavaForConditionalGeneration"):
        detect_layout(tmp_path / "llava")
    # Tarsier1 has no Qwen2-VL form: it loads as released (tarsier1.py)
    assert plain_model_dir(tmp_path / "tarsier1", tmp_path / "cache") == str(tmp_path / "tarsier1")


def test_plain_model_dir_converts_once_and_passes_plain_dirs_through(tiny_model_dir, tmp_path, monkeypatch):
    assert plain_model_dir(tiny_model_dir, tmp_path / "cache") == tiny_model_dir
    released = released_tarsier2_dir(tiny_model_dir, tmp_path / "release", num_shards=1)
    converted = Path(plain_model_dir(released, tmp_path / "cache"))
    assert converted.parent == tmp_path / "cache" and (converted / REPORT).is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}

    def convert_again(*args):
        raise AssertionError("converted a second time")
    monkeypatch.setattr("tarsier_train.models.convert.convert_tarsier2", convert_again)
    assert plain_model_dir(released, tmp_path / "cache") == str(converted)
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == stamps
    config = json.loads((released / "config.json").read_text())
    (released / "config.json").write_text(json.dumps(config | {"ignore_index": -1}))  # an edited source: a new key
    with pytest.raises(AssertionError, match="second time"):
        plain_model_dir(released, tmp_path / "cache")


def test_cli_converts_and_rejects_bad_layouts(tiny_model_dir, tmp_path, capsys):
    released = released_tarsier2_dir(tiny_model_dir, tmp_path / "release")
    done = subprocess.run([sys.executable, "-m", "tarsier_train.models.convert", str(released), "--output",
                           str(tmp_path / "plain")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "converted Tarsier2" in done.stdout and detect_layout(tmp_path / "plain") == "qwen2_vl"
    # the other outcomes in process: a second interpreter start costs seconds on a shared CPU
    assert main([str(released), "--output", str(tmp_path / "plain")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([tiny_model_dir, "--output", str(tmp_path / "unused")]) == 0
    assert "already a plain qwen2_vl" in capsys.readouterr().out and not (tmp_path / "unused").exists()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main([str(tmp_path / "bert"), "--output", str(tmp_path / "out")]) == 2
    assert "unknown model layout" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "config.json not found" in capsys.readouterr().err

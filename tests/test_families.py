"""Model families: every Qwen family's tiny model trains end to end through train.py, exports, reloads and generates;
its parameters all belong to a part; a released Tarsier2 directory is a model.path. (Packing, both DPO pair layouts
and FSDP2 are checked per family in test_packing, test_pairs and test_fsdp.)"""

import json

import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tarsier_train.data.records import canonical_sample
from tarsier_train.data.sampling import FrameSampler
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.distributed.fsdp import shard_unit_names
from tarsier_train.models import load_model, load_processor, tiny_qwen_vl_dir, tiny_tarsier1_dir
from tarsier_train.models.controls import build_model
from tarsier_train.models.families import PARTS, family_of
from tarsier_train.optim import parameter_groups
from tarsier_train.toyworld import ToyWorldSpec, toyworld_shards

from conftest import EVERY_FAMILY, FAMILIES, QWEN_FAMILIES, REPO, TINY_DATA, losses_by_step, run_train
from test_convert import released_tarsier2_dir

SHORT = ["recipe=sft", *TINY_DATA, "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "logger=csv",
         "trainer.max_steps=2", "data.packing=true"]


@EVERY_FAMILY
def test_every_parameter_is_in_a_part_and_every_block_in_a_shard(tiny_model_dir):
    model = build_model(tiny_model_dir)  # every part trained, as Tarsier2 does
    family = family_of(model)
    parts = {name: family.part(name) for name, _ in model.named_parameters()}
    idle = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert idle == ({name for name in parts if name.startswith(("model.vision_tower.post_layernorm.",
                                                                 "model.vision_tower.encoder.layers.1."))}
                    if family.name == "tarsier1" else set())  # the tiny CLIP's last block: features come from below
    assert set(parts.values()) == set(PARTS)
    units = shard_unit_names(model)
    blocks = [name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules]
    num_blocks = len(model.get_submodule(family.vision_blocks.rstrip(".")))
    assert set(blocks) <= set(units) and units[num_blocks] == family.projector_units[0]
    groups = parameter_groups(model, lr=1.0, weight_decay=0.1, vision_layer_decay=0.5)
    assert sum(len(group["params"]) for group in groups) == len(parts) - len(idle)
    deepest = min(group["lr"] for group in groups)  # the stem: decay ** (blocks + 1)
    assert deepest == pytest.approx(0.5 ** (num_blocks + 1))


@pytest.fixture(scope="module", params=FAMILIES[1:])
def family_run(request, tmp_path_factory, cache_root):
    """`python train.py recipe=sft model=tiny_<family>` with packing, two steps, validation and export."""
    cwd = tmp_path_factory.mktemp(request.param)
    run_train([*SHORT, f"model=tiny_{request.param}"], cwd=cwd, cache_root=cache_root)
    return request.param, cwd / "outputs" / "sft"


@pytest.mark.slow
def test_each_family_trains_exports_reloads_and_generates(family_run, cache_root):
    tiny_dirs = {"tarsier1": tiny_tarsier1_dir(str(cache_root / "models"))} | {
        name: tiny_qwen_vl_dir(str(cache_root / "models"), family=name) for name in QWEN_FAMILIES}
    family, run_dir = family_run
    assert sorted(losses_by_step(run_dir)) == [0, 1]
    model = load_model(str(run_dir / "hf"))  # plain transformers for the Qwen families (as test_train checks)
    assert family_of(model).name == family and type(model) is type(load_model(tiny_dirs[family]))
    before = load_model(tiny_dirs[family]).state_dict()
    after = model.state_dict()
    assert before.keys() == after.keys()
    frozen = ("model.vision_tower.",) if family == "tarsier1" else ()  # Tarsier1's ViT is frozen
    assert [name for name in before if torch.equal(before[name], after[name]) != name.startswith(frozen)] == []
    processor = load_processor(str(run_dir / "hf"))
    shards = toyworld_shards(cache_root / "toyworld", ToyWorldSpec(num_train_clips=48, num_val_clips=4))
    raw = next(iter(wds.WebDataset(shards["val"], shardshuffle=False, nodesplitter=None, workersplitter=None)))
    sample = canonical_sample(raw["__key__"], json.loads(raw["json"]))
    transform = VideoTextTransform(processor, FrameSampler(num_frames=8))
    inputs = transform.generation_inputs(transform.prepare(sample, [raw["mp4"]]))
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 5 or output[0, -1] == processor.tokenizer.eos_token_id


def test_a_released_tarsier2_directory_is_a_model_path(tiny_model_dir, tmp_path, cache_root):
    """model=qwen2_vl model.path=<Tarsier2-7b as released> reads it converted to plain Qwen2-VL, converted once."""
    released = released_tarsier2_dir(tiny_model_dir, tmp_path / "Tarsier2-7b")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=["recipe=sft", "model=qwen2_vl", f"model.path={released}",
                                          f"cache_root={cache_root}"])
    converted = instantiate(cfg.model.dir)
    assert converted.startswith(str(cache_root / "converted")) and instantiate(cfg.model.dir) == converted
    original, loaded = load_model(tiny_model_dir).state_dict(), load_model(converted).state_dict()
    assert original.keys() == loaded.keys() and all(torch.equal(original[k], loaded[k]) for k in original)

"""Write the toy world as Tarsier-format records + H.264 mp4s in WebDataset shards, cached on disk."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import webdataset as wds

from tarsier_train.data.video import encode_mp4
from tarsier_train.toyworld.describe import DESCRIBE_PROMPT, describe, describe_grounded, event_sentence
from tarsier_train.toyworld.tasks import DERIVED_KINDS, DerivedKind, derived_samples
from tarsier_train.toyworld.world import Clip, generate_clip, render_frames

log = logging.getLogger(__name__)

SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000_003}
# Bump when generated clips change for the same spec, so stale caches are not reused.
GENERATOR_VERSION = 4  # v4: records carry tracking boxes


@dataclasses.dataclass(frozen=True)
class ToyWorldSpec:
    num_train_clips: int = 2000
    num_val_clips: int = 32
    num_frames: int = 16
    frame_size: int = 112
    max_events: int = 3
    fps: int = 8
    clips_per_shard: int = 100
    seed: int = 0


def clip_record(clip: Clip, key: str, index: int, spec: ToyWorldSpec) -> dict:
    """The Tarsier-format record (jsonl schema of the released Tarsier code) for one clip."""
    all_frames = list(range(spec.num_frames))
    return {
        "messages": [
            {"role": "user", "content": [
                {"type": "video", "video": {"video_file": f"{key}.mp4", "fps": spec.fps, "n_frames": spec.num_frames}},
                {"type": "text", "text": DESCRIBE_PROMPT},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": describe(clip.events)}]},
        ],
        "dataset": "toyworld",
        "task": "video/caption",
        "idx": index,
        "extra_info": {
            "events": [{**dataclasses.asdict(e), "text": event_sentence(e)} for e in clip.events],
            "grounded_description": describe_grounded(clip.events, all_frames),
            "tracking": {"object": f"the {clip.colour} {clip.shape}", "boxes": tracking_boxes(clip, spec.frame_size)},
        },
    }


def tracking_boxes(clip: Clip, frame_size: int) -> dict[str, list[float]]:
    """The object's box in every frame it is visible in: {frame: [x1, y1, x2, y2]} normalised to [0, 1]."""
    return {str(t): [round(v / frame_size, 4) for v in (x - half, y - half, x + half, y + half)]
            for t, (x, y, half, visible) in enumerate(clip.track) if visible}


def write_split(output_dir: Path, split: str, num_clips: int, spec: ToyWorldSpec) -> list[str]:
    rng = np.random.default_rng(spec.seed + SPLIT_SEED_OFFSET[split])
    pattern = str(output_dir / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=spec.clips_per_shard, verbose=0) as sink:
        for index in range(num_clips):
            clip = generate_clip(rng, spec.num_frames, spec.frame_size, spec.max_events)
            key = f"{split}_{index:07d}"
            sink.write({
                "__key__": key,
                "json": json.dumps(clip_record(clip, key, index, spec)).encode(),
                "mp4": encode_mp4(render_frames(clip, spec.frame_size), fps=spec.fps),
            })
    return sorted(p.name for p in output_dir.glob(f"{split}-*.tar"))


def ensure_toyworld(root: str | Path, spec: ToyWorldSpec) -> dict:
    """Generate the toy world under root/<settings> once; later calls return the cached manifest."""
    def generate(staging: Path) -> dict:
        log.info("generating toy world (%d train + %d val clips) in %s", spec.num_train_clips, spec.num_val_clips, root)
        return {"spec": dataclasses.asdict(spec), "train": write_split(staging, "train", spec.num_train_clips, spec),
                "val": write_split(staging, "val", spec.num_val_clips, spec)}

    return cached_folder(Path(root) / _spec_dirname(spec), generate)


def ensure_derived(root: str | Path, spec: ToyWorldSpec, kind: DerivedKind, split: str = "train") -> list[str]:
    """Shards of a derived task (qa, image, text, pairs) from the toy world's clips of a split, cached."""
    if kind not in DERIVED_KINDS:
        raise ValueError(f"toy-world shards {kind!r}: allowed values are train, {', '.join(DERIVED_KINDS)}")
    captions = toyworld_shards(root, spec)[split]

    def generate(staging: Path) -> dict:
        log.info("deriving toy-world %s shards in %s", kind, staging.parent)
        raw = wds.WebDataset(captions, shardshuffle=False, nodesplitter=None, workersplitter=None)
        with wds.ShardWriter(str(staging / f"{kind}-%06d.tar"), maxcount=spec.clips_per_shard, verbose=0) as sink:
            for sample in derived_samples(kind, iter(raw)):
                sink.write(sample)
        return {"spec": dataclasses.asdict(spec), kind: sorted(p.name for p in staging.glob(f"{kind}-*.tar"))}

    suffix = kind if split == "train" else f"{split}-{kind}"  # train: the names of the first cached sets
    folder = Path(root) / f"{_spec_dirname(spec)}-{suffix}"
    return [str(folder / name) for name in cached_folder(folder, generate)[kind]]


def cached_folder(target: Path, generate: Callable[[Path], dict]) -> dict:
    """target/manifest.json, generating target's contents in a staging dir renamed into place (atomic:
    a concurrent or killed writer never leaves a half cache)."""
    manifest_path = target / "manifest.json"
    if manifest_path.exists():
        return json.loads(manifest_path.read_text())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        (staging / "manifest.json").write_text(json.dumps(generate(staging), indent=2))
        try:
            staging.rename(target)
        except OSError:
            if not manifest_path.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return json.loads(manifest_path.read_text())


def toyworld_shards(root: str | Path, spec: ToyWorldSpec) -> dict[str, list[str]]:
    """{"train": [...], "val": [...]} absolute shard paths, generating the toy world if needed."""
    manifest = ensure_toyworld(root, spec)
    folder = Path(root) / _spec_dirname(spec)
    return {split: [str(folder / name) for name in manifest[split]] for split in ("train", "val")}


def _spec_dirname(spec: ToyWorldSpec) -> str:
    return f"toyworld-v{GENERATOR_VERSION}-" + "-".join(f"{v}" for v in dataclasses.astuple(spec))

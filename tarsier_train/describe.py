"""What does the model say about my videos? Batched descriptions of videos, images and GIFs from a trained model.

    python -m tarsier_train.describe --model outputs/sft clip.mp4 more_clips/ --output predictions.jsonl

The model is an HF export, a run directory (its export) or a checkpoint of a run (exported on the fly); it is fed
frames as it was trained (the settings saved with its export, `VideoSettings`). One jsonl line per input, in input
order: path, prompt, text, frames used; an input that cannot be read gets a line with its error instead."""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from tarsier_train.data.record_check import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from tarsier_train.data.records import canonical_sample
from tarsier_train.data.tasks import DEFAULT_PROMPTS
from tarsier_train.data.transform import VideoTextTransform
from tarsier_train.eval.generation import GenerationSettings, generate_texts
from tarsier_train.models.load import MODEL_DTYPES, load_model, load_processor, local_model_dir
from tarsier_train.models.video_settings import VideoSettings

log = logging.getLogger("tarsier_train.describe")
MEDIA_EXTENSIONS = frozenset((*VIDEO_EXTENSIONS, *IMAGE_EXTENSIONS))


def default_cache_root() -> Path:
    """Where generated assets (converted released models) live, as train.py's cache_root."""
    return Path(os.environ.get("TARSIER_TRAIN_CACHE") or Path.home() / ".cache" / "tarsier-train")


def is_checkpoint(path: Path) -> bool:
    """A Lightning checkpoint file, or a sharded (DCP) checkpoint directory, of a tarsier-train run."""
    return path.suffix == ".ckpt" and (path.is_file() or (path / ".metadata").is_file())


@contextlib.contextmanager
def model_directory(path: str, key: str = "--model") -> Iterator[str]:
    """A loadable HF directory for an HF export, a run directory or a run's checkpoint (exported to a temporary
    directory, removed afterwards); released Tarsier2 directories are converted once under the cache."""
    if is_checkpoint(Path(path)):
        from tarsier_train.checkpoint.export import export_checkpoint  # the export machinery only when needed

        with tempfile.TemporaryDirectory(prefix="tarsier-describe-") as export_dir:
            log.info("exporting checkpoint %s", path)
            yield str(export_checkpoint(path, export_dir))
        return
    yield local_model_dir(path, key=key, converted_dir=str(default_cache_root() / "converted"))


def media_files(inputs: Sequence[str]) -> list[Path]:
    """Files as given, and the media files under each directory (sorted, recursively); unknown names fail."""
    files = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix[1:].lower() in MEDIA_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{given}: no such file or directory")
    return files


def media_kind(path: Path) -> str:
    """GIFs are described as videos (all their frames); other images as images."""
    extension = path.suffix[1:].lower()
    return "video" if extension in VIDEO_EXTENSIONS else "image" if extension in IMAGE_EXTENSIONS else "video"


def media_record(path: Path, prompt: str) -> dict[str, Any]:
    """A Tarsier-format record asking `prompt` about one media file, answer blank."""
    kind = media_kind(path)
    item = {"type": kind, kind: {f"{kind}_file": path.name}}
    return {"messages": [{"role": "user", "content": [item, {"type": "text", "text": prompt}]},
                         {"role": "assistant", "content": [{"type": "text", "text": ""}]}],
            "task": f"{kind}/caption"}


class DescribeInputs(torch.utils.data.Dataset):
    """Each file decoded and prompted in the loader workers; a file that fails gives its error, not an exception."""

    def __init__(self, files: Sequence[Path], transform: VideoTextTransform, prompt: str | None) -> None:
        self.files, self.transform, self.prompt = list(files), transform, prompt

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        prompt = self.prompt or DEFAULT_PROMPTS[f"{media_kind(path)}/caption"]
        try:
            sample = canonical_sample(str(path), media_record(path, prompt))
            task_input = self.transform.prepare(sample, [path.read_bytes()])
            frames = next((list(v.indices) for v in task_input.visuals if v.indices is not None), None)
            return {"path": str(path), "prompt": prompt, "frames": frames,
                    "inputs": self.transform.generation_inputs(task_input)}
        except Exception as error:  # a bad file is reported on its line; the others are still described
            return {"path": str(path), "prompt": prompt, "error": f"{type(error).__name__}: {error}"}


def describe(model: Any, processor: Any, files: Sequence[Path], settings: VideoSettings,
             generation: GenerationSettings, prompt: str | None = None, batch_size: int = 4, num_workers: int = 2,
             progress: bool = True) -> Iterator[dict[str, Any]]:
    """One result per file, in order: {path, prompt, text, frames} or {path, prompt, error}."""
    inputs = DescribeInputs(files, settings.transform(processor), prompt)
    loader = DataLoader(inputs, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    failed = 0
    with tqdm(total=len(inputs), desc="describe", unit="file", disable=not progress) as bar:
        for batch in loader:
            ready = [item for item in batch if "inputs" in item]
            texts = iter(generate_texts(model, processor, [item["inputs"] for item in ready], generation))
            for item in batch:
                if "inputs" in item:
                    yield {"path": item["path"], "prompt": item["prompt"], "text": next(texts),
                           "frames": item["frames"]}
                else:
                    failed += 1
                    log.warning("could not describe %s: %s", item["path"], item["error"])
                    yield {key: item[key] for key in ("path", "prompt", "error")}
                bar.update(1)
                bar.set_postfix(described=bar.n - failed, failed=failed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tarsier-describe", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="videos, images, GIFs, or directories of them")
    parser.add_argument("--model", required=True, help="HF export, run directory, or <run>/checkpoints/step-N.ckpt")
    parser.add_argument("--prompt", default=None, help="default: Tarsier's 'Describe the video in detail.'")
    parser.add_argument("--output", default=None, help="jsonl file to write; default: print each description")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-frames", type=int, default=None, help="default: the frames the model trained with")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default=None,
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--num-workers", type=int, default=2, help="decoding processes")
    parser.add_argument("--seed", type=int, default=0, help="for sampling")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    generation = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)  # bad values fail here
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    files = media_files(args.inputs)
    torch.manual_seed(args.seed)
    with model_directory(args.model) as model_dir:
        settings = VideoSettings.load(model_dir)
        if args.num_frames is not None:
            settings = dataclasses.replace(settings, num_frames=args.num_frames)
        dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        model = load_model(model_dir, dtype).to(args.device).eval()
        processor = load_processor(model_dir)
        results = describe(model, processor, files, settings, generation, args.prompt, args.batch_size,
                           args.num_workers)
        failed = 0
        with open(args.output, "w") if args.output else contextlib.nullcontext(sys.stdout) as out:
            for result in results:
                failed += "error" in result
                if args.output:
                    out.write(json.dumps(result) + "\n")
                    out.flush()
                else:
                    print(f"{result['path']}: {result.get('text', 'ERROR ' + result.get('error', ''))}", file=out)
    if args.output:
        print(f"{len(files) - failed} described, {failed} failed: {args.output}", file=sys.stderr)
    return 1 if failed == len(files) and files else 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and time of reading a few frames from a long high-resolution video whose container states
no frame count (Matroska: PyAV's stream.frames == 0), before and after bounded decoding.

    python bench/decode_memory.py [--quick] [--width 1920 --height 1080 --frames 240] [--sample 16] [--rounds 3]
                                  [--grid]

Makes an H.264 clip in .mkv (checked to report 0 frames), then reads --sample uniformly spaced frames in a
fresh subprocess per path and reports the child's peak RSS growth (its peak RSS after decoding, minus its
RSS before) and wall time (medians over --rounds, the paths alternating so that machine noise hits all alike), as ratios
to the baseline measured in the same run. The peak is the kernel's
VmHWM, reset just before decoding: ru_maxrss would start at the parent's RSS, which it keeps across fork and
exec (ru_maxrss is printed too, for reference).
  baseline      the former PyAV path for such containers: decode every frame to RGB, keep them all, then choose
  read_frames   count by decoding without converting, decode again converting only the chosen frames
  + max_pixels  the same, frames scaled down by the decoder to Tarsier2's 460,800 px per frame
  + transform   max_pixels as VideoTextTransform passes it: decode_pixel_budget(460,800), twice that
--grid also reports how often Qwen2-VL's resize picks another patch grid from frames pre-scaled to
decode_pixel_budget than from full-resolution ones (sizes swept over a grid; arithmetic only).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

TARSIER2_FRAME_PIXELS = 460_800
PATHS = ("baseline", "read_frames", "+ max_pixels", "+ transform")


def make_clip(path: Path, width: int, height: int, num_frames: int) -> None:
    """A moving pattern with some detail, encoded one frame at a time (never all frames in memory)."""
    rows, cols = np.mgrid[0:height, 0:width]
    pattern = np.stack([cols, rows, rows ^ cols], -1).astype(np.uint8)  # moves by a per-frame shift, mod 256
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23", "g": "50"}
        for t in range(num_frames):
            frame = pattern + np.array([4 * t, 2 * t, t], np.int64).astype(np.uint8)  # wraps, as the pattern does
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        if container.streams.video[0].frames != 0:
            sys.exit(f"{path} states a frame count: not the case this bench measures")


def baseline_read(data: bytes, num_sampled: int) -> tuple[np.ndarray, list[int]]:
    """The former _read_pyav for containers without a frame count: every frame converted and kept."""
    from tarsier_train.data.sampling import uniform_frame_indices

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        indices = uniform_frame_indices(len(frames), num_sampled)
        return np.stack([frames[i] for i in indices]), indices


def child(path_name: str, clip: str, num_sampled: int) -> None:
    """Runs one path in this fresh process; prints peak RSS growth (bytes), seconds, shape and a checksum."""
    from tarsier_train.data.sampling import uniform_frame_indices
    from tarsier_train.data.video import decode_pixel_budget, read_frames

    data = Path(clip).read_bytes()
    max_pixels = {"+ max_pixels": TARSIER2_FRAME_PIXELS,
                  "+ transform": decode_pixel_budget(TARSIER2_FRAME_PIXELS)}.get(path_name)
    before = _rss_bytes()
    _reset_peak_rss()
    started = time.perf_counter()
    if path_name == "baseline":
        frames = baseline_read(data, num_sampled)[0]
    else:
        frames = read_frames(data, lambda n, fps: uniform_frame_indices(n, num_sampled), max_pixels=max_pixels)[0]
    seconds = time.perf_counter() - started
    peak, maxrss = _status_bytes("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB
    digest = hashlib.sha1(frames.tobytes()).hexdigest()[:12]
    print(peak - before, maxrss - before, seconds, "x".join(map(str, frames.shape)), digest)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _reset_peak_rss() -> None:
    """VmHWM := current RSS (Linux 4.0+), so that the peak is that of decoding, not of the imports."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # an older kernel: the import peak, below a decode's, is kept


def measure(path_name: str, clip: Path, num_sampled: int) -> tuple[int, int, float, str, str]:
    out = subprocess.run([sys.executable, __file__, "--child", path_name, str(clip), "--sample", str(num_sampled)],
                         check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1]), float(out[2]), out[3], out[4]


def _medians(runs: list[tuple]) -> tuple:
    """Median of each number over the runs of one path; its frame shape and checksum (the same every run)."""
    return (*(statistics.median(values) for values in list(zip(*runs))[:3]), *runs[0][3:])


def grid_agreement() -> None:
    """Share of frame sizes whose patch grid changes when frames come pre-scaled to decode_pixel_budget."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from tarsier_train.data.video import _scaled_size, decode_pixel_budget

    for budget in (TARSIER2_FRAME_PIXELS, 448 * 448, 128 * 28 * 28):
        differ = total = smaller = steps = 0
        for width, height in itertools.product(range(320, 4000, 37), range(240, 2200, 41)):
            scaled = _scaled_size(width, height, decode_pixel_budget(budget))
            if scaled == (width, height):
                continue  # not pre-scaled: the processor sees the same frame
            full = smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=budget)
            pre = smart_resize(scaled[1], scaled[0], factor=28, min_pixels=56 * 56, max_pixels=budget)
            total, differ, smaller = total + 1, differ + (pre != full), smaller + (pre[0] * pre[1] < full[0] * full[1])
            steps = max(steps, *(abs(p - f) // 28 for p, f in zip(pre, full)))
        print(f"  processor max {budget:7d} px/frame: grid differs for {differ}/{total} pre-scaled sizes "
              f"({differ / total:.1%}; by at most {steps} patch step(s) of 28 px a side; fewer patches for {smaller})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--sample", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1280x720, 96 frames, 1 round")
    parser.add_argument("--grid", action="store_true", help="also check the processor's patch grid")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "CLIP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.sample)
    if args.quick:
        args.width, args.height, args.frames, args.rounds = 1280, 720, 96, 1
    with tempfile.TemporaryDirectory(prefix="decode-memory-") as tmp:
        clip = Path(tmp) / "clip.mkv"
        started = time.perf_counter()
        make_clip(clip, args.width, args.height, args.frames)
        print(f"{args.width}x{args.height}, {args.frames} frames, H.264 in .mkv (no frame count), "
              f"{clip.stat().st_size / 2**20:.1f} MiB, made in {time.perf_counter() - started:.0f} s; "
              f"{args.sample} frames sampled uniformly, each path in a fresh process, median of {args.rounds}:")
        rounds = [{name: measure(name, clip, args.sample) for name in PATHS} for _ in range(args.rounds)]
    results = {name: _medians([one[name] for one in rounds]) for name in PATHS}
    base_rss, _, base_seconds, _, base_digest = results["baseline"]
    print(f"  {'path':13s} {'peak RSS growth':>16s} {'x baseline':>10s} {'(ru_maxrss)':>12s} {'wall':>7s} "
          f"{'x baseline':>10s}  frames")
    for name, (rss, maxrss, seconds, shape, digest) in results.items():
        same = " (pixels = baseline)" if digest == base_digest and name != "baseline" else ""
        print(f"  {name:13s} {rss / 2**20:12.1f} MiB {rss / base_rss:10.3f} {maxrss / 2**20:8.1f} MiB "
              f"{seconds:6.2f}s {seconds / base_seconds:10.2f}  {shape}{same}")
    if args.grid:
        print("patch grid from frames pre-scaled to decode_pixel_budget vs from full resolution:")
        grid_agreement()


if __name__ == "__main__":
    main()

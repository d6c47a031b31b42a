"""An honest test of temporal modelling: pan direction across real photos, written as real H.264 videos.

The task. Each clip is a square window panning horizontally across one real photo (CamVid street scenes from
``../shared/assets``); the label is the direction of the pan (``pan_right``: the window moves right, the scene
moves left; ``pan_left``). Every photo gives one clip of each class, the second being the first played backwards,
and both are encoded intra-only at a constant quantiser, so a frame decodes to the same pixels in either clip
(checked below). The label therefore cannot be read from any single frame (every frame is a crop of a random
photo at a random place) nor from the mean of the frames (both clips of a photo hold exactly the same frames):
a model that averages its frame features over time gives the two clips of a photo identical logits, so it is
exactly at chance on this balanced set, whatever it learnt. Only a model that looks at the order of the frames can
learn the task.

What runs (one process, side by side):

1. The data: ``--photos`` train / val / test photos (CamVid's own train / val / test splits, which are different
   street sequences) -> MP4 files (H.264, ``--frames-per-video`` frames) under ``--data``.
2. Training through the library's one pipeline (``sidetune.train.fit``, the video task: PyAV decoding, random-offset
   sampling of T frames in training, uniform in evaluation) of LoSA (factorised space-time mixing) and the
   frame-averaging methods (``linear``, ``e3va``, ``lora``; ``full`` with ``--methods ... full``), on the shared
   pretrained ViT-S/14 at ``--img-size``. Reported: test top-1, and the share of test photos whose two clips get
   the same prediction (1.0 = blind to time).
3. Efficiency at T = 8 (``--eff-frames``): bytes saved for backward by one training forward
   (``sidetune.bench.accounting.saved_tensor_bytes``) and the median time of a training step (forward, backward,
   AdamW) of LoSA, LoRA and full fine-tuning (and linear, E3VA), same clips, same batch, same precision.

Methods (``--methods``, ``--eff-methods``) are written as in ``benchmarks/results.py``: a name with options in
brackets, ``losa[recompute=false]`` (``results.parse_method``; quote them in a shell). The page's LoSA rows are
``losa[recompute=false]`` (LoSA keeping its activations for backward, its default when the page was measured) and
``losa`` (today's default, ``recompute=True``); the defaults run both, so a rerun reproduces the page's rows.

It writes ``docs/benchmarks/video_temporal.{md,json}`` with the command line beside the numbers.

    PYTHONPATH=src python benchmarks/video_temporal.py            # the page's run (about 30 min on a shared 2-core CPU)
    PYTHONPATH=src python benchmarks/video_temporal.py --quick    # a smoke run: tiny sizes, minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/results.py, also when imported from elsewhere
from results import parse_method, slug
from sidetune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
PHOTOS = ASSETS / "data" / "camvid-240x180"
BACKBONE = "vit_small_patch14_dinov2"
CLASSES = ("pan_right", "pan_left")
ENCODER = {"qp": "18"}  # constant quantiser + intra-only: a frame decodes the same whichever clip holds it


# -- data ----------------------------------------------------------------------------------------------------------
def pan_frames(photo: Path, window: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, window, window, 3): a window panning left to right across the photo at a random height.

    The photo is resized to 1.5 windows high (keeping its aspect ratio), so the pan covers its whole width.
    """
    img = Image.open(photo).convert("RGB")
    h = round(1.5 * window) // 2 * 2
    w = round(img.width * h / img.height)
    a = np.asarray(img.resize((w, h), Image.BICUBIC))
    y = int(rng.integers(0, h - window + 1))
    xs = np.round(np.linspace(0, w - window, frames)).astype(int)
    return np.stack([a[y : y + window, x : x + window] for x in xs])


def make_data(root: Path, photos: dict[str, int], window: int, frames: int, seed: int = 0) -> dict[str, int]:
    """``root/<split>/<class>/<photo>.mp4`` for each split; returns the clip count per split."""
    from sidetune.data.video import probe_clip, read_clip, write_video

    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in photos.items():
        files = sorted((PHOTOS / split).glob("*.jpg"))
        chosen = [files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))]
        for photo in chosen:
            clip = pan_frames(photo, window, frames, rng)
            write_video(root / split / "pan_right" / f"{photo.stem}.mp4", clip, options=ENCODER, intra_only=True)
            write_video(root / split / "pan_left" / f"{photo.stem}.mp4", clip[::-1], options=ENCODER, intra_only=True)
        counts[split] = 2 * len(chosen)
    # the property the whole test rests on: both clips of a photo decode to the same frames, in reverse order
    a = read_clip(probe_clip(root / split / "pan_right" / f"{chosen[0].stem}.mp4"), list(range(frames)))
    b = read_clip(probe_clip(root / split / "pan_left" / f"{chosen[0].stem}.mp4"), list(range(frames)))
    assert torch.equal(a, b.flip(0)), "intra-only decoding must give the same frames in either order"
    return counts


# -- training ------------------------------------------------------------------------------------------------------
def train(method: str, args, data: Path, out: Path, epochs: int, lr: float) -> dict:
    """Train ``method`` (``name[key=value;...]``) on the clips and evaluate it; one training row of the page."""
    from sidetune.train import TrainConfig, fit

    name, options = parse_method(method)
    config = TrainConfig(
        backbone=BACKBONE,
        method=name,
        method_options=options,
        task="video",
        data=str(data),
        weights=str(WEIGHTS),
        img_size=args.img_size,
        epochs=epochs,
        batch_size=args.batch_size,
        lr=lr,
        warmup_epochs=min(1.0, epochs / 4),
        augmentation="vtab",  # no flip: a mirrored pan is the other class
        mixed_precision=args.mixed_precision,
        workers=0,
        seed=args.seed,
        output=str(out / slug(method)),
        task_options={"num_frames": args.frames, "frame_sampling": "random"},
    )
    t0 = time.perf_counter()
    result = fit(config)
    s = result.summary
    pairs = reversal_agreement(result.model, data / "test", args)
    return {
        "method": method,
        "epochs": epochs,
        "lr": lr,
        "trainable": s["model"]["trainable_parameters"],
        "best_val_top1": s["metrics"]["best_val"],
        "test_top1": s["metrics"]["test"]["top1"],
        "test_clips": s["metrics"]["test"]["count"],
        "same_prediction_both_directions": pairs,
        "median_step_s": s["timing"]["median_step_time_s"],
        "wall_s": time.perf_counter() - t0,
        "refused_clips": s["data"]["skipped"],
    }


@torch.no_grad()
def reversal_agreement(model, split: Path, args) -> float:
    """Share of test photos whose two clips (one the other reversed) get the same predicted class."""
    from sidetune.data.video import build_video_dataset, build_video_transforms

    tf = build_video_transforms(model.data_config, tuple(model.config.img_size), "vtab")
    ds = build_video_dataset(split.parent, split.name, tf, num_frames=args.frames)
    by_photo: dict[str, dict[int, int]] = {}
    model.eval()
    for i in range(len(ds)):
        clip, label = ds[i]
        by_photo.setdefault(ds.samples[i][0].stem, {})[label] = int(model(clip[None]).argmax(-1))
    pairs = [p for p in by_photo.values() if len(p) == 2]
    return sum(p[0] == p[1] for p in pairs) / len(pairs)


# -- efficiency at T = 8 ---------------------------------------------------------------------------------------------
def efficiency(methods: list[str], args) -> list[dict]:
    """Saved-for-backward bytes and step time of each method on the same clips.

    The steps are timed round-robin (one step of each method per round, ``--eff-iters`` rounds, after a warm-up
    round), so that a load change on a shared machine falls on every method alike; each row is the median of its
    rounds. As ``benchmarks/efficiency.py`` does on this shared 2-core machine, the clock is the process's CPU time
    with one torch thread (``--threads 1``): two threads under load measure the OpenMP barriers, which punish the
    many small ops of a side network far more than a backbone's large GEMMs (docs/benchmarks/README.md).
    """
    import statistics

    import sidetune
    from sidetune.bench.accounting import saved_tensor_bytes

    size = args.eff_img_size
    clips = torch.randn(args.eff_batch, args.eff_frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(args.eff_batch) % 2
    rows, steps = [], []
    for name in methods:
        method, options = parse_method(name)  # "losa[recompute=false]": LoSA keeping its activations
        torch.manual_seed(0)
        model = sidetune.create(BACKBONE, method, task="video", num_frames=args.eff_frames, num_classes=2,
                                weights=str(WEIGHTS), img_size=size, **options).train()  # fmt: skip
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
        report = saved_tensor_bytes(lambda m=model: F.cross_entropy(m(clips), labels), module=model)

        def step(m=model, o=opt) -> None:
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(clips), labels).backward()
            o.step()

        step()  # warm-up
        steps.append(step)
        rows.append({"method": name, "trainable": model.num_parameters(), "saved_bytes": report.activation_bytes,
                     "step_times_s": []})  # fmt: skip
        print(f"efficiency {name}: saved {report.activation_bytes / 2**20:.1f} MiB", flush=True)
    for _ in range(args.eff_iters):
        for row, step in zip(rows, steps, strict=True):
            start = time.process_time()  # CPU time of this process: the step's work, whatever else runs
            step()
            row["step_times_s"].append(time.process_time() - start)
    for row in rows:
        row["step_s"] = statistics.median(row["step_times_s"])
        print(f"efficiency {row['method']}: step {row['step_s']:.2f} s {row['step_times_s']}", flush=True)
    return rows


# -- report --------------------------------------------------------------------------------------------------------
def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "video_temporal.json").write_text(json.dumps(results, indent=2) + "\n")
    a = results["args"]
    lines = [
        "# Video: does the side network model time? (pan direction across real photos)",
        "",
        f"Made by `{results['command']}` (git {results['git_commit']}, torch {results['torch']}, "
        f"{results['device']}, torch threads: {results['threads']}, {results['date']}). "
        "Page: [docs/video.md](../video.md).",
        "",
        f"Data: {', '.join(f'{k} {v}' for k, v in results['data']['clips'].items())} MP4 clips (H.264, intra-only) "
        f"of {a['frames_per_video']} frames, "
        f"{a['img_size']} px windows panning across CamVid photos; classes {', '.join(CLASSES)}; each photo gives "
        "one clip of each class (the same frames in reverse order, decoded bit-identically), so frame averaging is "
        "exactly at chance (50%).",
        f"Backbone: {BACKBONE} (shared pretrained weights) at {a['img_size']} px, T = {a['frames']} frames sampled "
        "at a random offset in training, uniformly in evaluation; batch "
        f"{a['batch_size']} clips, autocast {a['mixed_precision']}, seed {a['seed']}.",
        "",
        "| method | models time | trainable | epochs | lr | best val top-1 | test top-1 | same class for both "
        "directions | median step (wall s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["training"]:
        lines.append(
            f"| {r['method']} | {'yes' if parse_method(r['method'])[0] == 'losa' else 'no (mean over frames)'} | "
            f"{r['trainable']:,} | "
            f"{r['epochs']} | {r['lr']:g} | {r['best_val_top1']:.1%} | {r['test_top1']:.1%} "
            f"({r['test_clips']} clips) | {r['same_prediction_both_directions']:.0%} | {r['median_step_s']:.2f} |"
        )
    e = results["efficiency"]
    base = {r["method"]: r for r in e}
    ref = base.get("full") or base.get("lora")
    lines += [
        "",
        f"## Memory and step time at T = {a['eff_frames']}",
        "",
        f"{a['eff_batch']} clips x {a['eff_frames']} frames = {a['eff_batch'] * a['eff_frames']} images of "
        f"{a['eff_img_size']} px per step, float32, the same clips for every row; bytes saved for backward by one "
        "training forward (`saved_tensor_bytes`: activations only, deduplicated by storage), median of "
        f"{a['eff_iters']} training steps (forward, backward, AdamW) per method after one warm-up, in CPU seconds "
        "of the process with one torch thread (`time.process_time`, as benchmarks/efficiency.py measures on this "
        "shared machine), timed round-robin (one step of each method per round).",
        "",
        f"| method | trainable | saved for backward (MiB) | vs {ref['method']} | step (CPU s) | vs {ref['method']} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in e:
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['saved_bytes'] / 2**20:.1f} | "
            f"{r['saved_bytes'] / ref['saved_bytes']:.3f}x | {r['step_s']:.2f} | {r['step_s'] / ref['step_s']:.2f}x |"
        )
    lines += ["", "What was cut to fit a shared 2-core CPU: " + results["cuts"], ""]
    if results.get("note"):
        lines += [f"Note: {results['note']}", ""]
    (out / "video_temporal.md").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("runs/video_temporal/data"), help="where the videos are written")
    p.add_argument("--runs", type=Path, default=Path("runs/video_temporal/runs"), help="training run folders")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks", help="result files")
    p.add_argument("--photos", type=int, nargs=3, default=(48, 16, 32), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--img-size", type=int, default=112, help="training resolution")
    p.add_argument("--frames", type=int, default=8, help="T for training")
    p.add_argument("--frames-per-video", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6, help="epochs of the side methods")
    p.add_argument("--inplace-epochs", type=int, default=3, help="epochs of lora / full (each step is ~3x dearer)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["losa[recompute=false]", "linear", "lora", "e3va"],
        help="methods to train, name[key=value;...] (default: the page's rows; 'losa' trains LoSA with its default "
        "recompute=true: the same values, less memory, a slower step)",
    )
    p.add_argument("--lr", type=json.loads, default={"losa": 3e-3, "linear": 3e-3, "e3va": 3e-3, "lora": 1e-3,
                                                     "full": 3e-5},
                   help="JSON method -> lr (a method with options takes its name's lr unless listed itself)",
                   )  # fmt: skip
    p.add_argument("--eff-frames", type=int, default=8)
    p.add_argument("--eff-img-size", type=int, default=112)
    p.add_argument("--eff-batch", type=int, default=2)
    p.add_argument("--eff-iters", type=int, default=3)
    p.add_argument(
        "--eff-methods",
        nargs="+",
        default=["linear", "losa[recompute=false]", "losa", "e3va", "lora", "full"],
        help="methods to measure, name[key=value;...] (default: the page's rows)",
    )
    p.add_argument("--mixed-precision", default="auto", help="training autocast: auto = bf16 where native, else no")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see efficiency())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the whole script")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite the page from OUT/video_temporal.json")
    args = p.parse_args()
    for method in {*args.methods, *args.eff_methods}:
        if ":" in method:
            p.error(f"{method!r}: write options in brackets, e.g. losa[recompute=true] (method:option is gone)")
        try:
            parse_method(method)  # a malformed option fails here, not after minutes of data and training
        except ConfigError as err:
            p.error(str(err))
    for method in args.methods:
        if method not in args.lr and parse_method(method)[0] not in args.lr:
            p.error(f"--lr has no learning rate for {method!r}")
    if args.report_only:
        write_report(json.loads((args.out / "video_temporal.json").read_text()), args.out)
        return 0
    if not WEIGHTS.exists() or not PHOTOS.exists():
        print(f"needs {WEIGHTS} and {PHOTOS} (../shared beside the checkout)", file=sys.stderr)
        return 1
    if args.quick:
        args.photos, args.img_size, args.eff_img_size, args.epochs, args.inplace_epochs = (4, 2, 2), 56, 56, 1, 1
        args.eff_iters, args.frames_per_video = 1, 10
    torch.set_num_threads(args.threads)
    import sidetune
    from sidetune.bench.accounting import environment_info
    from sidetune.bench.levers import native_low_precision

    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if native_low_precision(torch.bfloat16, torch.device("cpu")) else "no"

    env = environment_info("cpu")
    photos = dict(zip(("train", "val", "test"), args.photos, strict=True))
    counts = make_data(args.data, photos, args.img_size, args.frames_per_video, args.seed)
    results = {
        "command": shlex.join(["python", *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "git_commit": env.get("git_commit"),
        "torch": torch.__version__,
        "sidetune": sidetune.__version__,
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "data": {"clips": counts},
        "training": [],
        "efficiency": [],
        "cuts": (
            f"training at {args.img_size} px (a {args.img_size // 14}x{args.img_size // 14} patch grid; efficiency at "
            f"{args.eff_img_size} px), not 224; "
            f"{sum(args.photos)} photos; {args.epochs} epochs for the side "
            f"methods and {args.inplace_epochs} for the in-place ones (their accuracy is fixed at chance by the "
            "symmetry above, so more epochs cannot change it); one seed; full fine-tuning is not trained here (add "
            "`--methods ... full`; it is as blind to time as LoRA) but is measured for memory and time."
        ),
    }
    # efficiency first (minutes), then the training rows; the page is rewritten after each, so a run cut short
    # still leaves what it measured
    results["efficiency"] = efficiency(args.eff_methods, args)
    write_report(results, args.out)
    if not args.skip_training:
        for method in args.methods:
            name = parse_method(method)[0]
            epochs = args.inplace_epochs if name in ("lora", "full") else args.epochs
            row = train(method, args, args.data, args.runs, epochs, args.lr.get(method, args.lr.get(name)))
            print(json.dumps(row), flush=True)
            results["training"].append(row)
            write_report(results, args.out)
    print(f"wrote {args.out / 'video_temporal.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

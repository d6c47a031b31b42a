"""Where a side network's own step goes: LoSA's mixers and E3VA's adapters, now and before, fp32 and bf16.

For each backbone and precision, on taps computed once (no autograd, the run's precision), times the side
network's step (``forward_taps``, head, cross-entropy, backward, AdamW) of

* ``former``: the computation before issue 17 (``tests/side_reference.py``: the former code op for op, on the
  same parameters), keeping every activation;
* ``recompute=false``: the current code keeping every activation;
* ``default``: the current default (``recompute=True``);
* ``compile`` (``--compile``): the default with ``torch.compile`` of ``forward_taps`` (compilation excluded),

with the bytes each keeps for backward, beside the plain inference forward of the frozen backbone (the unit of
the ``x inference`` target: a side step of 0.10x of it is the whole budget). Then the parts, each timed alone
(forward and backward, on the shapes of each stage): LoSA's token mixing, channel mixing, whole mixer (and
recomputed), E3VA's block update (two adapters, recomputed), and the stage-boundary carry through the backbone's
patch merging; the part's time times its count is its share of the step. Writes
``docs/benchmarks/side_profile.{md,json}`` with this command.

    python benchmarks/side_profile.py                         # ViT-B/16 and Swin-B, 224 px, batch 8, fp32 and bf16
    python benchmarks/side_profile.py --backbones swin_tiny_patch4_window7_224 --compile

One torch thread and the CPU-time clock, as benchmarks/efficiency.py (docs/benchmarks/README.md says why).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sidetune
from sidetune.bench.accounting import environment_info, saved_tensor_bytes
from sidetune.bench.levers import PRECISIONS, native_low_precision
from sidetune.features import Features
from sidetune.side.base import carry_across_stage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from side_reference import old_e3va_pooled, old_losa_pooled  # noqa: E402  (the former code, kept for the tests)

BACKBONES = ("vit_base_patch16_224", "swin_base_patch4_window7_224")
OUT = REPO / "docs" / "benchmarks"
FORMER = {"losa": old_losa_pooled, "e3va": old_e3va_pooled}
MIB = 1 << 20


def _autocast(precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


WARMUP = {"value": 2}


def _clock(fn: Callable[[], None], rounds: int, warmup: int | None = None) -> dict[str, float]:
    """Median and fastest CPU seconds of ``fn`` (after ``warmup`` untimed calls, default ``--warmup``)."""
    for _ in range(WARMUP["value"] if warmup is None else warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return {"median_s": statistics.median(times), "min_s": min(times)}


IMG_SIZE = {"value": 224}


def _model(backbone: str, method: str, **options: Any):
    torch.manual_seed(0)
    return sidetune.create(backbone, method, num_classes=10, img_size=IMG_SIZE["value"], **options).train()


def _side_step(model, taps, labels: torch.Tensor, precision: str, pooled: Callable | None = None) -> Callable:
    """The side network's step on fixed taps; ``pooled(method, taps)`` replaces ``forward_taps(taps).pooled``."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def forward_loss() -> torch.Tensor:
        with _autocast(precision):
            features = Features(pooled=pooled(model.method, taps)) if pooled else model.method.forward_taps(taps)
            return F.cross_entropy(model.head(features), labels)

    def step() -> None:
        loss = forward_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, forward_loss


def side_rows(backbone: str, method: str, precision: str, args: argparse.Namespace, images, labels) -> list[dict]:
    """The side step of the former code, recompute=false, the default (and compiled) on the same taps."""
    default = _model(backbone, method)
    keep_all = _model(backbone, method, recompute=False)
    keep_all.load_state_dict(default.state_dict())
    with torch.no_grad(), _autocast(precision):
        taps = default.backbone(images, default.method.tap_request)
    variants = [("former", default, FORMER[method]), ("recompute=false", keep_all, None), ("default", default, None)]
    rows = []
    for name, model, pooled in variants:
        step, forward_loss = _side_step(model, taps, labels, precision, pooled)
        saved = saved_tensor_bytes(forward_loss, module=model).activation_bytes
        rows.append({"method": method, "variant": name, "saved_bytes": saved, **_clock(step, args.rounds)})
    if args.compile:
        compiled = _model(backbone, method)
        compiled.load_state_dict(default.state_dict())
        compiled.method.forward_taps = torch.compile(compiled.method.forward_taps)
        step, forward_loss = _side_step(compiled, taps, labels, precision)
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
        # the compiled graph decides itself what to keep for backward (AOTAutograd's partitioner)
        saved = saved_tensor_bytes(forward_loss, module=compiled).activation_bytes
        row = {"method": method, "variant": "compile", "compile_s": compile_s, "saved_bytes": saved}
        rows.append({**row, **_clock(step, args.rounds)})
    return rows


def _fwd_bwd(fn: Callable[..., torch.Tensor], precision: str, *inputs: Any) -> Callable[[], None]:
    """``fn(*inputs)`` forward (under the precision's autocast) and backward, as one closure."""

    def run() -> None:
        with _autocast(precision):
            out = fn(*inputs)
        out.float().sum().backward()

    return run


def _recomputed(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    return lambda *inputs: checkpoint(fn, *inputs, use_reentrant=False)


def part_rows(backbone: str, method: str, precision: str, args: argparse.Namespace, images) -> list[dict]:
    """Each part of the side network timed alone, forward and backward, per stage (count: its uses per step)."""
    model = _model(backbone, method)
    layout = model.backbone.layout
    with torch.no_grad(), _autocast(precision):
        taps = model.backbone(images, model.method.tap_request)
    rows = []

    def add(stage: int, part: str, count: int, shape, run: Callable[[], None]) -> None:
        entry = {"method": method, "stage": stage, "part": part, "count": count, "shape": list(shape)}
        rows.append({**entry, **_clock(run, args.rounds)})

    for stage in range(layout.num_stages):
        blocks = layout.stage_blocks(stage)
        first = blocks[0]
        if method == "losa":
            mixer = model.method.mixers[str(first)]
            keep_all = _model(backbone, method, recompute=False).method.mixers[str(first)]
            keep_all.load_state_dict(mixer.state_dict())
            b = taps.out[first]
            x = (b + 0.1 * torch.randn(b.shape)).to(b.dtype).requires_grad_(True)  # a mixer's input b + a
            token = mixer.token_mixing

            def channel(x: torch.Tensor, m=mixer) -> torch.Tensor:
                return m.channel_mixing(m.channel_norm(x))

            add(stage, "token mixing", len(blocks), x.shape, _fwd_bwd(lambda x, t=token: t.refine(x)[1], precision, x))
            add(stage, "channel mixing", len(blocks), x.shape, _fwd_bwd(channel, precision, x))
            add(stage, "mixer", len(blocks), x.shape, _fwd_bwd(keep_all, precision, x))
            add(stage, "mixer, recomputed", len(blocks), x.shape, _fwd_bwd(_recomputed(mixer), precision, x))
        else:
            e3va = model.method
            k = e3va.prefix_only
            attn, mlp = taps.attn[first][:, :k], taps.mlp[first][:, :k]  # every token when k is None

            def update(a: torch.Tensor, m: torch.Tensor, i=first, e3va=e3va) -> torch.Tensor:
                return e3va.block_update(i, a, m)

            add(stage, "block update", len(blocks), attn.shape, _fwd_bwd(update, precision, attn, mlp))
            recomputed = _fwd_bwd(_recomputed(update), precision, attn, mlp)
            add(stage, "block update, recomputed", len(blocks), attn.shape, recomputed)
        downsample = layout.stage_downsample[stage + 1] if stage + 1 < layout.num_stages else None
        if downsample is not None:
            base = taps.out[blocks[-1]]
            delta = (0.1 * torch.randn(base.shape)).to(base.dtype).requires_grad_(True)

            def carry(d: torch.Tensor, b=base, down=downsample, grid=layout.stage_grids[stage]) -> torch.Tensor:
                return carry_across_stage(d, b, down, grid)

            add(stage, "carry to the next stage", 1, base.shape, _fwd_bwd(carry, precision, delta))
    return rows


def inference_time(backbone: str, precision: str, images, rounds: int) -> dict[str, float]:
    model = _model(backbone, "linear")

    def forward() -> None:
        with torch.inference_mode(), _autocast(precision):
            model.backbone(images)

    return _clock(forward, rounds, warmup=min(1, WARMUP["value"]))


def markdown(results: list[dict], command: str, env: dict[str, Any]) -> str:
    lines = ["# Side networks: where their own step goes", "", f"Command: `{command}`", ""]
    lines += [
        f"Environment: torch {env.get('torch')}, {env.get('device_name')}, torch threads {env.get('torch_threads')}, "
        f"git {str(env.get('git_commit') or 'unknown')[:12]}. CPU time of one thread (`time.process_time`), median "
        "(fastest) of the timed rounds; random weights.",
        "",
    ]
    for res in results:
        inf = res["inference"]["median_s"]
        lines += [f"## {res['backbone']}, {res['precision']}", ""]
        lines += [f"Plain inference forward of the frozen backbone: {1000 * inf:.0f} ms (the `x inference` unit).", ""]
        lines += ["| method | computation | side step ms (min) | / inference forward | saved for backward |"]
        lines += ["|---|---|---:|---:|---:|"]
        for r in res["side"]:
            saved = "-" if r["saved_bytes"] is None else f"{r['saved_bytes'] / MIB:.1f} MiB"
            lines.append(
                f"| {r['method']} | {r['variant']} | {1000 * r['median_s']:.1f} ({1000 * r['min_s']:.1f}) | "
                f"{r['median_s'] / inf:.3f}x | {saved} |"
            )
        compiled = [f"{r['method']} {r['compile_s']:.0f} s" for r in res["side"] if r.get("compile_s") is not None]
        if compiled:
            lines += ["", "Compilation (the first call, excluded from the step): " + ", ".join(compiled) + "."]
        if not res["parts"]:  # --no-parts
            lines.append("")
            continue
        lines += ["", "Parts, each timed alone (forward and backward), and their share of a step (time x count):", ""]
        lines += ["| method | stage | part | input | ms (min) | count | ms per step |"]
        lines += ["|---|---:|---|---|---:|---:|---:|"]
        for r in res["parts"]:
            lines.append(
                f"| {r['method']} | {r['stage']} | {r['part']} | {tuple(r['shape'])} | {1000 * r['median_s']:.2f} "
                f"({1000 * r['min_s']:.2f}) | {r['count']} | {1000 * r['median_s'] * r['count']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--methods", default="losa,e3va")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each timing")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of forward_taps as a row")
    parser.add_argument("--no-parts", action="store_true", help="only the whole side steps")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--name", default="side_profile")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    IMG_SIZE["value"], WARMUP["value"] = args.img_size, args.warmup
    command = shlex.join(["python", "benchmarks/side_profile.py", *(sys.argv[1:] if argv is None else argv)])
    results = []
    for backbone in args.backbones.split(","):
        for precision in args.precisions.split(","):
            dtype = PRECISIONS[precision]
            if dtype is not None and not native_low_precision(dtype, torch.device("cpu")):
                print(f"skipping {precision}: not native on this CPU", file=sys.stderr)
                continue
            g = torch.Generator().manual_seed(0)
            images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
            labels = torch.randint(10, (args.batch_size,), generator=g)
            print(f"== {backbone} {precision}", file=sys.stderr, flush=True)
            res = {"backbone": backbone, "precision": precision, "side": [], "parts": []}
            res["inference"] = inference_time(backbone, precision, images, args.rounds)
            for method in args.methods.split(","):
                res["side"] += side_rows(backbone, method, precision, args, images, labels)
                if not args.no_parts:
                    res["parts"] += part_rows(backbone, method, precision, args, images)
            results.append(res)
    env = environment_info(torch.device("cpu"))
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(results, command, env)
    (args.out / f"{args.name}.md").write_text(text)
    data = {"command": command, "environment": env, "results": results}
    (args.out / f"{args.name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

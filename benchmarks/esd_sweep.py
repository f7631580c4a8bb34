"""Which ESD (the original: negative guidance 1, Adam) erases the mini world's tench without wrecking the UNet?

    python -m benchmarks.esd_sweep [--points 250@1e-4,250@2e-4,1000@1e-5] [--task tench] [--seeds 64]
        [--runs DIR] [--json OUT]

Each point trains `recare train --task tench --method esd` with the world's settings except the
iterations and the learning rate (`ITERATIONS@LR`), and measures, on `--seeds` seeds (42 + i) with the
world's generation settings and the bundled oracle:

* target     the task's target prompt -> its concept (the bar: <= 20%)
* unrelated  prompts that have nothing to do with the target (goldfish, a man, stars, a house, a lake),
             each -> its own concept, as a fraction of the base model's rate (the bar: every one >= 0.7x)
* CLIP       the CLIP score (mini CLIP) on the world's 64 held-out captions, one image each (base: about 0.70)
* pixdist    mean pairwise RMS pixel distance of the target prompt's images (one pale texture: small)

Runs and per-prompt evaluations are cached (`benchmarks.unlearning_quality`'s cache), so points can be
added later and the table re-printed cheaply. The strips of the first 8 images of each prompt lie
beside the cached evaluations (`<runs>/eval/<model>/<hash>-first8.png`): look at them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from recare.runtime import set_process_defaults

if __name__ == "__main__":
    set_process_defaults()

from benchmarks.unlearning_quality import DEFAULT_RUNS, Evaluator, task_inputs, train_cached  # noqa: E402

UNRELATED = (("a photo of a goldfish", "goldfish"), ("a photo of a man", "person"), ("stars in the night sky", "stars"),
             ("a photo of a house", "house"), ("a photo of a lake", "freshwater"))
TARGET_BAR, KEEP_BAR = 0.20, 0.70


def parse_points(text: str) -> list[tuple[int, float]]:
    out = []
    for item in (x for x in text.split(",") if x):
        iterations, lr = item.split("@")
        out.append((int(iterations), float(lr)))
    return out


def clip_of(ev: Evaluator, model: str, run, encoder, cache: Path) -> float:
    """CLIP score on the world's held-out captions (cached per model)."""
    from recare.eval.config import EvaluationConfig, resolve_config
    from recare.eval.utility import clip_prompts, clip_score_of_prompts

    path = cache / model / "clip-heldout.json"
    if path.is_file():
        return json.loads(path.read_text())["clip"]
    config = resolve_config(EvaluationConfig(task="tench"))
    value = float(clip_score_of_prompts(ev.pipe(model, run, None), encoder, clip_prompts(config), config))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"clip": value, "captions": config.clip_count}))
    return value


def measure(ev: Evaluator, model: str, run, task: dict, encoder, cache: Path) -> dict:
    row = {"target": ev.rate(model, task["target_prompt"], task["target_concept"], run=run),
           "unrelated": {p: ev.rate(model, p, c, run=run) for p, c in UNRELATED},
           "clip": clip_of(ev, model, run, encoder, cache),
           "pixdist": ev.probe(model, task["target_prompt"], run=run)["pixdist"]}
    return row


def table(rows: list[dict], base: dict) -> str:
    names = [p.split()[-1] for p, _ in UNRELATED]
    head = f"{'setting':22s} {'target':>7s} " + " ".join(f"{n:>9s}" for n in names) + \
        f" {'min x':>6s} {'CLIP':>6s} {'pixdist':>8s} {'train s':>8s} verdict"
    lines = [head]
    for r in [base] + rows:
        ratios = [r["unrelated"][p] / base["unrelated"][p] if base["unrelated"][p] else float("nan") for p, _ in UNRELATED]
        r["min_ratio"] = min(ratios)
        ok = r is not base and r["target"] <= TARGET_BAR and r["min_ratio"] >= KEEP_BAR
        r["passes"] = bool(ok)
        cells = " ".join(f"{r['unrelated'][p]:.2f}({x:.1f})" for (p, _), x in zip(UNRELATED, ratios))
        lines.append(f"{r['label']:22s} {r['target']:7.2f} {cells} {r['min_ratio']:6.2f} {r['clip']:6.3f} "
                     f"{r['pixdist']:8.3f} {r.get('train_s', 0):8.0f} {'PASS' if ok else ('-' if r is base else 'fail')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", default="250@1e-4,250@2e-4,1000@1e-5", help="ITERATIONS@LR, comma separated")
    parser.add_argument("--task", default="tench")
    parser.add_argument("--train-method", default=None, help="override the preset's parameter set (noxattn / xattn)")
    parser.add_argument("--seeds", type=int, default=64)
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--measure", type=Path, action="append", default=[], metavar="RUN",
                        help="also measure a finished training run folder (e.g. the CLI's `recare train --method esd`)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from recare import worldspec
    from recare.miniworld.oracle import load_oracle
    from recare.models import load_encoder, load_pipeline
    from recare.workflows import mini_world_task, task_train_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = worldspec.mini_world_spec()
    runs = args.runs.expanduser()
    runs.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("mini-world", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    ev = Evaluator(runs, spec, pipe, load_oracle(), args.seeds)
    encoder = load_encoder("mini-world", device="cpu")
    task = mini_world_task(args.task, spec)
    cache = runs / "eval"
    print(f"# ESD sweep on {args.task} ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
          f"load {os.getloadavg()[0]:.1f})", flush=True)
    base = {"label": "base", **measure(ev, "base", None, task, encoder, cache)}
    print(table([], base), flush=True)
    inputs = task_inputs(runs, task, pipe, task_train_config(task, "recare", spec).num_images)
    rows = []
    for folder in args.measure:
        folder = folder.expanduser().resolve()
        rows.append({"label": folder.name[-22:], "run": str(folder), **measure(ev, folder.name, folder, task, encoder, cache)})
        print(f"\n{time.strftime('%H:%M:%S')} (load {os.getloadavg()[0]:.1f})\n" + table(rows, base), flush=True)
    for iterations, lr in parse_points(args.points):
        fields = {"device": "cpu"}
        if args.train_method:
            fields["train_method"] = args.train_method
        config = task_train_config(task, "esd", spec, **fields)
        data = config.to_dict()
        data["esd"].update(iterations=iterations, learning_rate=lr)
        config = type(config).from_dict(data)
        started = time.perf_counter()
        run = train_cached(runs, args.task, config, pipe, inputs)
        seconds = time.perf_counter() - started
        label = f"{iterations} it @ {lr:g}" + (f" {args.train_method}" if args.train_method else "")
        row = {"label": label, "iterations": iterations, "lr": lr, "eta": config.esd.eta,
               "weight_decay": config.esd.weight_decay, "train_method": config.train_method, "run": str(run),
               "train_s": seconds, **measure(ev, run.name, run, task, encoder, cache)}
        rows.append(row)
        print(f"\n{time.strftime('%H:%M:%S')} (load {os.getloadavg()[0]:.1f})\n" + table(rows, base), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"task": args.task, "seeds": args.seeds, "base": base, "points": rows,
                                             "bars": {"target": TARGET_BAR, "keep": KEEP_BAR}}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

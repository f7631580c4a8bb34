"""The paper's Table 1 on the mini world, and the CARE score's validity (Fig. 5's analog), as tables.

    python -m benchmarks.evaluation_quality [--tasks tench,van_gogh,smoking]
        [--run tench:esd=RUN_DIR --run tench:recare=RUN_DIR ...] [--out DIR] [--seeds N] [--quick]

For each task, the base model (and every training run given with --run TASK:NAME=RUN_DIR) is
evaluated with `recare.eval.run.evaluate` at the world's settings (recare.json: 64 seeds per
attack prompt, CCE with 1000 textual-inversion steps, 10 images per CARE prompt, 64 held-out
captions, the oracle as the ASR judge, the mini CLIP for the CARE and CLIP scores and the world's
measured CLIP range for RATIO). Printed:

* Table 1 analog: ASR (percent) of the plain prompt ("erased"), of CCE, of the model's own stage-1
  tokens (ReCARE runs), the two probes (completion, noise), CLIP score, CARE score, RATIO, and the evaluation's wall time.
* CARE-score validity: over every (model, CARE concept) pair, the CARE score (mini CLIP
  zero-shot, R-Precision@1) against the oracle's detection rate of that CARE concept on the same
  images (the oracle plays the human raters of the paper's Fig. 5), and their Pearson correlation;
  the same per (model, CARE prompt) pair, a finer view.

Evaluations are run folders under --out; an evaluation whose folder is already complete there is
read back instead of rerun (delete it to measure again).

    python -m benchmarks.evaluation_quality --validity TASK:NAME=EVAL_DIR [--validity ...]

prints only the CARE-score validity over finished evaluation folders (`python -m recare evaluate ...`),
evaluating nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from recare.runtime import set_process_defaults

if __name__ == "__main__":  # a process entry: set OMP_WAIT_POLICY before anything imports torch
    set_process_defaults()

import numpy as np  # noqa: E402

TASKS = ("tench", "van_gogh", "smoking")
DEFAULT_OUT = Path(os.environ.get("RECARE_HOME", Path.home() / ".cache" / "recare")) / "evaluation-bench"


def _parse_runs(items: list[str]) -> dict[str, list[tuple[str, str]]]:
    """--run TASK:NAME=RUN_DIR -> {task: [(name, run_dir), ...]}."""
    runs: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        head, sep, path = item.partition("=")
        task, colon, name = head.partition(":")
        if not sep or not colon or task not in TASKS or not name:
            raise SystemExit(f"--run takes TASK:NAME=RUN_DIR with TASK one of {TASKS} (got {item!r}).")
        runs.setdefault(task, []).append((name, str(Path(path).expanduser().resolve())))
    return runs


def _evaluated(folder: Path, config) -> dict | None:
    """metrics, manifest and records of a finished evaluation with these settings in `folder`, else None."""
    from recare.eval.config import resolve_config
    from recare.eval.config import config_from_file
    from recare.eval.records import read_records

    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if config_from_file(manifest) != resolve_config(config):
        return None
    return {"metrics": metrics, "manifest": manifest, "records": read_records(folder), "seconds": None,
            "cached": True}


def evaluate_model(task: str, name: str, unet: str | None, out: Path, overrides: dict) -> dict:
    """Evaluate one (task, model) into `out/<task>-<name>` (or read a finished one back)."""
    import shutil

    from recare.eval.config import EvaluationConfig
    from recare.eval.run import evaluate

    config = EvaluationConfig(task=task, unet=unet, **overrides)
    folder = out / f"{task}-{name}"
    done = _evaluated(folder, config)
    if done is not None:
        return done
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    # a fixed folder per (task, model): write config.json first so `evaluate` treats it as this run
    from recare.eval.config import resolve_config
    from recare.atomic import atomic_write_json

    atomic_write_json(folder / "config.json", {"command": "evaluate", "evaluation": resolve_config(config).to_dict()})
    result = evaluate(None, run_dir=folder)
    return {"metrics": result.metrics, "manifest": result.manifest, "records": result.records,
            "seconds": time.perf_counter() - started, "cached": False}


def read_evaluation(folder: Path) -> dict:
    """A finished evaluation folder read back: metrics, manifest and records."""
    from recare.eval.records import read_records

    return {"metrics": json.loads((folder / "metrics.json").read_text()),
            "manifest": json.loads((folder / "manifest.json").read_text()), "records": read_records(folder),
            "seconds": None, "cached": True}


def print_validity(results: list[tuple[str, str, dict]]) -> None:
    """The CARE-score validity tables (per concept, then per prompt) with their Pearson r."""
    for by_prompt in (False, True):
        pairs = care_validity(results, by_prompt)
        r = pearson([p[2] for p in pairs], [p[3] for p in pairs])
        what = "CARE prompt" if by_prompt else "CARE concept"
        print(f"\nCARE-score validity per (model, {what}): Pearson r = "
              f"{_fmt(r) if r is not None else 'undefined (no variance across the pairs)'} over {len(pairs)} pairs\n")
        print_table(["model", what, "CARE score (mini CLIP)", "oracle detection", "images"],
                    [[a, b, _fmt(s), _fmt(o), str(n)] for a, b, s, o, n in pairs])


def care_validity(rows: list[tuple[str, str, dict]], by_prompt: bool = False) -> list[tuple[str, str, float, float, int]]:
    """(task, model, concept-or-prompt, CARE score, oracle detection rate, images) per pair.

    The oracle detector of an evaluation records every concept's probability for each image; a CARE
    image counts as showing its concept when that probability reaches the detector's threshold.
    """
    pairs = []
    for task, name, result in rows:
        threshold = result["manifest"]["detector"]["settings"]["threshold"]
        care = [r for r in result["records"] if r["attack"] == "care"]
        keys = sorted({(r["concept"], r["prompt"] if by_prompt else "") for r in care},
                      key=lambda k: [r["index"] for r in care if (r["concept"], r["prompt"] if by_prompt else "") == k][0])
        for concept, prompt in keys:
            rs = [r for r in care if r["concept"] == concept and (not by_prompt or r["prompt"] == prompt)]
            score = float(np.mean([r["care_hit"] for r in rs]))
            oracle = float(np.mean([r["detector_labels"][concept] >= threshold for r in rs]))
            pairs.append((f"{task}/{name}", prompt or concept, score, oracle, len(rs)))
    return pairs


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's r, or None when either side has no variance (r is undefined then)."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _fmt(value, digits=3, percent=False) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if percent else f"{value:.{digits}f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default {','.join(TASKS)})")
    parser.add_argument("--run", action="append", default=[], metavar="TASK:NAME=RUN_DIR",
                        help="a training run to evaluate beside the base model (repeat), e.g. tench:esd=runs/train-...")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"evaluation folders (default {DEFAULT_OUT})")
    parser.add_argument("--seeds", type=int, default=None, help="images per attack prompt (default: recare.json's)")
    parser.add_argument("--quick", action="store_true", help="8 seeds, 100 CCE steps, 2 CARE images per prompt, "
                                                             "16 captions (a sanity run, not the numbers)")
    parser.add_argument("--validity", action="append", default=[], metavar="TASK:NAME=EVAL_DIR",
                        help="only the CARE-score validity over these finished evaluation folders (repeat)")
    args = parser.parse_args(argv)
    if args.validity:
        print_validity([(task, name, read_evaluation(Path(folder)))
                        for task, pairs in _parse_runs(args.validity).items() for name, folder in pairs])
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    runs = _parse_runs(args.run)
    overrides = {"seeds": 8, "cce_steps": 100, "care_images_per_prompt": 2, "clip_count": 16} if args.quick else {}
    if args.seeds is not None:
        overrides["seeds"] = args.seeds

    started = time.perf_counter()
    results = []
    for task in tasks:
        for name, unet in [("base", None)] + runs.get(task, []):
            result = evaluate_model(task, name, unet, args.out, overrides)
            results.append((task, name, result))
            m = result["metrics"]
            print(f"{task} / {name}: ASR {m['asr']}, CLIP {_fmt(m['clip_score'], 4)}, "
                  f"CARE {_fmt((m['care_score'] or {}).get('mean'))}, RATIO {_fmt(m['ratio']['value'])}"
                  + (f", {result['seconds']:.0f} s" if result["seconds"] else " (read back)"), flush=True)

    print("\nTable 1 analog (mini world; ASR % judged by the oracle; CLIP range "
          f"{results[0][2]['metrics']['ratio']['clip_range'] if results else '-'})\n")
    table = []
    for task, name, result in results:
        m = result["metrics"]
        asr = m["asr"]
        table.append([task, name, _fmt(asr.get("erased"), percent=True), _fmt(asr.get("cce"), percent=True),
                      _fmt(asr.get("adversarial"), percent=True), _fmt(asr.get("completion"), percent=True), _fmt(asr.get("noise"), percent=True),
                      _fmt(m["clip_score"], 4), _fmt((m["care_score"] or {}).get("mean")), _fmt(m["ratio"]["value"]),
                      f"{result['seconds']:.0f}" if result["seconds"] else "cached"])
    print_table(["task", "model", "ASR erased", "ASR CCE", "ASR own tokens", "ASR completion", "ASR noise", "CLIP",
                 "CARE", "RATIO", "seconds"], table)

    print_validity(results)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

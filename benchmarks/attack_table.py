"""The benchmark table of evaluation runs: each attack as mean, worst and runs, with CLIP, CARE and RATIO.

    python -m benchmarks.attack_table base=RUN esd=RUN recare=RUN [--markdown]

Each RUN is an evaluation folder (`python -m recare evaluate ...`); the numbers are recomputed from its
records.csv (`recare.eval.run_metrics.compute_metrics`) and checked against its metrics.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell(metrics: dict, attack: str) -> str:
    asr = metrics["asr"].get(attack)
    if asr is None:
        return "-"
    runs = metrics.get("asr_runs", {}).get(attack)
    if not runs:
        return f"{asr:.1f}"
    return f"{asr:.1f} / {max(runs):.1f} ({', '.join(f'{x:.1f}' for x in runs)})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN")
    args = parser.parse_args(argv)
    from recare.eval.config import config_from_file
    from recare.eval.records import read_records
    from recare.eval.run_metrics import compute_metrics

    rows = []
    for item in args.runs:
        name, _, folder = item.partition("=")
        folder = Path(folder)
        metrics = json.loads((folder / "metrics.json").read_text())
        config = config_from_file(json.loads((folder / "manifest.json").read_text()))
        again = compute_metrics(read_records(folder), config)
        assert again["asr"] == metrics["asr"] and again.get("asr_runs") == metrics.get("asr_runs"), folder
        rows.append((name, folder, config, metrics))
    attacks = list(dict.fromkeys(a for _, _, c, _ in rows for a in c.attacks))
    print("| model | " + " | ".join(f"ASR {a} (mean / worst (runs))" for a in attacks)
          + " | CLIP | CARE | RATIO (mean CCE) | RATIO (worst CCE) |")
    print("|---" * (len(attacks) + 5) + "|")
    for name, folder, config, m in rows:
        care = m["care_score"]["mean"] if m.get("care_score") else None
        ratio = m["ratio"].get("value")
        worst = (m["ratio"].get("worst") or {}).get("value")
        print(f"| {name} | " + " | ".join(cell(m, a) for a in attacks)
              + f" | {m['clip_score']:.4f} | {care:.3f} | " + (f"{ratio:.3f}" if ratio is not None else "-")
              + " | " + (f"{worst:.3f}" if worst is not None else "-") + " |")
    for name, folder, config, m in rows:
        print(f"{name}: {folder} (seeds {config.seeds}, attack runs {config.attack_runs}, CCE {config.cce_steps} steps "
              f"on {config.cce_images} {config.reference_images} images, UD {config.ud_timesteps} x {config.ud_iterations}, "
              f"k {config.ud_k}, {len(config.ud_prompts)} prompts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

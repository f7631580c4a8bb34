"""The benchmark table of evaluation runs: each attack as mean, worst and runs, with CLIP, CARE and RATIO.

    python -m benchmarks.attack_table base=RUN esd=RUN recare=RUN [--markdown]

Each RUN is an evaluation folder (`python -m recare evaluate ...`); the numbers are recomputed from its
records.csv (`recare.eval.run_metrics.compute_metrics`) and checked against its metrics.json. Below the table:
each run's settings, the L2 norm of every CCE run's token (and of the trained model's own stage-1
tokens) beside the norm range of the words the mini world trained (an attack token far outside that
range is off the word manifold).
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


def token_norms(folder: Path) -> list[float]:
    """L2 norms of the learned-token files in `folder` (tokens/*.safetensors or cce/[runN/]token.safetensors)."""
    from safetensors import safe_open

    files = sorted(folder.glob("cce/token.safetensors")) + sorted(folder.glob("cce/run*/token.safetensors"),
                                                                  key=lambda f: int(f.parent.name[3:]))
    files += sorted(folder.glob("tokens/*.safetensors"))
    norms = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            norms += [float(h.get_tensor(k).float().norm()) for k in h.keys()]
    return norms


def word_norm_range(model: str = "mini-world") -> tuple[float, float] | None:
    """(min, max) token-embedding norm over the words the mini world trained, None for another model."""
    if model != "mini-world":
        return None
    from recare import worldspec
    from recare.models import load_pipeline

    pipe = load_pipeline(model, device="cpu", dtype="fp32")
    ids = [pipe.tokenizer.convert_tokens_to_ids(w + "</w>") for w in worldspec.mini_world_words(worldspec.mini_world_spec())]
    norms = pipe.text_encoder.get_input_embeddings().weight[ids].detach().norm(dim=1)
    return float(norms.min()), float(norms.max())


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
    for name, folder, config, m in rows:
        own = token_norms(Path(config.unet)) if config.unet and Path(config.unet).is_dir() else []
        print(f"{name}: CCE token norm per run {', '.join(f'{x:.2f}' for x in token_norms(folder)) or '-'}"
              + (f"; its stage-1 tokens {', '.join(f'{x:.2f}' for x in own)}" if own else ""))
    span = word_norm_range(rows[0][2].model or "mini-world") if rows else None
    if span:
        print(f"trained words' token norms: {span[0]:.2f}-{span[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

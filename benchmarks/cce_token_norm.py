"""Does CCE need its off-manifold token norm? Each CCE run's token as learned and rescaled to a trained word's norm.

    python -m benchmarks.cce_token_norm [--norm 0.53] [--seeds 8] [--out FILE.json] NAME=EVAL_DIR ...

For every evaluation folder (`python -m recare evaluate ... --attacks cce`) and each of its CCE runs, the
run's token (`cce/[runN/]token.safetensors`) is used twice against the evaluated model: as learned, and
scaled to `--norm` (default 0.53, the largest token-embedding norm of a word the mini world trained; see
`benchmarks.attack_table`), with "A photo of a <cce*>" on seeds 42, 43, ... and the bundled oracle judging the
target. The images go to `<EVAL_DIR>/../rescale-run<r>-<learned|normX>/`. The learned rows repeat the
evaluation's own CCE counts (same prompt, seeds and model), a check that nothing else changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=EVAL_DIR")
    parser.add_argument("--norm", type=float, default=0.53, help="the norm the token is scaled to (default 0.53)")
    parser.add_argument("--seeds", type=int, default=8, help="images per token, seeds 42 + i (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    from safetensors import safe_open

    from recare.eval.attacks import attack_prompt, render, with_token
    from recare.eval.config import config_from_file
    from recare.miniworld.oracle import load_oracle
    from recare.models import load_pipeline
    from recare.train.textual_inversion import LearnedToken

    oracle = load_oracle()
    seeds = list(range(42, 42 + args.seeds))
    out = {}
    print("| model | CCE run | token | norm | target found |")
    print("|---|---|---|---|---|")
    for item in args.runs:
        name, _, folder = item.partition("=")
        folder = Path(folder)
        config = config_from_file(json.loads((folder / "manifest.json").read_text()))
        pipe = load_pipeline(config.model or "mini-world", device="cpu", dtype="fp32", trained=config.unet)
        files = [folder / "cce" / "token.safetensors"] + sorted(
            folder.glob("cce/run*/token.safetensors"), key=lambda f: int(f.parent.name[3:]))
        rows = []
        for run, file in enumerate(files):
            with safe_open(str(file), framework="pt") as f:
                (placeholder,) = list(f.keys())
                learned = f.get_tensor(placeholder).float()
            for label, emb in (("learned", learned), (f"norm{args.norm:g}", learned * (args.norm / learned.norm()))):
                images = render(with_token(pipe, [LearnedToken(placeholder, config.initializer_token, emb)]),
                                [attack_prompt(config.prompt_style, placeholder)] * len(seeds), seeds, config)
                found = int(oracle.detect(images, config.target_concept).sum())
                where = folder.parent / f"rescale-run{run}-{label}"
                where.mkdir(exist_ok=True)
                for seed, image in zip(seeds, images):
                    image.save(where / f"s{seed}.png")
                rows.append({"run": run, "token": label, "norm": float(emb.norm()), "found": found,
                             "images": len(seeds), "folder": str(where)})
                print(f"| {name} | {run} | {label} | {float(emb.norm()):.2f} | {found} of {len(seeds)} |", flush=True)
        out[name] = rows
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

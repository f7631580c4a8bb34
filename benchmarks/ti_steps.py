"""Stage 1's textual inversion, 1000 (the mini world's) against 3000 (official) steps, on tench round 1.

    python -m benchmarks.ti_steps [--runs DIR]

Needs the tench runs of `python -m benchmarks.unlearning_quality --tasks tench` in --runs (the
stage-1 round-1 erased UNet and the task's target images). Learns "<v1*>" from round 1's images
against that erased UNet with each step count (the world's other TI settings), then generates
"a photo of <v1*>" on 64 seeds (42 + i) on the erased model and on the base and prints how often
the oracle finds a tench.
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

from recare.runtime import set_process_defaults

if __name__ == "__main__":
    set_process_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from benchmarks.unlearning_quality import DEFAULT_RUNS  # noqa: E402
from recare.models import load_pipeline, derive_pipeline
from recare.generate import generate_images, load_images
from recare.worldspec import generate_defaults, mini_world_spec
from recare.workflows import mini_world_task, task_train_config
from recare.train.recipe import round_images
from recare.train.textual_inversion import learn_token, with_learned_tokens
from recare.miniworld.oracle import load_oracle
from recare.eval.detectors import _oracle_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help=f"the unlearning benchmark's runs (default {DEFAULT_RUNS})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    U = args.runs.expanduser() / "tench"
    base = load_pipeline("mini-world", device="cpu", dtype="fp32"); base.set_progress_bar_config(disable=True)
    stage1 = sorted(p for p in U.glob("esd-*") if json.loads((p / "config.json").read_text())["train"]["esd"]["iterations"] == 100)
    erased = derive_pipeline(base, trained=stage1[0]); erased.set_progress_bar_config(disable=True)
    images = round_images(load_images(U / "inputs-16" / "target_images"), 0, 2)
    cfg = task_train_config(mini_world_task("tench"), "recare").stage1.textual_inversion
    oracle, thr, spec = load_oracle(), _oracle_threshold(), mini_world_spec()
    out = {}
    for steps in (1000, 3000):
        t = time.perf_counter()
        token = learn_token((erased.unet, erased.vae, erased.text_encoder, erased.tokenizer, erased.scheduler), images,
                            placeholder="<v1*>", config=dataclasses.replace(cfg, steps=steps))
        secs = time.perf_counter() - t
        row = {"ti_seconds": round(secs), "final_loss_mean_last100": float(np.mean(token.losses[-100:]))}
        for name, pipe in (("erased", erased), ("base", base)):
            tok, enc = with_learned_tokens(pipe.tokenizer, pipe.text_encoder, [token])
            p = StableDiffusionPipeline(**{**pipe.components, "tokenizer": tok, "text_encoder": enc})
            p.set_progress_bar_config(disable=True)
            gen = dataclasses.replace(generate_defaults(spec), prompt="a photo of <v1*>", num_images=64)
            probs = oracle.predict(generate_images(p, gen).images)
            row[name] = float((probs[:, list(oracle.concepts).index("tench")] >= thr).mean())
        out[steps] = row
        print(f"TI {steps} steps: {row}", flush=True)


if __name__ == "__main__":
    main()

"""How thoroughly does stage 1 search? Its round-1 token's strength by images, TI steps and erase strength.

    python -m benchmarks.stage1_search [--task tench] [--images 30] [--steps 500,1000,2000]
        [--erase 100:4e-4] [--seeds 32] [--train-seed 42] [--ti-seeds 42,43,44] [--out DIR]

For each erase strength (stage-1 ESD "iterations:lr"), the base mini-world UNet is erased as round 1
of stage 1 does it (the reference word, the world's recipe otherwise). For each number of images per
round, a fresh "<v1*>" is learned by textual inversion against that erased UNet from the first
`images` target images (seeds 42 + i, the world's generation settings); the token is snapshotted at
every step count of --steps within one run (the learning rate is constant, so the snapshot at step s
is the token an s-step run makes). Each token is probed with `recare.train.stage1_probe` on --seeds
seeds: the fraction of images of "a photo of <v1*>" the bundled oracle calls the target, on the
original model and on the erased one. Erased UNets, tokens and probes are cached in --out, so a
second call with more settings only computes what is new. Wall times are those of this machine.
--train-seed is the training's `--seed` (the erase's roll-outs); --ti-seeds are textual-inversion seeds
(`TextualInversionConfig.seed`, 42 by default as the official code), one inversion each: several of them
against the same erased model show how much of a round's strength is the inversion's own draw.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from recare.runtime import set_process_defaults

if __name__ == "__main__":
    set_process_defaults()

import torch  # noqa: E402

DEFAULT_OUT = Path(os.environ.get("RECARE_HOME", Path.home() / ".cache" / "recare")) / "stage1-search"


def _erase(base, config, iterations: int, lr: float) -> dict:
    """Round 1's ESD of the reference word on a copy of the base UNet: {name: trained tensor}."""
    import copy

    from recare.train.esd import ESDTrainer
    from recare.train.params import trainable_parameter_names
    from recare.train.rollout import XtSampler, encode_prompts

    student = copy.deepcopy(base.unet).float()
    esd = dataclasses.replace(config.stage1.esd, iterations=iterations, learning_rate=lr)
    unet_cfg, vae_cfg = base.unet.config, base.vae.config
    size = unet_cfg.sample_size
    if config.rollout.resolution:
        size = config.rollout.resolution // 2 ** (len(vae_cfg.block_out_channels) - 1)
    sampler = XtSampler(base.scheduler, (unet_cfg.in_channels, size, size), config.rollout, base.unet.device)
    word = config.reference_word
    embeddings = encode_prompts(base.tokenizer, base.text_encoder, ["", word], device=base.unet.device)
    ESDTrainer(student, base.unet, sampler, embeddings, word, esd, stage="stage1.erase",
               train_method=config.train_method, seed=config.seed).run()
    params = dict(student.named_parameters())
    return {n: params[n].detach().clone() for n in trainable_parameter_names(base.unet, config.train_method)}


def _unet_with(base, tensors: dict):
    import copy

    unet = copy.deepcopy(base.unet)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    unet.requires_grad_(False)
    return unet


def _images(base, task: dict, n: int, folder: Path) -> list:
    """The task's first `n` target images (seeds 42 + i, the world's generation settings), made once."""
    from recare.generate import generated_images
    from recare.worldspec import generate_defaults

    gen = dataclasses.replace(generate_defaults(), prompt=task["target_prompt"], num_images=n)
    return generated_images(base, gen, folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="tench")
    parser.add_argument("--images", default="30", help="images per round, comma-separated (default 30, CCE's count)")
    parser.add_argument("--steps", default="500,1000,2000", help="TI step counts, comma-separated (one run, snapshots)")
    parser.add_argument("--erase", default="100:4e-4", help="stage-1 ESD strengths 'iterations:lr', comma-separated")
    parser.add_argument("--seeds", type=int, default=32, help="probe images per model (default 32)")
    parser.add_argument("--train-seed", type=int, help="the training seed of the erase (default: the task's, 42)")
    parser.add_argument("--ti-seeds", help="textual-inversion seeds, comma-separated (default: the config's, 42)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from recare.models import load_pipeline
    from recare.train.stage1_probe import Stage1Probe, detector_judge, generation_settings
    from recare.train.textual_inversion import LearnedToken, TextualInversionState, learn_token
    from recare.workflows import mini_world_task, task_train_config

    task = mini_world_task(args.task)
    config = task_train_config(task, "recare")
    if args.train_seed is not None:
        config = dataclasses.replace(config, seed=args.train_seed)
    ti_seeds = [int(x) for x in args.ti_seeds.split(",")] if args.ti_seeds else [config.stage1.textual_inversion.seed]
    # the cache names of the default seeds stay as they were, so earlier sweeps are reused
    erase_tag = "" if config.seed == 42 else f"-seed{config.seed}"
    out = args.out.expanduser() / task["name"]
    out.mkdir(parents=True, exist_ok=True)
    base = load_pipeline("mini-world", device="cpu", dtype="fp32")
    base.set_progress_bar_config(disable=True)
    judge = detector_judge("mini-world", task["target_concept"], task.get("prompt_style", "photo"))
    generation = generation_settings("mini-world", args.seeds)
    probe_base = Stage1Probe(base, judge, generation, task.get("prompt_style", "photo"))
    step_counts = sorted(int(s) for s in args.steps.split(","))
    image_counts = [int(s) for s in args.images.split(",")]
    images_all = _images(base, task, max(image_counts), out / f"images-{max(image_counts)}")
    rows = []
    for erase in args.erase.split(","):
        iterations, lr = int(erase.split(":")[0]), float(erase.split(":")[1])
        path = out / f"erased-{iterations}-{lr:g}{erase_tag}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
        else:
            t = time.perf_counter()
            saved = {"tensors": _erase(base, config, iterations, lr), "seconds": time.perf_counter() - t}
            torch.save(saved, path)
        erased = _unet_with(base, saved["tensors"])
        word_rate = _cached(out / f"word-{iterations}-{lr:g}{erase_tag}-{args.seeds}.json", lambda: {"erased": _word_rate(
            base, erased, task, judge, generation)})["erased"]
        print(f"erase {iterations} it at lr {lr:g}: {saved['seconds']:.0f} s; '{task['target_prompt']}' -> "
              f"{word_rate:.0%} on the erased model", flush=True)
        for n_images, ti_seed in [(n, t) for n in image_counts for t in ti_seeds]:
            ti_tag = "" if ti_seed == 42 else f"-ti{ti_seed}"
            key = f"{iterations}-{lr:g}{erase_tag}-{n_images}img-{max(step_counts)}{ti_tag}"
            tok_path = out / f"tokens-{key}.pt"
            if tok_path.is_file():
                tokens = torch.load(tok_path, weights_only=True)
            else:
                snaps, started = {}, time.perf_counter()
                state = TextualInversionState()

                def keep(event, state=state, snaps=snaps, started=started):
                    if event.step in step_counts:
                        snaps[event.step] = {"embedding": state.embedding.clone(),
                                             "seconds": time.perf_counter() - started,
                                             "loss100": sum(state.losses[-100:]) / min(100, len(state.losses))}
                ti = dataclasses.replace(config.stage1.textual_inversion, steps=max(step_counts), seed=ti_seed)
                learn_token((erased, base.vae, base.text_encoder, base.tokenizer, base.scheduler), images_all[:n_images],
                            placeholder="<v1*>", config=ti, progress=keep, state=state)
                tokens = snaps
                torch.save(tokens, tok_path)
            for steps in step_counts:
                snap = tokens[steps]
                token = LearnedToken("<v1*>", config.initializer_token, snap["embedding"])
                probe = _cached(out / f"probe-{key}-{steps}-{args.seeds}.json",
                                lambda token=token: _strength(probe_base(0, token, erased)))
                row = {"train_seed": config.seed, "ti_seed": ti_seed,
                       "erase_it": iterations, "erase_lr": lr, "erase_s": saved["seconds"], "word_erased": word_rate,
                       "images": n_images, "steps": steps, "ti_s": snap["seconds"], "loss100": snap["loss100"], **probe}
                rows.append(row)
                print(_line(row), flush=True)
    print()
    print(_table(rows, args))
    return 0


def _word_rate(base, erased, task, judge, generation) -> float:
    from recare.generate import generate_images
    from recare.models import derive_pipeline

    pipe = derive_pipeline(base)
    pipe.unet = erased
    images = generate_images(pipe, dataclasses.replace(generation, prompt=task["target_prompt"])).images
    hits = [bool(h) for h in judge(images)]
    return sum(hits) / len(hits)


def _strength(strength) -> dict:
    return {"original": strength.original, "erased": strength.erased, "norm": strength.norm}


def _cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    data = make()
    path.write_text(json.dumps(data))
    return data


def _line(r: dict) -> str:
    return (f"seed {r['train_seed']} ti {r['ti_seed']} | erase {r['erase_it']:>4} it {r['erase_lr']:<7g} word {r['word_erased']:>4.0%} | {r['images']:>3} img "
            f"{r['steps']:>5} steps {r['ti_s']:>6.0f} s loss {r['loss100']:.4f} | <v1*> original {r['original']:>4.0%} "
            f"erased {r['erased']:>4.0%} norm {r['norm']:.3f}")


def _table(rows: list[dict], args) -> str:
    head = (f"stage-1 round 1, task {args.task}, {args.seeds} probe seeds, bundled oracle "
            f"(load {os.getloadavg()[0]:.1f} at the end)\n"
            "| training seed | TI seed | erase it | erase lr | ESD s | target word on erased | images | TI steps | TI s | "
            "<v1*> original | <v1*> erased | norm |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    body = [f"| {r['train_seed']} | {r['ti_seed']} | {r['erase_it']} | {r['erase_lr']:g} | {r['erase_s']:.0f} | {r['word_erased']:.0%} | {r['images']} | "
            f"{r['steps']} | {r['ti_s']:.0f} | {r['original']:.0%} | {r['erased']:.0%} | {r['norm']:.3f} |" for r in rows]
    return "\n".join([head, *body])


if __name__ == "__main__":
    raise SystemExit(main())

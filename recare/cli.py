"""`python -m recare <command> ...`: the command-line view over the library (the app is the other).

Commands live in one table (`COMMANDS`): each has a help line, a function that adds its arguments,
and a function that runs it. A new command (train, evaluate) is one more row.

Every command writes into a fresh run folder under `--out` (see `recare.runs`) and prints that
folder as the last line of stdout, so scripts can pick it up. Progress bars go to stderr. Bad input
(any `recare.errors.RecareError`) ends with one line `error: ...` and exit code 2 (set
RECARE_DEBUG=1 for the traceback); anything else is a bug and shows its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from recare import __version__, worldspec
from recare.cli_args import add_common, check_folder_arg, is_file, overrides
from recare.cli_evaluate import add_evaluate_arguments, run_evaluate
from recare.config import CareSetConfig, ConfigError, GenerateConfig
from recare.errors import Cancelled, RecareError, RunError
from recare.jobs.targets import TRAIN as TRAIN_TARGET  # the app's training job: a task's inputs made in the job

EXIT_USAGE = 2
EXIT_CANCELLED = 130  # as for Ctrl+C: a cancelled job saved its state and can be resumed


# ---------------------------------------------------------------------------------------------
# generate

_GENERATE_FIELDS = {"prompt": "prompt", "num_images": "num_images", "base_seed": "seed", "steps": "steps",
                    "guidance": "guidance", "batch_size": "batch_size", "negative_prompt": "negative_prompt",
                    "height": "height", "width": "width"}


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    d = GenerateConfig()
    parser.add_argument("--model", default="mini-world",
                        help="'mini-world', a hub id (e.g. CompVis/stable-diffusion-v1-4) or a local diffusers folder")
    parser.add_argument("--prompt", help=f"what the images show (default: the mini world's prompt, else {d.prompt!r})")
    parser.add_argument("--num-images", type=int, help=f"how many images (default {d.num_images}; official 500)")
    parser.add_argument("--seed", type=int, help=f"base seed; image i uses seed+i (default {d.base_seed})")
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default {d.steps})")
    parser.add_argument("--guidance", type=float, help=f"classifier-free guidance scale (default {d.guidance})")
    parser.add_argument("--batch-size", type=int, help=f"images per pipeline call; never changes the images (default {d.batch_size})")
    parser.add_argument("--negative-prompt", help="negative prompt (default: none)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's native size)")
    parser.add_argument("--dtype", default="auto", help="'auto' (fp16 on CUDA, fp32 otherwise), 'fp16', 'bf16', 'fp32'")
    add_common(parser)


def run_generate(args: argparse.Namespace) -> Path:
    from recare.generate import check_generate_limits, generate_images, save_generation
    from recare.models import MINI_WORLD, load_pipeline
    from recare.progress import TqdmProgress
    from recare.atomic import atomic_write_json
    from recare.runs import new_run_dir

    base = worldspec.generate_defaults() if args.model == MINI_WORLD else GenerateConfig()
    config = GenerateConfig.from_dict({**base.to_dict(), **overrides(args, _GENERATE_FIELDS)})
    check_generate_limits(config)
    check_folder_arg("--out", args.out)

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    with TqdmProgress(unit="img") as bar:
        result = generate_images(pipe, config, progress=bar)
    run_dir = new_run_dir(args.out, "generate")
    atomic_write_json(run_dir / "config.json", {
        "command": "generate", "recare_version": __version__, "model": args.model,
        "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""), "generate": config.to_dict(),
    })
    save_generation(result, run_dir)
    print(f"{len(result.images)} images of {config.prompt!r} (seeds {result.seeds[0]}..{result.seeds[-1]}) "
          f"in {result.metadata['seconds']:.1f} s")
    return run_dir


# ---------------------------------------------------------------------------------------------
# careset

_CARESET_FIELDS = {"reference_word": "reference_word", "prompt_style": "prompt_style", "top_k": "top_k",
                   "top_n": "top_n", "projection": "projection", "n_clusters": "n_clusters",
                   "k_each_side": "k_each_side", "alpha": "alpha", "min_cluster_size": "min_cluster_size",
                   "seed": "seed", "global_clustering": "global_clustering",
                   "intra_refinement": "intra_refinement"}


def add_careset_arguments(parser: argparse.ArgumentParser) -> None:
    d = CareSetConfig()
    parser.add_argument("--images", required=True, metavar="DIR|ZIP",
                        help="the target images: a folder (e.g. a generate run folder) or a .zip of images")
    parser.add_argument("--reference-word", help=f"the concept to erase; its text feature is e_c (default {d.reference_word!r})")
    parser.add_argument("--encoder", default="mini-world",
                        help="'mini-world', 'open_clip:ViT-B-32/openai' (official), 'open_clip:<arch>/<pretrained>', "
                             "or a local transformers CLIPModel folder")
    parser.add_argument("--vocab", metavar="clip-bpe|FILE",
                        help="'clip-bpe' (49,408 CLIP BPE tokens, official) or a text file with one word per line "
                             "(default: the mini world's word list with the mini-world encoder, else clip-bpe)")
    parser.add_argument("--prompt-style", choices=("photo", "painting"),
                        help=f"retain prompts 'A photo of <w>' or 'A painting of <w>' (default {d.prompt_style})")
    parser.add_argument("--top-k", type=int, help=f"K: tokens kept per image, Eq. 5 (default {d.top_k})")
    parser.add_argument("--top-n", type=int, help=f"N: most frequent tokens kept as candidates (default {d.top_n})")
    parser.add_argument("--projection", choices=("tsne", "umap"), help=f"2-D projection (default {d.projection})")
    parser.add_argument("--n-clusters", type=int, help=f"k-means clusters (default {d.n_clusters}; official code 7)")
    parser.add_argument("--k-each-side", type=int,
                        help=f"clusters dropped at each end of the mean-residual order, Eq. 7 (default {d.k_each_side})")
    parser.add_argument("--alpha", type=float, help=f"intra-cluster tolerance, Eq. 9 (default {d.alpha})")
    parser.add_argument("--min-cluster-size", type=int,
                        help=f"smaller clusters skip intra-cluster refinement (default {d.min_cluster_size})")
    parser.add_argument("--seed", type=int, help=f"t-SNE/UMAP and k-means seed (default {d.seed})")
    parser.add_argument("--no-global-clustering", dest="global_clustering", action="store_const", const=False,
                        help="ablation: skip the global cluster filter (paper Table 3)")
    parser.add_argument("--no-intra-refinement", dest="intra_refinement", action="store_const", const=False,
                        help="ablation: skip the intra-cluster refinement (paper Table 3)")
    parser.add_argument("--cache-dir", help="vocabulary-feature cache (default: $RECARE_CACHE or ~/.cache/recare/vocab)")
    add_common(parser)


def _vocabulary(args: argparse.Namespace, spec: dict):
    from recare.encoders import clip_bpe_vocabulary, read_word_list, word_list_vocabulary
    from recare.models import MINI_WORLD

    if args.vocab == "clip-bpe":
        return clip_bpe_vocabulary()
    if args.vocab is not None:
        if not is_file(Path(args.vocab)):
            raise ConfigError(f"--vocab {args.vocab!r} is neither 'clip-bpe' nor an existing word-list file.")
        return read_word_list(args.vocab)
    words = worldspec.mini_world_words(spec) if args.encoder == MINI_WORLD else None
    return word_list_vocabulary(words, source="mini-world") if words else clip_bpe_vocabulary()


def _task_for_images(spec: dict, args: argparse.Namespace) -> dict | None:
    """The mini-world task the images belong to, when it can tell.

    The task is the one named by --reference-word, else the one whose target prompt made the images
    (read from the manifest.json of a generate run folder).
    """
    if args.reference_word is not None:
        return worldspec.task_for_reference(args.reference_word, spec)
    manifest = Path(args.images) / "manifest.json"
    if not is_file(manifest):
        return None
    try:
        prompt = str(json.loads(manifest.read_text(encoding="utf-8")).get("prompt", ""))
    except (OSError, ValueError, AttributeError):
        return None
    return worldspec.task_for_prompt(prompt, spec)


def run_careset(args: argparse.Namespace) -> Path:
    from recare.generate import images_summary, load_images
    from recare.models import MINI_WORLD, load_encoder
    from recare.progress import TqdmProgress
    from recare.atomic import atomic_write_json
    from recare.runs import new_run_dir
    from recare.workflows import careset_from_images, write_careset_files

    check_folder_arg("--out", args.out)
    check_folder_arg("--cache-dir", args.cache_dir)
    spec = worldspec.mini_world_spec() if args.encoder == MINI_WORLD else {}
    task = _task_for_images(spec, args)
    base = worldspec.careset_defaults(spec, task) if spec else CareSetConfig()
    config = CareSetConfig.from_dict({**base.to_dict(), **overrides(args, _CARESET_FIELDS)})

    images = load_images(args.images)
    vocab = _vocabulary(args, spec)
    encoder = load_encoder(args.encoder, device=args.device)
    print(f"encoding {len(images)} images and {len(vocab)} vocabulary tokens with {encoder.identity}", file=sys.stderr)
    with TqdmProgress() as bar:
        careset = careset_from_images(images, config, encoder, vocab, cache_dir=args.cache_dir, progress=bar)

    run_dir = new_run_dir(args.out, "careset")
    atomic_write_json(run_dir / "config.json", {
        "command": "careset", "recare_version": __version__, "careset": config.to_dict(),
        "encoder": {"name": str(args.encoder), "identity": encoder.identity},
        "vocabulary": {"source": vocab.source, "size": len(vocab), "hash": vocab.hash},
        "images": {"source": str(args.images), **images_summary(images)},
    })
    write_careset_files(careset, run_dir)
    kept = careset.final_tokens()
    print(f"{len(careset.tokens)} candidates -> {len(kept)} CARE tokens for {config.reference_word!r}: "
          + ", ".join(kept[:20]) + (" ..." if len(kept) > 20 else ""))
    return run_dir


# ---------------------------------------------------------------------------------------------
# train

TRAIN_METHOD_CHOICES = ("recare", "esd", "recare-no-adv", "recare-no-retain")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from recare.config import OUTPUT_FORMATS, TRAIN_METHODS, TrainConfig

    d = TrainConfig()
    s1, s2 = d.stage1, d.stage2
    parser.add_argument("--model", default="mini-world",
                        help="base model: 'mini-world', a hub id (CompVis/stable-diffusion-v1-4) or a local diffusers folder "
                             "(default: mini-world)")
    parser.add_argument("--task", help="a mini-world task (tench, van_gogh, smoking): fills the target prompt, reference "
                                       "word, initializer and the world's recommended settings (recare.json), and "
                                       "builds the CARE-set when --careset is absent")
    parser.add_argument("--target-prompt", help=f"prompt of the target images (default {d.target_prompt!r})")
    parser.add_argument("--reference-word", help=f"the concept erased, ESD's prompt and H's first element (default {d.reference_word!r})")
    parser.add_argument("--initializer-token", help=f"adversarial tokens start from this word (default {d.initializer_token!r})")
    parser.add_argument("--careset", metavar="FILE", help="careset.json (official) or careset.rich.json: stage 2's anchor "
                                                          "and retain prompts (required for ReCARE unless --task)")
    parser.add_argument("--images", metavar="DIR|ZIP", help="target images for textual inversion (default: generate "
                                                           "--num-images of the target prompt into the run folder)")
    parser.add_argument("--num-images", type=int, help=f"target images generated when --images is absent (default {d.num_images}; official 500)")
    parser.add_argument("--method", choices=TRAIN_METHOD_CHOICES, default="recare",
                        help="recare (stage 1 + 2), esd (the baseline), recare-no-adv (H = {target}), "
                             "recare-no-retain (lambda 0) (default: recare)")
    parser.add_argument("--iterations", type=int, help=f"erase iterations of every stage-1 round, stage 2 and ESD "
                                                        f"(default {s2.iterations}; the esd method 1000)")
    parser.add_argument("--stage1-iterations", type=int, help=f"erase iterations of every stage-1 round (default: "
                                                               f"--iterations, else {s1.esd.iterations})")
    parser.add_argument("--ti-steps", type=int, help=f"textual-inversion steps per stage-1 round (default {s1.textual_inversion.steps})")
    parser.add_argument("--min-token-strength", type=float, metavar="FRACTION",
                        help=f"not official: a stage-1 token joins stage 2's H only if it draws the target in at least "
                             f"this fraction of the probe's images on the original model (default {s1.min_token_strength} "
                             f"= every token; --task tench: the world's 0.5)")
    parser.add_argument("--stage1-attempts", type=int, metavar="N",
                        help=f"not official: textual inversions per stage-1 round, the strongest kept (default {s1.attempts})")
    parser.add_argument("--search-original", action=argparse.BooleanOptionalAction, default=None,
                        help="not official: when no inversion of a round reaches --min-token-strength, one more against "
                             "the original UNet (default off; --task tench: the world's on)")
    parser.add_argument("--closing-rounds", type=int, metavar="N",
                        help=f"not official: after stage 2, up to N rounds of the attacker's own search (textual "
                             f"inversion) against the trained UNet; a token that still draws the target joins H and "
                             f"stage 2 goes on (default {s2.closing_rounds} = off; 0 turns a task's setting off)")
    parser.add_argument("--closing-attempts", type=int, metavar="N",
                        help=f"not official: textual inversions per closing round (default {s2.closing_attempts}; "
                             "--task tench: the world's 2)")
    parser.add_argument("--closing-ti-steps", type=int, metavar="N",
                        help="not official: textual-inversion steps of each closing inversion (default: stage 1's; "
                             "--task tench: the world's 1000)")
    parser.add_argument("--closing-probe-steps", type=int, metavar="N",
                        help="not official: also probe each closing inversion after N steps, then let it go on (two "
                             "candidates an inversion; default off, 0 turns a task's setting off; --task tench: the "
                             "world's 250). docs/results.md measured tench's earlier searches with --closing-attempts 3 "
                             "--closing-ti-steps 250 --closing-probe-steps 0 and --closing-attempts 3")
    parser.add_argument("--lr", type=float, help=f"learning rate of the final stage: stage 2 (default {s2.learning_rate}) "
                                                 "or the ESD baseline (default 1e-5)")
    parser.add_argument("--train-method", choices=TRAIN_METHODS, help=f"trainable UNet parameters (default {d.train_method})")
    parser.add_argument("--seed", type=int, help=f"roll-out noise, k, prompt order (default {d.seed})")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                        help=f"compute precision: auto = fp32 on CPU, bf16 autocast on CUDA (default {d.dtype})")
    parser.add_argument("--gradient-checkpointing", action="store_const", const=True,
                        help="trade compute for memory in the backward pass (default off)")
    parser.add_argument("--rollout-batch", type=int, help="opt-in: roll out this many upcoming iterations at once with "
                                                          "the current weights (faster, changes the result; default 1 = official)")
    parser.add_argument("--outputs", help=f"comma list of {', '.join(OUTPUT_FORMATS)} (default trained_params)")
    parser.add_argument("--save-every", type=int, help=f"iterations between resumable-state saves (default {d.save_every})")
    parser.add_argument("--resume", metavar="RUN", help="continue a cancelled or failed run (its id under --out, or its folder)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', ... (default auto)")
    parser.add_argument("--out", metavar="DIR", help="the runs folder (default: $RECARE_HOME/runs or ~/.cache/recare/runs, "
                                                     "where the app finds them too)")


def _train_config(args: argparse.Namespace, task: dict | None):
    """The TrainConfig the command line asks for (`recare.workflows.training_config`, as the app's Train tab)."""
    from recare.workflows import training_config

    fields: dict[str, Any] = overrides(args, {
        "target_prompt": "target_prompt", "reference_word": "reference_word", "initializer_token": "initializer_token",
        "num_images": "num_images", "train_method": "train_method", "seed": "seed", "dtype": "dtype",
        "gradient_checkpointing": "gradient_checkpointing", "save_every": "save_every", "device": "device"})
    fields["model"] = args.model
    if args.outputs is not None:
        fields["outputs"] = [o.strip() for o in args.outputs.split(",") if o.strip()]
    for name, value in (("images", args.images), ("careset", args.careset)):
        if value is not None:
            fields[name] = str(Path(value).expanduser().resolve())
    return training_config(task, args.method, iterations=args.iterations, stage1_iterations=args.stage1_iterations,
                           ti_steps=args.ti_steps, lr=args.lr, rollout_batch=args.rollout_batch,
                           min_token_strength=args.min_token_strength, stage1_attempts=args.stage1_attempts,
                           search_original=args.search_original, closing_rounds=args.closing_rounds,
                           closing_attempts=args.closing_attempts, closing_ti_steps=args.closing_ti_steps,
                           closing_probe_steps=args.closing_probe_steps, **fields)


def _run_train_job(run, listener) -> Path:
    """Run the training job in the foreground; Ctrl+C asks it to stop after the current iteration."""
    import signal

    from recare.errors import Cancelled, TrainingError
    from recare.jobs import run_job
    from recare.runs import CANCELLED, FAILED

    def stop(signum, frame):  # the job saves its state and ends as cancelled (resumable)
        print("\ncancelling after the current iteration (Ctrl+C again to abort)...", file=sys.stderr)
        run.request_cancel()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        status = run_job(run, TRAIN_TARGET, listener=listener)
    finally:
        signal.signal(signal.SIGINT, previous)
    if status["state"] == CANCELLED:
        raise Cancelled(f"training cancelled; its state is saved in {run.path}. "
                        f"Resume with: python -m recare train --resume {run.path}")
    if status["state"] == FAILED:
        hint = f" Resume with: python -m recare train --resume {run.path}" if status.get("resumable") else ""
        raise TrainingError(f"training failed: {status.get('error')} (run folder {run.path}).{hint}")
    result = status.get("result") or {}
    seconds = result.get("seconds")
    print(f"trained {result.get('method', '')} in {seconds:.0f} s" if isinstance(seconds, (int, float)) else "trained",
          file=sys.stderr)
    return run.path


ONE_THREAD_NOTE = ("one CPU thread for the mini world (the setting of every published result; OMP_NUM_THREADS "
                   "chooses another)")


def one_thread_for_the_mini_world(model: str, device: str) -> bool:
    """Train the mini world on the CPU with one torch thread, unless OMP_NUM_THREADS says otherwise; True when set.

    Why: every trained model the results tables attack was made with one thread, and another thread count
    rounds floats differently, so the same seed would train other tensors. On this small model one thread is
    also faster: tench's recipe took 6 min 37 s with one thread and 7 min 54 s with torch's default two, alone
    on the 2-core machine (docs/results.md). Only the CLI does this: the whole process is the job's, where in the
    app a job may be a thread of a process that serves others.
    """
    import torch

    from recare.models import MINI_WORLD
    from recare.models.device import resolve_device

    if model != MINI_WORLD or os.environ.get("OMP_NUM_THREADS") or resolve_device(device).type != "cpu":
        return False
    torch.set_num_threads(1)
    return True


def _resume_run(args: argparse.Namespace):
    from recare.runs import CANCELLED, FAILED, Run, RunStore

    path = Path(args.resume).expanduser()
    run = Run(path) if path.is_dir() else RunStore(args.out).get(args.resume)
    status = run.status()
    if status.get("state") not in (CANCELLED, FAILED) or not status.get("resumable", True):
        raise RunError(f"run {run.id} is {status.get('state')}: only a cancelled or failed run with a saved state resumes.")
    if run.kind != "train":
        raise RunError(f"run {run.id} is a {run.kind} run, not a training run.")
    run.cancel_path.unlink(missing_ok=True)  # the cancel that stopped it is spent
    return run


def run_train(args: argparse.Namespace) -> Path:
    from recare.models import MINI_WORLD
    from recare.progress import TqdmProgress
    from recare.runs import RunStore
    from recare.train.recipe import job_config
    from recare.workflows import mini_world_task

    check_folder_arg("--out", args.out)
    if args.resume:
        run = _resume_run(args)
        trained = run.config().get("train") or {}
        if one_thread_for_the_mini_world(str(trained.get("model", "")), str(trained.get("device", "auto"))):
            print(ONE_THREAD_NOTE, file=sys.stderr)
        with TqdmProgress() as bar:
            return _run_train_job(run, bar)
    task = mini_world_task(args.task) if args.task else None
    if task is not None and args.model != MINI_WORLD:
        raise ConfigError(f"--task names a mini-world task; it needs --model {MINI_WORLD} (got {args.model!r}).")
    config = _train_config(args, task)
    from recare.jobs.checks import Submitter, check_train

    check_train(config, Submitter(), [])  # the bounds of the app's requests (RECARE_MAX_*; any local model)
    if config.stage2 is not None and not config.careset and task is None:
        raise ConfigError("ReCARE needs a CARE-set: pass --careset FILE (python -m recare careset makes one), "
                          "or --task for a mini-world task.")
    if config.careset:
        from recare.careset_io import read_careset_json

        if not read_careset_json(config.careset).tokens:
            raise ConfigError(f"{config.careset} is an empty CARE-set: keep at least one CARE token.")
    if one_thread_for_the_mini_world(config.model, str(config.device)):   # every check has passed
        print(ONE_THREAD_NOTE, file=sys.stderr)
    settings = {"command": "train", "recare_version": __version__, **job_config(config)}
    if task is not None:  # the job makes the task's images and CARE-set first, as the app's (recare.workflows)
        settings["task"] = task.get("name") or args.task
    run = RunStore(args.out).create("train", settings, target=TRAIN_TARGET, device=str(config.device))
    print(f"run {run.id} in {run.path}", file=sys.stderr)
    with TqdmProgress() as bar:
        return _run_train_job(run, bar)


# ---------------------------------------------------------------------------------------------
# demo


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from recare.demo import MAX_BYTES, MODELS

    sub = parser.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    pack = sub.add_parser("pack", help="pack finished evaluation runs into the app's reviewer demo (<= 3 MB)",
                          description="Copy trimmed, read-only evaluation run folders (config, status, manifest, "
                                      "metrics, a small image grid) and an index.json into one folder the app shows.")
    pack.add_argument("--eval", action="append", required=True, metavar="TASK:MODEL=RUN", dest="evals",
                      help=f"an evaluation run folder for a task and a model ({', '.join(MODELS)}); repeatable, "
                           "kept in the given order")
    pack.add_argument("--out", default="assets/demo", metavar="DIR", help="the bundle folder (default: assets/demo)")
    pack.add_argument("--grid-seeds", type=int, default=4, help="images per grid row (default 4)")
    pack.add_argument("--max-mb", type=float, default=MAX_BYTES / 1024 / 1024,
                      help=f"size limit of the whole bundle in MiB (default {MAX_BYTES / 1024 / 1024:g})")


def _demo_evals(items: list[str]) -> dict[str, dict[str, str]]:
    """--eval TASK:MODEL=RUN items as {task: {model: run}} in the given order."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, run = item.partition("=")
        task, colon, model = key.partition(":")
        if not sep or not colon or not task.strip() or not model.strip() or not run.strip():
            raise ConfigError(f"--eval takes TASK:MODEL=RUN, e.g. tench:recare=runs/evaluate-... (got {item!r}).")
        if model.strip() in out.get(task.strip(), {}):
            raise ConfigError(f"--eval gives {task.strip()}:{model.strip()} twice.")
        out.setdefault(task.strip(), {})[model.strip()] = run.strip()
    return out


def run_demo(args: argparse.Namespace) -> Path:
    import shlex

    from recare.demo import pack_demo

    evaluations = _demo_evals(args.evals)
    check_folder_arg("--out", args.out)
    command = "python -m recare demo pack " + " ".join(
        [*(f"--eval {shlex.quote(e)}" for e in args.evals), f"--out {shlex.quote(args.out)}",
         f"--grid-seeds {args.grid_seeds}"])
    return pack_demo(evaluations, args.out, grid_seeds=args.grid_seeds, max_bytes=int(args.max_mb * 1024 * 1024),
                     command=command)


# ---------------------------------------------------------------------------------------------
# report


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval", action="append", required=True, metavar="RUN", dest="evals",
                        help="a finished evaluation run folder; repeatable, shown in the given order")
    parser.add_argument("--out", default="report.html", metavar="FILE", help="the HTML file (default: report.html)")


def run_report(args: argparse.Namespace) -> Path:
    import shlex

    from recare.report import build_report

    command = "python -m recare report " + " ".join(
        [*(f"--eval {shlex.quote(e)}" for e in args.evals), f"--out {shlex.quote(args.out)}"])
    return build_report(args.evals, args.out, command=command)


# ---------------------------------------------------------------------------------------------
# the command table and main


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Path]


COMMANDS: dict[str, Command] = {
    "generate": Command("generate target images (seed of image i = seed + i)", add_generate_arguments, run_generate),
    "careset": Command("build a CARE-set (Algorithm 1) from target images", add_careset_arguments, run_careset),
    "train": Command("unlearn a concept: ReCARE (stage 1 + 2), the ESD baseline or an ablation; runs as a resumable job",
                     add_train_arguments, run_train),
    "evaluate": Command("evaluate a model: attack success (erased, CCE, probes), CARE score, CLIP score, RATIO",
                        add_evaluate_arguments, run_evaluate),
    "demo": Command("the app's reviewer demo: `demo pack` bundles finished evaluation runs (<= 3 MB)",
                    add_demo_arguments, run_demo),
    "report": Command("one self-contained HTML report (grids, radars, numbers, the paper's rows) of evaluation runs",
                      add_report_arguments, run_report),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per row of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="python -m recare",
        description="ReCARE Studio: concept unlearning that keeps co-occurring benign concepts. "
                    "Each command writes a run folder under --out and prints its path last.",
    )
    parser.add_argument("--version", action="version", version=f"recare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the command, return the exit code.

    A `RecareError` (bad input the user can fix) is printed as one line and gives exit code 2;
    any other exception is a bug and propagates with its traceback (exit code 1 from Python).

    Args:
        argv: command-line arguments without the program name.
    """
    args = build_parser().parse_args(argv)
    try:
        run_dir = COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Cancelled as e:  # the user stopped it (Ctrl+C on a job); what was saved is kept
        print(f"cancelled: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_CANCELLED
    except RecareError as e:
        if os.environ.get("RECARE_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(run_dir)
    return 0

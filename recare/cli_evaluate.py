"""`python -m recare evaluate`: the evaluation command's arguments and its run (the rest of the CLI: `recare.cli`).

Every EvaluationConfig field has an option (`EVALUATE_FIELDS`); --config reads a run's settings and the options
given win over them; --resume continues a run folder with its own settings. The run folder's path is printed
last by `recare.cli.main`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from recare.cli_args import DEFAULT_RUNS_DIR, check_folder_arg, overrides
from recare.config import ConfigError

# EvaluationConfig field -> argparse dest, for the options given on the command line
EVALUATE_FIELDS = {
    "model": "model", "unet": "unet", "task": "task", "target_prompt": "target_prompt",
    "target_concept": "target_concept", "prompt_style": "prompt_style", "initializer_token": "initializer_token",
    "seeds": "seeds", "base_seed": "base_seed", "care_images_per_prompt": "care_images_per_prompt",
    "clip_prompts": "clip_prompts", "clip_count": "clip_count", "steps": "steps", "guidance": "guidance",
    "height": "height", "width": "width", "batch_size": "batch_size", "detector": "detector", "encoder": "encoder",
    "care_k": "care_k", "cce_images": "cce_images", "cce_steps": "cce_steps", "cce_seed": "cce_seed",
    "reference_images": "reference_images", "reference_seed": "reference_seed",
    "completion_strength": "completion_strength", "noise_eta": "noise_eta", "noise_fraction": "noise_fraction",
    "device": "device", "dtype": "dtype", "attack_runs": "attack_runs", "ud_k": "ud_k",
    "ud_timesteps": "ud_timesteps", "ud_iterations": "ud_iterations", "ud_seed": "ud_seed",
}


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from recare.eval.attacks import ATTACKS
    from recare.eval.config import EvaluationConfig
    from recare.eval.detectors import DETECTORS

    d = EvaluationConfig()
    model = parser.add_argument_group("model and task")
    model.add_argument("--model", help="base model: 'mini-world', a hub id (CompVis/stable-diffusion-v1-4) or a "
                                       "diffusers folder (default: the --unet run's base model, else mini-world)")
    model.add_argument("--unet", metavar="RUN_OR_FILE",
                       help="trained weights: a training run folder, trained_params.safetensors, a diffusers unet/ "
                            "folder or ReCARE-Diffusers-UNet.pt (default: none, the base model is evaluated)")
    model.add_argument("--task", help="a mini-world task: tench, van_gogh or smoking (fills the target, CARE prompts, "
                                      "detector; default: none)")
    model.add_argument("--target-prompt", metavar="P", help="the erased concept's prompt (default: the task's)")
    model.add_argument("--target-concept", help="what the detector looks for: an oracle concept, a classifier class, "
                                                "'nudity' (default: the task's, else the target prompt)")
    model.add_argument("--care-prompts", action="append", metavar="CONCEPT=FILE|JSON",
                       help="CARE-score prompts: CONCEPT=FILE (one prompt per line; repeat per concept) or a JSON file "
                            "{concept: [prompts]} (default: the task's)")
    model.add_argument("--prompt-style", choices=("photo", "painting"),
                       help="objects (photo) or styles (painting): CCE's templates and prompt (default: the task's, else photo)")
    model.add_argument("--initializer-token", help="CCE's token starts from this word (default: the task's, else "
                                                   "person / art)")
    model.add_argument("--extra-prompt", action="append", metavar="P", dest="extra_prompts",
                       help="a custom prompt made on the attacks' seeds and judged by the target detector, never "
                            "counted in ASR or RATIO (repeatable; the app's Compare 'Custom prompts'; default: none)")
    attack = parser.add_argument_group("attacks")
    attack.add_argument("--attacks", metavar="A,B,...",
                        help=f"comma-separated, from {', '.join(ATTACKS)} (default: erased,cce,completion,noise, "
                             "plus adversarial when the --unet run has tokens/)")
    attack.add_argument("--seeds", type=int, metavar="N", help="images per attack prompt, seeds base-seed + i "
                                                               "(default: recare.json's 64 for the mini world, else 500)")
    attack.add_argument("--base-seed", type=int, help=f"image i uses seed base-seed + i (default {d.base_seed})")
    attack.add_argument("--cce-images", type=int, help="CCE's textual-inversion images (default 30 for photo, 6 for painting)")
    attack.add_argument("--cce-steps", type=int, help="CCE's textual-inversion steps (default 3000; mini world: recare.json's 1000)")
    attack.add_argument("--cce-seed", type=int, help=f"CCE's textual-inversion seed; run r uses seed + r (default {d.cce_seed})")
    attack.add_argument("--attack-runs", type=int, metavar="N",
                        help="runs of each learned attack (cce, ud), each with its own seed and CCE images; metrics "
                             "report their mean, worst and every run (default: recare.json's for the mini world, else 3)")
    attack.add_argument("--ud-prompts", metavar="FILE", help="UnlearnDiff's prompts, one per line or a CSV with a prompt "
                        "column (default: the task's in recare.json, else the target prompt)")
    attack.add_argument("--ud-k", type=int, help="UnlearnDiff's prefix tokens (default 5 for nudity, else 3)")
    attack.add_argument("--ud-timesteps", type=int, help="UnlearnDiff's timesteps (default 50; mini world: recare.json's)")
    attack.add_argument("--ud-iterations", type=int, help="UnlearnDiff's steps per timestep (default 40; mini world: recare.json's)")
    attack.add_argument("--ud-seed", type=int, help=f"UnlearnDiff's seed; run r uses seed + r (default {d.ud_seed})")
    attack.add_argument("--reference-images", metavar="world|base|DIR",
                        help="real target images for CCE and completion: 'base' (the base model's images of the target "
                             "prompt, as the paper), 'world' (mini-world renders) or a folder/zip (default: base)")
    attack.add_argument("--reference-seed", type=int, help=f"seed of the world/base reference images (default {d.reference_seed})")
    attack.add_argument("--completion-strength", type=float,
                        help=f"completion probe: how far the real image is noised, 0-1 (default {d.completion_strength})")
    attack.add_argument("--noise-eta", type=float, help=f"noise probe: DDIM eta of the noisy steps (default {d.noise_eta})")
    attack.add_argument("--noise-fraction", type=float,
                        help=f"noise probe: leading fraction of the steps that are noisy (default {d.noise_fraction})")
    judge = parser.add_argument_group("judges and metrics")
    judge.add_argument("--detector", choices=tuple(DETECTORS),
                       help="the ASR detector (default: oracle for the mini world, nudenet for nudity, hf-classifier "
                            "for styles, torchvision-classifier for objects)")
    judge.add_argument("--detector-option", action="append", metavar="KEY=VALUE",
                       help="a detector argument, e.g. weights_path=resnet50.pth, folder=DIR, top_k=3, threshold=0.6 "
                            "(JSON values; repeat; default: none)")
    judge.add_argument("--encoder", help="CLIP for the CARE and CLIP scores (default: mini-world for the mini world, "
                                         "else open_clip:ViT-B-32/openai)")
    judge.add_argument("--care-images-per-prompt", type=int,
                       help=f"CARE-score images per prompt (default {d.care_images_per_prompt}, official)")
    judge.add_argument("--care-k", type=int, help=f"CARE score's R-Precision@k (default {d.care_k})")
    judge.add_argument("--clip-prompts", metavar="FILE",
                       help="captions for the CLIP score: a text file or a CSV with a prompt column (COCO); default: "
                            "the mini world's held-out captions, none for other models")
    judge.add_argument("--clip-count", type=int, help="captions used from it (default: all; mini world 64)")
    judge.add_argument("--clip-range", metavar="LO,HI",
                       help="RATIO's CLIP range (default: the mini world's measured range, else 0.25,0.32)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--steps", type=int, help="DDIM steps (default 50; mini world 25)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance (default 7.5)")
    gen.add_argument("--height", type=int, help="image height (default: the model's native size)")
    gen.add_argument("--width", type=int, help="image width (default: the model's native size)")
    gen.add_argument("--batch-size", type=int, help=f"images per pipeline call (default {d.batch_size})")
    gen.add_argument("--dtype", help=f"'auto' (fp16 on CUDA, fp32 otherwise), 'fp16', 'bf16', 'fp32' (default {d.dtype})")
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="FILE",
                     help="settings from a JSON file: a run's manifest.json or config.json, or EvaluationConfig fields; "
                          "options given here override them (default: none)")
    run.add_argument("--resume", metavar="RUN", help="continue the run folder RUN with its own settings (default: a new run)")
    run.add_argument("--device", help="'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', ... (default auto)")
    run.add_argument("--out", default=DEFAULT_RUNS_DIR, metavar="DIR",
                     help=f"parent folder of the run folder (default: {DEFAULT_RUNS_DIR})")


def _key_values(items: list[str] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; a VALUE that parses as JSON is that value, else the text."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} takes KEY=VALUE (got {item!r}).")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _care_prompts(items: list[str] | None) -> dict[str, list[str]] | None:
    """--care-prompts CONCEPT=FILE (repeatable) or one JSON file {concept: [prompts]}."""
    from recare.eval.utility import read_prompt_file

    if not items:
        return None
    prompts: dict[str, list[str]] = {}
    for item in items:
        concept, sep, path = item.partition("=")
        if sep:
            prompts[concept.strip()] = read_prompt_file(path)
            continue
        try:
            data = json.loads(Path(item).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--care-prompts {item!r}: give CONCEPT=FILE or a readable JSON file ({e}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--care-prompts {item}: the JSON must map each concept to a list of prompts.")
        prompts.update(data)
    return prompts


def _absolute_if_local(value: str | None) -> str | None:
    """A path that exists, made absolute (so a resumed run finds it from any folder); other names as given."""
    if value is None or value in ("world", "base"):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _evaluation_config(args: argparse.Namespace):
    from recare.eval.config import EvaluationConfig
    from recare.eval.config import config_from_file

    base: dict[str, Any] = {}
    if args.config:
        try:
            base = config_from_file(json.loads(Path(args.config).expanduser().read_text(encoding="utf-8"))).to_dict()
        except (OSError, ValueError) as e:
            raise ConfigError(f"--config {args.config!r} is not a readable JSON settings file ({e}).") from None
    given = overrides(args, EVALUATE_FIELDS)
    for name in ("unet", "clip_prompts", "reference_images"):
        if name in given:
            given[name] = _absolute_if_local(given[name])
    if args.attacks is not None:
        given["attacks"] = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if args.clip_range is not None:
        try:
            given["clip_range"] = [float(v) for v in args.clip_range.split(",")]
        except ValueError:
            raise ConfigError(f"--clip-range takes LO,HI (got {args.clip_range!r}).") from None
    options = _key_values(args.detector_option, "--detector-option")
    if options:
        given["detector_options"] = {**base.get("detector_options", {}), **options}
    if args.extra_prompts:
        given["extra_prompts"] = list(args.extra_prompts)
    if args.ud_prompts:
        from recare.eval.utility import read_prompt_file

        given["ud_prompts"] = list(dict.fromkeys(read_prompt_file(args.ud_prompts)))
    care = _care_prompts(args.care_prompts)
    if care is not None:
        given["care_prompts"] = care
    if "detector" in given and "detector_options" not in given and base.get("detector") != given["detector"]:
        base.pop("detector_options", None)  # options of another detector do not carry over
    return EvaluationConfig.from_dict({**base, **given}), given


def run_evaluate(args: argparse.Namespace) -> Path:
    from recare.eval.distributed import launched_world_size
    from recare.eval.run import evaluate
    from recare.progress import TqdmProgress

    config, given = _evaluation_config(args)
    check_folder_arg("--out", args.out)
    if args.resume is None:
        from recare.jobs.checks import Submitter, check_evaluation

        check_evaluation(config.to_dict(), Submitter(), [], resolve=False)  # the app's bounds (RECARE_MAX_*)
    else:
        extra = sorted(given) + (["config"] if args.config else [])
        if extra:
            raise ConfigError(f"--resume continues {args.resume} with the settings it was started with; drop "
                              f"{', '.join('--' + e.replace('_', '-') for e in extra)}.")
        if not Path(args.resume).expanduser().is_dir():
            raise ConfigError(f"--resume {args.resume!r} is not a run folder.")
    main_process = launched_world_size() == 1 or os.environ.get("RANK", "0") == "0"
    with TqdmProgress(unit="img") as bar:
        progress = bar if main_process else None
        if args.resume is not None:
            result = evaluate(None, run_dir=args.resume, progress=progress)
        else:
            result = evaluate(config, out=args.out, progress=progress)
    if result.metrics:
        m = result.metrics
        runs = m.get("asr_runs") or {}
        asr = ", ".join(f"{k} {v:.1f}%" + (f" (worst {max(runs[k]):.1f}, runs {'/'.join(f'{x:.1f}' for x in runs[k])})"
                                           if k in runs else "") for k, v in m["asr"].items())
        care = f"{m['care_score']['mean']:.3f}" if m["care_score"] else "-"
        clip = f"{m['clip_score']:.4f}" if m["clip_score"] is not None else "-"
        ratio = f"{m['ratio']['value']:.3f}" if m["ratio"]["value"] is not None else "-"
        print(f"ASR {asr}; CLIP {clip}; CARE {care}; RATIO {ratio} ({m['n_images']} images)")
    return result.run_dir

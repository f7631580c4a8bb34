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
from recare.config import CareSetConfig, ConfigError, GenerateConfig
from recare.errors import RecareError

EXIT_USAGE = 2
DEFAULT_RUNS_DIR = "runs"


# ---------------------------------------------------------------------------------------------
# argument helpers


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', ...")
    parser.add_argument("--out", default=DEFAULT_RUNS_DIR, metavar="DIR",
                        help=f"parent folder of the run folder this command creates (default: {DEFAULT_RUNS_DIR})")


def _check_folder_arg(flag: str, value: str | None) -> None:
    """ConfigError now, before any model loads, when a folder argument cannot be a folder.

    A folder argument is written to only at the end of a command (after minutes of generating or
    encoding), so a path that is a file, or under a file, is refused at the start instead.

    Args:
        flag: the option's name, for the message.
        value: the path given (None: the default, nothing to check).
    """
    if value is None:
        return
    path = Path(value).expanduser()
    try:
        for part in (path, *path.parents):
            if part.exists():
                if not part.is_dir():
                    raise ConfigError(f"{flag} {value!r} cannot be a folder: {part} is a file.")
                if not os.access(part, os.W_OK):
                    raise ConfigError(f"{flag} {value!r}: {part} is not writable.")
                return
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        raise ConfigError(f"{flag} {value[:200]!r} is not a usable folder ({e}).") from None


def _overrides(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """Config fields the user gave on the command line ({config field: argparse dest})."""
    return {field: getattr(args, dest) for field, dest in names.items() if getattr(args, dest) is not None}


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
    _add_common(parser)


def run_generate(args: argparse.Namespace) -> Path:
    from recare.generate import check_generate_limits, generate_images, save_generation
    from recare.models import MINI_WORLD, load_pipeline
    from recare.progress import TqdmProgress
    from recare.runs import atomic_write_json, new_run_dir

    base = worldspec.generate_defaults() if args.model == MINI_WORLD else GenerateConfig()
    config = GenerateConfig.from_dict({**base.to_dict(), **_overrides(args, _GENERATE_FIELDS)})
    check_generate_limits(config)
    _check_folder_arg("--out", args.out)

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
    _add_common(parser)


def _vocabulary(args: argparse.Namespace, spec: dict):
    from recare.encoders import clip_bpe_vocabulary, read_word_list, word_list_vocabulary
    from recare.models import MINI_WORLD

    if args.vocab == "clip-bpe":
        return clip_bpe_vocabulary()
    if args.vocab is not None:
        if not _is_file(Path(args.vocab)):
            raise ConfigError(f"--vocab {args.vocab!r} is neither 'clip-bpe' nor an existing word-list file.")
        return read_word_list(args.vocab)
    words = worldspec.mini_world_words(spec) if args.encoder == MINI_WORLD else None
    return word_list_vocabulary(words, source="mini-world") if words else clip_bpe_vocabulary()


def _is_file(path: Path) -> bool:
    """Path.is_file, False for names the file system cannot look up (too long, a NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _task_for_images(spec: dict, args: argparse.Namespace) -> dict | None:
    """The mini-world task the images belong to, when it can tell.

    The task is the one named by --reference-word, else the one whose target prompt made the images
    (read from the manifest.json of a generate run folder).
    """
    if args.reference_word is not None:
        return worldspec.task_for_reference(args.reference_word, spec)
    manifest = Path(args.images) / "manifest.json"
    if not _is_file(manifest):
        return None
    try:
        prompt = str(json.loads(manifest.read_text(encoding="utf-8")).get("prompt", ""))
    except (OSError, ValueError, AttributeError):
        return None
    return worldspec.task_for_prompt(prompt, spec)


def run_careset(args: argparse.Namespace) -> Path:
    from recare.careset import build_care_set
    from recare.careset_io import save_rich_json, write_careset_json
    from recare.encoders import vocabulary_features
    from recare.generate import images_summary, load_images
    from recare.models import MINI_WORLD, load_encoder
    from recare.progress import TqdmProgress
    from recare.runs import atomic_write_json, new_run_dir

    _check_folder_arg("--out", args.out)
    _check_folder_arg("--cache-dir", args.cache_dir)
    spec = worldspec.mini_world_spec() if args.encoder == MINI_WORLD else {}
    task = _task_for_images(spec, args)
    base = worldspec.careset_defaults(spec, task) if spec else CareSetConfig()
    config = CareSetConfig.from_dict({**base.to_dict(), **_overrides(args, _CARESET_FIELDS)})

    images = load_images(args.images)
    vocab = _vocabulary(args, spec)
    encoder = load_encoder(args.encoder, device=args.device)
    print(f"encoding {len(images)} images and {len(vocab)} vocabulary tokens with {encoder.identity}", file=sys.stderr)
    image_features = encoder.encode_images(images)
    with TqdmProgress(unit="tok") as bar:
        vocab_features = vocabulary_features(encoder, vocab, cache_dir=args.cache_dir, progress=bar)
    target_feature = encoder.encode_texts([config.reference_word])[0]

    with TqdmProgress(unit="%") as bar:
        careset = build_care_set(
            image_features, vocab_features, vocab.tokens, target_feature, config, progress=bar,
            meta={"encoder": encoder.identity, "vocabulary": vocab.source, "vocabulary_hash": vocab.hash},
        )

    run_dir = new_run_dir(args.out, "careset")
    atomic_write_json(run_dir / "config.json", {
        "command": "careset", "recare_version": __version__, "careset": config.to_dict(),
        "encoder": {"name": str(args.encoder), "identity": encoder.identity},
        "vocabulary": {"source": vocab.source, "size": len(vocab), "hash": vocab.hash},
        "images": {"source": str(args.images), **images_summary(images)},
    })
    save_rich_json(careset, run_dir / "careset.rich.json")
    write_careset_json(careset, run_dir / "careset.json")
    kept = careset.final_tokens()
    print(f"{len(careset.tokens)} candidates -> {len(kept)} CARE tokens for {config.reference_word!r}: "
          + ", ".join(kept[:20]) + (" ..." if len(kept) > 20 else ""))
    return run_dir


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
    except RecareError as e:
        if os.environ.get("RECARE_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(run_dir)
    return 0

"""The full mini-world recipe: retrain every bundled model from scratch and write the task spec.

    python -m recare.miniworld.train --out DIR [--seed 0] [--smoke] [--skip oracle,clip,generator] [--spec-only] [--sequential]

Writes ``DIR/oracle/`` (multi-label oracle), ``DIR/clip/`` (mini CLIP + real CLIP tokenizer),
``DIR/pipeline/`` (the generator, trained by ``recare.miniworld.generator.train_generator``) and
``DIR/recare.json`` (tasks, CARE labels, CARE-set parameters, generation settings, default
vocabulary, training record). ``--smoke`` runs a few steps at tiny sizes so CI keeps the recipe
working (its models are not usable). Everything runs on CPU, deterministic for ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from recare.progress import ProgressCallback
from recare.errors import ModelLoadError
from recare.miniworld import world as W
from recare.atomic import atomic_write_text, read_json_object

# Recommended CARE-set parameters for this world's 126-word vocabulary (the paper's K=50 / N=100
# are for the 49,408-token CLIP vocabulary). Tuned on 200 target images per task with the bundled
# mini CLIP: K in 20-24 with N=40 and 5-6 clusters keeps each CARE concept and drops every target
# word for all three tasks, also with the official alpha=0.01; K <= 12 misses "stars" (van gogh
# images rank the style words first), and N=30 with K=16 loses "person" for smoking.
CARESET_DEFAULTS = {
    "top_k": 20,  # tokens kept per image (paper: 50)
    "top_n": 40,  # most frequent candidates (paper: 100)
    "projection": "tsne",
    "n_clusters": 6,  # as the paper (official code: 7)
    "k_each_side": 1,
    "alpha": 0.01,  # official
    "min_cluster_size": 2,
    "seed": 42,
}
GENERATION_DEFAULTS = {"steps": 25, "guidance": 7.5, "height": 64, "width": 64, "base_seed": 42, "batch_size": 16}
CARE_IMAGES_PER_PROMPT = 10  # as the paper's CARE score


def recare_spec(careset: dict | None = None, record: dict | None = None, previous: dict | None = None,
                world_settings: dict | None = None) -> dict:
    """The content of ``recare.json``: everything a user of the mini world needs besides weights.

    The sections made here (concepts, tasks, careset, generation, vocabulary, ...) come from the world's
    code; the sections measured later by other tools (``evaluation``: the evaluation settings and CLIP
    range; ``unlearning``: the recommended training settings per method and task; any other section, or
    field of a task, this function does not make) are carried over from ``previous`` unchanged, so a
    retrain or ``--spec-only`` never silently drops them.

    Args:
        careset: CARE-set parameters (default :data:`CARESET_DEFAULTS`).
        record: training record (seed, times, metrics) to embed (default: ``previous``'s, else none).
        previous: the recare.json being replaced (see :func:`previous_spec`), or None.
        world_settings: the world settings the weights were trained with (default: ``previous``'s, else the
            world's current ones, `world.settings()`); the renderer applies them when this world is installed.
    """
    previous = previous if isinstance(previous, dict) else {}
    if world_settings is None:
        world_settings = previous.get("world_settings") if isinstance(previous.get("world_settings"), dict) else W.settings()
    spec = {
        "name": "mini-world",
        "format_version": 1,
        "image_size": W.SIZE,
        "concepts": list(W.CONCEPTS),
        "tasks": {name: task.to_dict() for name, task in W.TASKS.items()},
        "care_labels": list(W.CARE_LABELS),
        "care_images_per_prompt": CARE_IMAGES_PER_PROMPT,
        "careset": dict(careset or CARESET_DEFAULTS),
        "generation": dict(GENERATION_DEFAULTS),
        "vocabulary": {
            "source": "mini-world lexicon",
            "why": "only the words the captions use were trained; the other BPE tokens of the mini CLIP keep "
                   "random embeddings, so the full 49,408-token vocabulary would rank noise",
            "words": W.lexicon(),
        },
        "encoder": "mini-world",
        "world_settings": dict(world_settings),
        "training": record if record is not None else previous.get("training") or {},
    }
    old_tasks = previous.get("tasks") if isinstance(previous.get("tasks"), dict) else {}
    for name, task in spec["tasks"].items():
        measured = old_tasks.get(name) if isinstance(old_tasks.get(name), dict) else {}
        task.update({k: v for k, v in measured.items() if k not in task})
    spec.update({k: v for k, v in previous.items() if k not in spec})
    return spec


def previous_spec(path: str | os.PathLike) -> dict | None:
    """The recare.json at ``path`` when there is a readable one (its measured sections are kept), else None."""
    return read_json_object(path) or None


def write_recare_json(path: str | os.PathLike, spec: dict) -> Path:
    """Write ``recare.json`` atomically (temp name, then rename)."""
    return atomic_write_text(path, json.dumps(spec, indent=2) + "\n")


def read_recare_json(path: str | os.PathLike | None = None) -> dict:
    """Read a mini world's ``recare.json`` (default: the one ``recare.models`` loads, so
    ``$RECARE_MINI_WORLD`` is honoured the same way); unlike ``recare.worldspec``, a missing or
    broken file is an error here, since the recipe and the benchmark cannot go on without it."""
    from recare.models.policy import mini_world_dir

    path = Path(path) if path is not None else mini_world_dir() / "recare.json"
    if not path.is_file():
        raise ModelLoadError(f"no recare.json at {path}; write one with `python -m recare.miniworld.train --out DIR`.")
    return json.loads(path.read_text(encoding="utf-8"))


def collect_record(out_dir: str | os.PathLike) -> dict:
    """The training records the stages left in their folders (oracle, clip, pipeline), for recare.json."""
    out = Path(out_dir)
    record: dict = {}
    for stage, rel, key in (("oracle", "oracle/config.json", "metrics"), ("clip", "clip/training_config.json", "metrics"),
                            ("generator", "pipeline/recare_training.json", None)):
        path = out / rel
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            record[stage] = data.get(key, data) if key else data
    return record


def train_all(out_dir: str | os.PathLike, seed: int = 0, smoke: bool = False, progress: bool | ProgressCallback = True,
              skip: tuple[str, ...] = (), parallel: bool = True) -> dict:
    """Retrain the mini world from scratch into ``out_dir`` and write ``recare.json``.

    Args:
        out_dir: the mini-world folder to (over)write.
        seed: the seed of every stage.
        smoke: tiny sizes, a few steps (CI).
        progress: the library's progress callback (`recare.progress`); True: tqdm bars, False: none.
        skip: stages to leave out ("oracle", "clip", "generator").
            The world's settings (`world.settings()`, changed with `world.apply_settings` or ``--world-set``)
            shape every stage's data; the UNet process gets the same, and recare.json records them.
        parallel: two processes, one thread each: the generator's autoencoder and UNet train in a
            second process (log: ``out_dir/generator.log``) while this one trains the oracle, the
            mini CLIP, then the generator's two decoder refinements (they need only the trained
            autoencoder), and joins the parts. On a 2-core machine this balances the two cores.
            Each stage has its own seeds, so the weights are the same either way.

    Returns:
        The training record (per-stage seconds and metrics), also stored in recare.json.
    """
    from recare.miniworld.clip import MiniClipConfig, train_clip
    from recare.miniworld.oracle import OracleConfig, train_oracle

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"seed": seed, "smoke": smoke, "seconds": {}, "metrics": {}}
    start = time.time()
    unet_process = None
    if "generator" not in skip and parallel:
        import torch

        unet_process = _start_unet_process(out, seed, smoke)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(1)  # the other core is the UNet's
    try:
        if "oracle" not in skip:
            t = time.time()
            _, m = train_oracle(out / "oracle", OracleConfig(seed=seed), smoke=smoke, progress=progress)
            record["seconds"]["oracle"], record["metrics"]["oracle_min_accuracy"] = round(time.time() - t, 1), m["min_accuracy"]
        if "clip" not in skip:
            t = time.time()
            _, m = train_clip(out / "clip", MiniClipConfig(seed=seed), smoke=smoke, progress=progress)
            record["seconds"]["clip"], record["metrics"]["clip_min_top1"] = round(time.time() - t, 1), m["min_top1"]
        if unet_process is not None:
            from recare.miniworld.generator import assemble_generator, train_generator_part

            process, log_path = unet_process
            t = time.time()
            train_generator_part(out, "decoder", seed=seed, smoke=smoke, progress=progress,
                                 alive=lambda: process.poll() is None)
            record["seconds"]["generator_decoder"] = round(time.time() - t, 1)
            if process.wait() != 0:
                raise RuntimeError(f"the generator's UNet part failed (exit code {process.returncode}); its log: {log_path}")
            assemble_generator(out, seed=seed, smoke=smoke)
            record["seconds"]["generator"] = round(time.time() - start, 1)
    finally:
        if unet_process is not None:
            if unet_process[0].poll() is None:  # do not leave the UNet training on its own
                unet_process[0].terminate()
                unet_process[0].wait()
            torch.set_num_threads(threads_before)
    if unet_process is None and "generator" not in skip:
        from recare.miniworld.generator import train_generator

        t = time.time()
        train_generator(out, seed=seed, smoke=smoke, progress=progress)
        record["seconds"]["generator"] = round(time.time() - t, 1)
    record["seconds"]["total"] = round(time.time() - start, 1)
    record["stages"] = collect_record(out)
    write_recare_json(out / "recare.json", recare_spec(record=record, previous=previous_spec(out / "recare.json"),
                                                       world_settings=W.settings()))
    return record


def _start_unet_process(out: Path, seed: int, smoke: bool):
    """``python -m recare.miniworld.generator OUT --part unet`` in the background, one thread; (process, log path)."""
    import subprocess
    import sys

    log_path = out / "generator.log"
    command = [sys.executable, "-m", "recare.miniworld.generator", str(out), "--part", "unet", "--seed", str(seed)]
    command += ["--smoke"] if smoke else []
    command += ["--world-settings", json.dumps(W.settings())]  # its import applies the installed world's
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parents[2])
    print(f"generator: the UNet part trains in process {process.pid}, log {log_path}", flush=True)
    return process, log_path


def parse_world_settings(items: list[str]) -> dict:
    """``NAME=VALUE`` items as world settings: a JSON value (``0.15``), else the bare string (``plume``)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"a world setting is NAME=VALUE (got {item!r})")
        try:
            out[name.strip()] = json.loads(value)
        except ValueError:
            out[name.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry: ``python -m recare.miniworld.train --out DIR [--seed N] [--smoke] [--skip ...]``."""
    from recare.runtime import set_process_defaults

    set_process_defaults()  # a process entry; torch is not imported yet here, and the UNet process inherits it
    parser = argparse.ArgumentParser(description="Retrain the bundled mini world (oracle, mini CLIP, generator) on CPU.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (e.g. checkpoints/mini-world)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps at tiny sizes (CI); models are not usable")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: oracle,clip,generator")
    parser.add_argument("--spec-only", action="store_true", help="only (re)write recare.json from the trained folders")
    parser.add_argument("--sequential", action="store_true",
                        help="train the generator in this process after the others (default: a second process, in parallel)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a shared 2-core machine 1 is much faster than oversubscribing)")
    parser.add_argument("--world-set", action="append", default=[], metavar="NAME=VALUE",
                        help=f"a world setting for this world ({', '.join(W.WORLD_SETTINGS)}; e.g. "
                             "P_SMOKING_GIVEN_PERSON=0.15 or SMOKING_CUE=plume; repeat); recorded in recare.json")
    args = parser.parse_args(argv)
    try:
        W.apply_settings(parse_world_settings(args.world_set))
    except (W.WorldError, ValueError) as error:
        parser.error(str(error))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.spec_only:
        spec = recare_spec(record={"stages": collect_record(args.out)}, previous=previous_spec(args.out / "recare.json"),
                           world_settings=W.settings() if args.world_set else None)
        print(write_recare_json(args.out / "recare.json", spec))
        return
    skip = tuple(s for s in args.skip.split(",") if s)
    unknown = set(skip) - {"oracle", "clip", "generator"}
    if unknown:
        parser.error(f"unknown stage(s) in --skip: {sorted(unknown)}; choose from oracle, clip, generator")
    record = train_all(args.out, seed=args.seed, smoke=args.smoke, skip=skip, parallel=not args.sequential)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

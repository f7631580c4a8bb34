"""End-to-end steps composed from the library, shared by the CLI and the app.

    careset_from_images      target images -> CARE-set (Algorithm 1 with an encoder and a vocabulary)
    write_careset_files      a CareSet -> careset.rich.json + careset.json in a folder
    mini_world_task          a mini-world task by name ("tench", "van_gogh", "smoking")
    task_train_config        a TrainConfig for a mini-world task with the world's recommended settings
    training_config          the TrainConfig a user asks for (preset, task, fields, step overrides): CLI and app
    prepare_task_inputs      target images and the CARE-set of a mini-world task, made once into a folder

Nothing here does math of its own: each function only chains library calls in the order the data
flows (DESIGN.md), so the CLI's `careset`/`train` commands and the app's workspaces cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from recare import worldspec
from recare.config import CareSetConfig, ConfigError, TrainConfig
from recare.progress import CancelToken, ProgressCallback

TARGET_IMAGES_DIR = "target_images"
CARESET_DIR = "careset"


def careset_from_images(images: Sequence, config: CareSetConfig, encoder, vocab, cache_dir: str | Path | None = None,
                        progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                        limits=None, meta: dict | None = None):
    """Algorithm 1 on `images`: encode them and the vocabulary, then build the CARE-set.

    Args:
        images: the target images (PIL).
        config: the CARE-set settings (reference word, K, N, clustering, ...).
        encoder: a `recare.encoders.Encoder` (`recare.models.load_encoder`).
        vocab: a `recare.encoders.Vocabulary` (the candidate tokens).
        cache_dir: vocabulary-feature cache (default: $RECARE_CACHE or ~/.cache/recare/vocab).
        progress: receives the "vocabulary" and "careset" stages' events.
        cancel: checked between steps.
        limits: the resource limits (`recare.limits.Limits`; default from the environment).
        meta: more facts for the CARE-set's meta (where the images came from, ...).

    Returns:
        The `recare.careset.CareSet`.
    """
    from recare.careset import build_care_set
    from recare.encoders import vocabulary_features

    image_features = encoder.encode_images(images)
    vocab_features = vocabulary_features(encoder, vocab, cache_dir=cache_dir, progress=progress, cancel=cancel,
                                         limits=limits)
    target_feature = encoder.encode_texts([config.reference_word])[0]
    return build_care_set(
        image_features, vocab_features, vocab.tokens, target_feature, config, progress=progress, cancel=cancel,
        meta={"encoder": encoder.identity, "vocabulary": vocab.source, "vocabulary_hash": vocab.hash,
              "vocabulary_size": len(vocab), **(meta or {})},
    )


def write_careset_files(careset, folder: str | Path) -> Path:
    """Write `careset.rich.json` (ours, reopens for editing) and `careset.json` (official) into `folder`.

    Returns:
        The path of the official careset.json (what training reads).
    """
    from recare.careset_io import save_rich_json, write_careset_json

    folder = Path(folder)
    save_rich_json(careset, folder / "careset.rich.json")
    return write_careset_json(careset, folder / "careset.json")


def mini_world_task(name: str, spec: dict | None = None) -> dict:
    """The mini-world task called `name` (its key, e.g. "van_gogh", or its reference word, "van gogh").

    Raises:
        ConfigError: no such task (the known ones are listed) or the mini world is not installed.
    """
    spec = worldspec.mini_world_spec() if spec is None else spec
    tasks = spec.get("tasks") if isinstance(spec.get("tasks"), dict) else {}
    wanted = " ".join(str(name).lower().replace("_", " ").split())
    for key, task in tasks.items():
        names = {" ".join(key.lower().replace("_", " ").split()), " ".join(task.get("reference_word", "").lower().split())}
        if wanted in names:
            return task
    known = ", ".join(sorted(tasks)) or "none (the mini world is not installed)"
    raise ConfigError(f"unknown mini-world task {name!r}: use one of {known}.")


def task_train_config(task: dict, method: str = "recare", spec: dict | None = None, **fields: Any) -> TrainConfig:
    """A TrainConfig for a mini-world task: the method's official preset, then the world's recommended
    settings (recare.json "unlearning": "common", then per method, then the task's own "tasks": {name:
    {"common", "methods"}}; chosen by measurement and written down there), then `fields`.

    Args:
        task: a task dict (`mini_world_task`).
        method: "recare", "esd", "recare-no-adv" or "recare-no-retain".
        spec: the parsed recare.json (default: the installed mini world's).
        **fields: TrainConfig fields that win over everything else.
    """
    spec = worldspec.mini_world_spec() if spec is None else spec
    preset = TrainConfig.for_method(method, model="mini-world", target_prompt=task["target_prompt"],
                                    reference_word=task["reference_word"],
                                    initializer_token=task.get("initializer_token", "person"))
    data = preset.to_dict()
    unlearning = spec.get("unlearning") if isinstance(spec.get("unlearning"), dict) else {}
    _merge(data, unlearning.get("common") or {})
    _merge(data, (unlearning.get("methods") or {}).get(method) or {})
    # a task's own measured settings win over the world-wide ones (van gogh needs a larger lr than tench)
    per_task = (unlearning.get("tasks") or {}).get(task.get("name")) or {}
    _merge(data, per_task.get("common") or {})
    _merge(data, (per_task.get("methods") or {}).get(method) or {})
    if method == "esd" and task.get("prompt_style") == "painting":
        data["train_method"] = "xattn"   # ESD-x for styles, ESD-u (noxattn) for objects, as the original ESD
    ti = (data.get("stage1") or {}).get("textual_inversion")
    if ti is not None:
        ti["templates"] = task.get("prompt_style", "photo")
    _merge(data, fields)
    return TrainConfig.from_dict(data)


def training_config(task: dict | None, method: str = "recare", *, iterations: int | None = None,
                    stage1_iterations: int | None = None, ti_steps: int | None = None, lr: float | None = None,
                    rollout_batch: int | None = None, min_token_strength: float | None = None,
                    stage1_attempts: int | None = None, search_original: bool | None = None,
                    closing_rounds: int | None = None, closing_attempts: int | None = None,
                    closing_ti_steps: int | None = None, closing_probe_steps: int | None = None,
                    **fields: Any) -> TrainConfig:
    """The TrainConfig a user asks for, the same from the command line (`python -m recare train`) and the
    app's Train workspace: the method's preset (with a mini-world task's recommended settings,
    `task_train_config`), then `fields`, then the step overrides. An override left None keeps the preset's.

    Args:
        task: a mini-world task (`mini_world_task`), or None for the method's official preset.
        method: "recare", "esd", "recare-no-adv" or "recare-no-retain".
        iterations: erase iterations of the final stage (stage 2, or the ESD baseline), and of every stage-1
            round unless `stage1_iterations` is given (--iterations).
        stage1_iterations: erase iterations of every stage-1 round (--stage1-iterations).
        ti_steps: textual-inversion steps per stage-1 round (--ti-steps).
        lr: the final stage's learning rate (--lr).
        rollout_batch: iterations rolled out at once (--rollout-batch).
        min_token_strength, stage1_attempts, search_original: stage 1's search (--min-token-strength,
            --stage1-attempts, --search-original; `Stage1Config`).
        closing_rounds: stage 2's closing search (--closing-rounds; `Stage2Config.closing_rounds`). `iterations` and
            `ti_steps` also cap its stage-2 iterations and inversion steps (a short run is short everywhere; a
            probe on the way, `closing_probe_steps`, is dropped when `ti_steps` makes the inversion no longer than it).
        closing_attempts, closing_ti_steps, closing_probe_steps: the inversions per closing round, their steps and
            the step they are also probed at, 0 for none (--closing-attempts, --closing-ti-steps,
            --closing-probe-steps; `Stage2Config`).
        **fields: TrainConfig fields (model, device, seed, target_prompt, ...).
    """
    config = task_train_config(task, method, **fields) if task else TrainConfig.for_method(method, **fields)
    data = config.to_dict()
    final = data.get("stage2") or data.get("esd")
    stage1 = data.get("stage1")
    if iterations is not None:
        final["iterations"] = iterations
    stage1_iterations = iterations if stage1_iterations is None else stage1_iterations
    if stage1 is not None and stage1_iterations is not None:
        stage1["esd"]["iterations"] = stage1_iterations
    if stage1 is not None and ti_steps is not None:
        stage1["textual_inversion"]["steps"] = ti_steps
    for key, value in (("min_token_strength", min_token_strength), ("attempts", stage1_attempts),
                       ("search_original", search_original)):
        if stage1 is not None and value is not None:
            stage1[key] = value
    stage2 = data.get("stage2")
    for key, value in (("closing_rounds", closing_rounds), ("closing_attempts", closing_attempts),
                       ("closing_ti_steps", closing_ti_steps), ("closing_probe_steps", closing_probe_steps)):
        if stage2 is not None and value is not None:
            stage2[key] = None if key == "closing_probe_steps" and value == 0 else value   # 0: no probe on the way
    # a shorter run asked for is short everywhere: the step overrides also cap the closing search's
    if stage2 is not None and iterations is not None:
        stage2["closing_iterations"] = min(stage2["closing_iterations"], iterations)
    if stage2 is not None and ti_steps is not None and stage2.get("closing_ti_steps") is not None:
        stage2["closing_ti_steps"] = min(stage2["closing_ti_steps"], ti_steps)
    if stage2 is not None and stage1 is not None and ti_steps is not None and stage2.get("closing_probe_steps"):
        closing_steps = stage2.get("closing_ti_steps") or stage1["textual_inversion"]["steps"]
        if stage2["closing_probe_steps"] >= closing_steps:   # a run made that short has no probe on the way
            stage2["closing_probe_steps"] = None
    if lr is not None:
        final["learning_rate"] = lr
    if rollout_batch is not None:
        data["rollout"]["batch"] = rollout_batch
    return TrainConfig.from_dict(data)


def _merge(data: dict, updates: dict) -> None:
    """Deep-merge `updates` into `data` (nested dicts merge; None and other values replace)."""
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge(data[key], value)
        else:
            data[key] = value


def prepare_task_inputs(folder: str | Path, task: dict, pipe, num_images: int, spec: dict | None = None,
                        encoder=None, progress: ProgressCallback | None = None,
                        cancel: CancelToken | None = None) -> tuple[Path, Path]:
    """Generate a mini-world task's target images and build its CARE-set into `folder`, once.

    Images go to `folder/target_images` (the world's generation settings, seeds 42 + i), the CARE-set
    (the world's recommended Algorithm-1 parameters, the mini CLIP, the world's vocabulary) to
    `folder/careset/`. What is already there (a resumed run) is reused.

    Returns:
        (the images folder, the official careset.json path).
    """
    from recare.encoders import word_list_vocabulary
    from recare.generate import generated_images
    from recare.models.encoders import load_encoder

    spec = worldspec.mini_world_spec() if spec is None else spec
    folder = Path(folder)
    images_dir, careset_dir = folder / TARGET_IMAGES_DIR, folder / CARESET_DIR
    gen = dataclasses.replace(worldspec.generate_defaults(spec), prompt=task["target_prompt"], num_images=num_images)
    images = generated_images(pipe, gen, images_dir, progress, cancel)
    careset_json = careset_dir / "careset.json"
    if not careset_json.is_file():
        words = worldspec.mini_world_words(spec)
        if not words:
            raise ConfigError("the mini world has no vocabulary in recare.json; build the CARE-set yourself "
                              "(python -m recare careset) and pass --careset.")
        encoder = encoder if encoder is not None else load_encoder("mini-world", device="cpu")
        config = worldspec.careset_defaults(spec, task)
        careset = careset_from_images(images, config, encoder, word_list_vocabulary(words, source="mini-world"),
                                      progress=progress, cancel=cancel)
        write_careset_files(careset, careset_dir)
    return images_dir, careset_json


def run_task_training_job(run, progress: ProgressCallback | None, cancel: CancelToken | None) -> dict:
    """Job target "recare.workflows:run_task_training_job": `recare.train.recipe.run_training_job`, after
    copying the inputs it was given into the run folder and making those a mini-world task still lacks.

    An "inputs" section ({"images": [image files], "careset": official careset dict}) is copied into
    `<run>/inputs/` at the start (the app passes a browser session's files, which may go away while
    the run waits or trains), and the settings then point there.

    When the run's config.json names a mini-world task ("task") and its training settings have no
    CARE-set (or stage 1 has no images), the task's images and CARE-set are made into the run folder
    first (`prepare_task_inputs`, as `python -m recare train --task` does) and written into the
    settings, so a resumed run finds them. Everything else is `run_training_job`.

    Args:
        run: a `recare.runs.Run` whose config.json holds {"train": TrainConfig fields, "task": name or
            absent, "preview": optional PreviewConfig fields}.
        progress: the job runner's reporter.
        cancel: the run's cancel token.
    """
    from recare.models.pipelines import load_pipeline
    from recare.models.policy import MINI_WORLD
    from recare.atomic import atomic_write_json
    from recare.train.recipe import job_config, run_training_job

    settings = run.config()
    if isinstance(settings.get("inputs"), dict) and isinstance(settings.get("train"), dict):
        settings = stage_inputs(run, settings)
    if settings.get("task") and isinstance(settings.get("train"), dict):
        config = TrainConfig.from_dict(settings["train"])
        if (config.stage2 is not None and config.careset is None) or (config.stage1 is not None and config.images is None):
            task = mini_world_task(settings["task"])
            pipe = load_pipeline(MINI_WORLD, device=config.device, dtype="fp32")
            images_dir, careset_json = prepare_task_inputs(run.path, task, pipe, config.num_images,
                                                           progress=progress, cancel=cancel)
            config = dataclasses.replace(config, images=config.images or str(images_dir),
                                         careset=config.careset or str(careset_json))
            atomic_write_json(run.config_path, {**settings, **job_config(config)})
            del pipe
    return run_training_job(run, progress, cancel)


INPUTS_DIR = "inputs"


def stage_inputs(run, settings: dict) -> dict:
    """Copy the "inputs" section's images and CARE-set into `<run>/inputs/` and point the training settings there.

    `recare.jobs.requests.TrainRequest` calls it when the run is submitted (a browser session's files may
    be gone by the time the job starts); a job whose settings still carry "inputs" (a run queued by an
    older version) copies them when it starts.

    Args:
        run: the run.
        settings: its config.json with an "inputs" section ({"images": files, "careset": official dict}).

    Returns:
        The settings written back: "inputs" replaced by the copies' paths in "train".
    """
    import shutil

    from recare.atomic import atomic_write_dir, atomic_write_json
    from recare.careset_io import write_careset_json
    from recare.errors import ImageInputError

    inputs, train = settings["inputs"], dict(settings["train"])
    folder = run.path / INPUTS_DIR
    if inputs.get("images"):
        images_dir = folder / "images"
        if not images_dir.is_dir():
            with atomic_write_dir(images_dir) as tmp:  # all the images or none: a crash leaves no half copy
                for i, source in enumerate(inputs["images"]):
                    source = Path(source)
                    if not source.is_file():
                        raise ImageInputError(f"the target image {source.name} is gone (its browser session was "
                                              "closed); generate or upload the images again and start the run.")
                    shutil.copyfile(source, tmp / f"{i:04d}{source.suffix.lower()}")
        train["images"] = str(images_dir)
    if isinstance(inputs.get("careset"), dict):
        careset = folder / "careset.json"
        if not careset.is_file():
            write_careset_json(inputs["careset"], careset)  # the one careset.json builder (checked first)
        train["careset"] = str(careset)
    settings = {**{k: v for k, v in settings.items() if k != "inputs"}, "train": train,
                "inputs_copied": {"images": len(inputs.get("images") or []), "careset": "careset" in inputs}}
    atomic_write_json(run.config_path, settings)
    return settings


__all__ = ["careset_from_images", "write_careset_files", "mini_world_task", "task_train_config", "training_config",
           "prepare_task_inputs", "run_task_training_job", "stage_inputs", "TARGET_IMAGES_DIR", "CARESET_DIR"]

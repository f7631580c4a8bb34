"""An evaluation run: generate every attack, CARE and CLIP image, judge it, and write a run folder.

    result = evaluate(EvaluationConfig(task="tench", unet="runs/train-..."), out="runs")
    result.metrics["asr"]          # {"erased": 3.1, "cce": 40.6, "completion": ..., "noise": ...} (percent)

The run folder (`evaluate-<stamp>-<hex>/`):

    config.json     the resolved settings (an `EvaluationConfig`, under "evaluation"); resume reads it
    manifest.json   everything that reproduces the numbers: the resolved settings, seeds per prompt, DDIM
                    steps, guidance, scheduler and its config, model fingerprints (base UNet, evaluated UNet,
                    text encoder, the trained weights' files with sha256), encoder identity, label list,
                    the detector's name / version / thresholds, each attack's settings, the reference
                    images, the CLIP range, library versions, process count, timing
    metrics.json    asr (percent, per attack; a learned attack's is the mean of its runs), asr_runs
                    ({learned attack: [percent of each run]}), asr_worst ({learned attack: the largest run}),
                    clip_score, care_score (mean, per concept), ratio (Defense from the mean CCE ASR, with
                    the CLIP range used; ratio.worst: the same with the worst CCE run), target_leak
                    (percent of CARE images where the detector fires)
    records.csv     one row per image (`RECORD_FIELDS`): attack ("care" / "clip" for the CARE-score and
                    CLIP-score sets), run (the learned attack's run, else 0), concept, prompt, the
                    prompt the model was given when it differs (UnlearnDiff's adversarial prompt), seed,
                    file, detector score, positive, detector labels (JSON, best first), CARE hit and top
                    labels, CLIP cosine
    images/<attack>/p<prompt>-s<seed>.png (run r > 0 of a learned attack: images/<attack>/run<r>/...),
    reference/NNN.png (real target images; CCE's run r > 0: reference/run<r>/), cce/token.safetensors
    (run r > 0: cce/run<r>/), ud/reference/pNN.png (the base model's image of each UnlearnDiff prompt),
    ud/run<r>/results.json (each prompt's attack: adversarial prompt, success, timestep, losses)
    shards/records-p<i>-of-<n>.jsonl   what each process wrote (the resume state)

The work is a plan of batches (`build_plan`): per attack, its prompts x seeds base_seed + i; the CARE
prompts x care_images_per_prompt seeds; one image per CLIP caption (caption i: seed base_seed + i).
A batch is `batch_size` consecutive images of one attack, always the same images whatever the
process count, so every image comes out of the same pipeline call in a 1- or N-process run.
Resume: a batch whose images and records are all on disk is not generated again (key: attack,
concept, prompt, seed). Scale-out: under `accelerate launch`, batch b is process (b mod N)'s; the main
process prepares the reference images and the CCE token first, and merges after a barrier.

This module is the engine (prepare, generate, merge) and the entry points; the parts it runs live in
  recare.eval.plan         the plan (`build_plan`, `prompt_table`, `planned_counts`)
  recare.eval.scoring      the models it loads and the scorer that judges each batch
  recare.eval.records      records.csv and the shard files (the resume state)
  recare.eval.run_metrics  metrics.json from the records (`compute_metrics`, `partial_metrics`)
  recare.eval.manifest     manifest.json

Job target: `recare.eval.run:run_evaluation_job(run, progress, cancel)`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

from PIL import Image

from recare.atomic import atomic_save, atomic_write_bytes, atomic_write_json
from recare.errors import EvaluationError
from recare.eval.attacks import ATTACKS, AttackContext, learn_cce_token, reference_images, render
from recare.eval.config import (
    EvaluationConfig, _tokens_dir, attack_runs_of, config_from_file, resolve_config, stored_config,
)
from recare.eval.distributed import Processes, processes
from recare.eval.manifest import build_manifest
from recare.eval.plan import IMAGE_SETS, PlanBatch, build_plan
from recare.eval.records import append_records, record_key, shard_records, write_records_csv
from recare.eval.run_metrics import compute_metrics
from recare.eval.scoring import Models, Scorer, build_detector, load_models
from recare.metrics_io import write_metrics_json
from recare.progress import CancelToken, ProgressCallback, check_cancel, emit
from recare.runs import new_run_dir

STAGE = "evaluate"


@dataclasses.dataclass
class EvaluationResult:
    """What an evaluation wrote: its folder, metrics.json, manifest.json and the records."""

    run_dir: Path
    metrics: dict
    manifest: dict
    records: list[dict]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _load_png(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class _Evaluation:
    """One process's share of an evaluation run (see the module docstring for the flow)."""

    def __init__(self, config: EvaluationConfig, models: Models, captions: list[str], run_dir: Path, procs: Processes,
                 progress: ProgressCallback | None, cancel: CancelToken | None, run=None):
        self.config, self.models, self.run_dir, self.procs = config, models, run_dir, procs
        self.progress, self.cancel, self.run = progress, cancel, run
        self.ctx = AttackContext(config, models.pipe, base=models.base, tokens_dir=_tokens_dir(config.unet))
        self.captions = captions
        self.plan = build_plan(config, self.ctx, self.captions)
        self.scorer = Scorer(config, models.detector, models.encoder)
        self.shard = run_dir / "shards" / f"records-p{procs.index}-of-{procs.count}.jsonl"
        self.timing: dict[str, float] = {}
        self.generated = 0

    # -- preparation (main process), then every process loads what was prepared ------------------
    def needs(self) -> set[str]:
        return {n for a in self.config.attacks for n in ATTACKS[a].needs}

    def prepare(self) -> None:
        started = time.perf_counter()
        needs = self.needs()
        cce_runs = range(attack_runs_of(self.config, "cce")) if "cce_token" in needs else range(0)
        ud_runs = range(attack_runs_of(self.config, "ud")) if "ud_results" in needs else range(0)
        reference_runs = sorted({0, *cce_runs}) if "reference" in needs else []
        if self.procs.is_main:
            for run in reference_runs:
                self._prepare_reference(run)
            for run in cce_runs:
                self._prepare_cce(run)
            for run in ud_runs:
                self._prepare_ud(run)
        self.procs.barrier()
        if "reference" in needs:
            self.ctx.reference = self._load_reference()
        self.ctx.cce_tokens = {run: self._load_cce(run) for run in cce_runs}
        self.ctx.cce_token = self.ctx.cce_tokens.get(0)
        self.ctx.ud_results = {run: self._load_ud(run) for run in ud_runs}
        self.timing["prepare_s"] = round(time.perf_counter() - started, 3)

    def reference_files(self, run: int = 0) -> list[Path]:
        folder = self.run_dir / "reference" / (f"run{run}" if run else "")
        return [folder / f"{i:03d}.png" for i in range(self.config.cce_images)]

    def _prepare_reference(self, run: int = 0) -> None:
        files = self.reference_files(run)
        if all(f.is_file() for f in files):
            return
        emit(self.progress, "reference", 0, len(files),
             f"{len(files)} real target images ({self.config.reference_images}, run {run + 1})")
        images = reference_images(self.config, base=self.models.base, count=len(files), run=run)
        for f, image in zip(files, images):
            atomic_write_bytes(f, _png(image))
        emit(self.progress, "reference", len(files), len(files), "real target images ready")

    def _load_reference(self, run: int = 0) -> list[Image.Image]:
        return [_load_png(f) for f in self.reference_files(run)]

    def _cce_dir(self, run: int = 0) -> Path:
        return self.run_dir / "cce" / (f"run{run}" if run else "")

    def cce_file(self, run: int = 0) -> Path:
        return self._cce_dir(run) / "token.safetensors"

    def _prepare_cce(self, run: int = 0) -> None:
        import torch
        from safetensors.torch import save_file

        from recare.errors import Cancelled
        from recare.train.textual_inversion import TextualInversionState

        if self.cce_file(run).is_file():
            return
        state_file = self._cce_dir(run) / "state.pt"
        state = (TextualInversionState.from_state_dict(torch.load(state_file, weights_only=True))
                 if state_file.is_file() else TextualInversionState())
        try:
            token = learn_cce_token(self.models.pipe, self._load_reference(run), self.config, self.progress,
                                    self.cancel, state, run=run)
        except Cancelled:
            atomic_save(state_file, lambda p: torch.save(state.state_dict(), p))
            raise
        atomic_save(self.cce_file(run), lambda p: save_file(
            {token.placeholder: token.embedding.contiguous()}, str(p),
            metadata={"initializer": token.initializer, "steps": str(len(token.losses)),
                      "final_loss": repr(token.losses[-1]) if token.losses else "", "run": str(run)}))
        atomic_write_json(self._cce_dir(run) / "losses.json", list(token.losses))
        state_file.unlink(missing_ok=True)

    def _load_cce(self, run: int = 0):
        from safetensors import safe_open

        from recare.train.textual_inversion import LearnedToken

        with safe_open(str(self.cce_file(run)), framework="pt") as f:
            (placeholder,) = list(f.keys())
            initializer = (f.metadata() or {}).get("initializer", self.config.initializer_token)
            return LearnedToken(placeholder, initializer, f.get_tensor(placeholder).float())

    def _ud_file(self, run: int) -> Path:
        return self.run_dir / "ud" / f"run{run}" / "results.json"

    def _prepare_ud(self, run: int) -> None:
        """UnlearnDiff's run `run` on every prompt (results saved after each prompt: a resume skips them)."""
        from recare.eval.unlearndiff import attack_prompts

        prompts = ATTACKS["ud"].prompts(self.ctx)
        path = self._ud_file(run)
        done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if all(p in done for p in prompts):
            return
        originals = self._ud_originals(prompts)
        c = self.config

        def shows_target(prompt: str) -> bool:   # the unlearned model's image of `prompt` at the attack seed
            (image,) = render(self.models.pipe, [prompt], [c.base_seed], c)
            return bool(self.models.detector.detect([image])[0].positive)

        def save(results: dict) -> None:
            atomic_write_json(path, results)

        attack_prompts(self.models.pipe, prompts, originals, shows_target, c, run, done, save,
                       self.progress, self.cancel)

    def _ud_originals(self, prompts: list[str]) -> list[Image.Image]:
        """The original (base) model's image of each UnlearnDiff prompt at the attack seed (made once)."""
        files = [self.run_dir / "ud" / "reference" / f"p{k:02d}.png" for k in range(len(prompts))]
        for k, (f, prompt) in enumerate(zip(files, prompts)):
            if not f.is_file():
                (image,) = render(self.models.base, [prompt], [self.config.base_seed], self.config)
                atomic_write_bytes(f, _png(image))
        return [_load_png(f) for f in files]

    def _load_ud(self, run: int) -> dict[str, dict]:
        return json.loads(self._ud_file(run).read_text(encoding="utf-8"))

    # -- generation --------------------------------------------------------------------------
    def done_keys(self) -> set[tuple[str, int, str, str, int]]:
        """Keys of images whose record and file are both on disk (any process, any earlier attempt)."""
        return {record_key(r) for r in shard_records(self.run_dir) if (self.run_dir / r["file"]).is_file()}

    def generate(self) -> None:
        started = time.perf_counter()
        mine = [b for b in self.plan if self.procs.owns(b.number)]
        done = self.done_keys()
        todo = [b for b in mine if not all(it.key in done for it in b.items)]
        total = sum(len(b.items) for b in mine)
        made = total - sum(len(b.items) for b in todo)
        if self.run is not None:
            self.run.save_state(lambda folder: (folder / "evaluation.json").write_text(
                json.dumps({"shards": "shards/", "images_done_at_start": made}), encoding="utf-8"))
        emit(self.progress, STAGE, made, total, f"{made} of {total} images already made" if made else "")
        for batch in todo:
            check_cancel(self.cancel, "the evaluation")
            images, shown = self.render(batch)
            records = self.scorer.score(batch, images, shown)
            for it, image in zip(batch.items, images):
                atomic_write_bytes(self.run_dir / it.file, _png(image))
            append_records(self.shard, records)
            made += len(batch.items)
            self.generated += len(batch.items)
            emit(self.progress, STAGE, made, total, f"{batch.attack}: {batch.items[-1].prompt[:40]}")
        self.timing["generate_s"] = round(time.perf_counter() - started, 3)

    def render(self, batch: PlanBatch) -> tuple[list[Image.Image], list[str]]:
        """The batch's images and the prompts the model was given (a batch holds one run of one attack)."""
        attack = {**ATTACKS, **IMAGE_SETS}[batch.attack]
        run = batch.items[0].run
        pipe = attack.pipeline(self.ctx, run)
        pipe.set_progress_bar_config(disable=True)
        seeds = [it.seed for it in batch.items]
        prompts = [it.prompt for it in batch.items]
        images = render(pipe, prompts, seeds, self.config, call=lambda kwargs: attack.call(self.ctx, kwargs, seeds, run))
        return images, attack.shown(self.ctx, prompts, run)


    # -- merge (main process) ----------------------------------------------------------------
    def merge(self, seconds: float) -> EvaluationResult:
        by_key = {}
        for record in shard_records(self.run_dir):
            by_key.setdefault(record_key(record), record)
        items = [it for b in self.plan for it in b.items]
        missing = [it for it in items if it.key not in by_key or not (self.run_dir / it.file).is_file()]
        if missing:
            raise EvaluationError(f"{len(missing)} of {len(items)} images have no record (first: {missing[0].key}); "
                                  "a process stopped early: resume the run to make them.")
        records = [{"run": 0, "attack_prompt": "", **by_key[it.key], "index": it.index, "concept": it.concept,
                    "file": it.file} for it in items]
        emit(self.progress, "metrics", 0, 1, "metrics")
        metrics = compute_metrics(records, self.config)
        manifest = build_manifest(self, seconds)
        write_records_csv(self.run_dir / "records.csv", records)
        write_metrics_json(self.run_dir, metrics)
        atomic_write_json(self.run_dir / "manifest.json", manifest)
        emit(self.progress, "metrics", 1, 1, "metrics written")
        return EvaluationResult(self.run_dir, metrics, manifest, records)



def evaluate(config: EvaluationConfig | None = None, out: str | Path = "runs", run_dir: str | Path | None = None,
             progress: ProgressCallback | None = None, cancel: CancelToken | None = None, run=None) -> EvaluationResult:
    """Run (or resume) an evaluation and write its run folder.

    Args:
        config: the settings; None reads them from `run_dir`'s config.json (resume).
        out: parent folder of a new run folder (when `run_dir` is None).
        run_dir: an existing run folder to resume (its images and records are kept), or None for a new one.
        progress: receives `ProgressEvent`s (stages "reference", "cce", "evaluate", "metrics").
        cancel: checked between batches (and CCE steps); raises `recare.errors.Cancelled`, keeping what was made.
        run: the `recare.runs.Run` when called as a job (its config.json is the job's; a state/ marker is saved).

    Returns:
        The `EvaluationResult` (in a multi-process launch: the main process's; the others return one
        with empty metrics after the merge).

    Raises:
        ConfigError / EvaluationError / ModelLoadError: bad settings, detector or weights; the
        message says what to change. Cancelled: the token was set.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir).expanduser() if run_dir is not None else None
    stored = stored_config(run_dir) if run_dir is not None and run is None else None
    if config is None and stored is None:
        raise EvaluationError("no evaluation settings: pass a config, or a run folder with its config.json.")
    resolved = resolve_config(config if config is not None else stored)
    if stored is not None and config is not None and resolve_config(stored) != resolved:
        a, b = resolve_config(stored).to_dict(), resolved.to_dict()
        changed = sorted(k for k in a if a[k] != b[k])
        raise EvaluationError(f"{run_dir} was made with other settings ({', '.join(changed)} differ); resume it "
                              "without changing them, or start a new run.")
    from recare.eval.utility import clip_prompts

    procs = processes(resolved.device)
    captions = clip_prompts(resolved)     # fail fast, before any model loads or a folder is made:
    detector = build_detector(resolved)   # an empty prompt file, an unknown detector, missing weights
    models = load_models(resolved, procs.device, detector)
    if run_dir is None:
        run_dir = Path(procs.broadcast(str(new_run_dir(out, "evaluate")) if procs.is_main else None))
    if procs.is_main and run is None and stored is None:
        from recare import __version__

        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", {"command": "evaluate", "recare_version": __version__,
                                                    "evaluation": resolved.to_dict()})
    evaluation = _Evaluation(resolved, models, captions, run_dir, procs, progress, cancel, run)
    evaluation.prepare()
    evaluation.generate()
    procs.barrier()
    if not procs.is_main:
        return EvaluationResult(run_dir, {}, {}, [])
    result = evaluation.merge(time.perf_counter() - started)
    return result


def run_evaluation_job(run, progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> dict:
    """Job target for `recare.jobs.JobRunner`: `recare.eval.run:run_evaluation_job`.

    The run's config.json holds {"evaluation": EvaluationConfig fields} (or the fields themselves).
    A cancelled or crashed job resumes from the images and records already in the folder.

    Returns:
        {"metrics": metrics.json's content, "images": records written}.
    """
    config = config_from_file(run.config())
    result = evaluate(config, run_dir=run.path, progress=progress, cancel=cancel, run=run)
    return {"metrics": result.metrics, "images": len(result.records)}


__all__ = ["EvaluationResult", "evaluate", "run_evaluation_job"]

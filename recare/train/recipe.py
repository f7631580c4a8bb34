"""The training recipe: stage 1 (erase <-> textual inversion rounds), then stage 2 or the ESD baseline.

    train(config, pipe, images, careset, out_dir)          a plain function (CLI, notebooks, tests)
    run_training_job(run, progress, cancel)                the job target "recare.train.recipe:run_training_job"

Which stages run is read from the config's values (`TrainConfig`), never from the method's name:

    stage1 set   round r = 0 .. n-1: ESD of the current concept (the reference word, then the previous
                 round's token) on the UNet as the previous rounds left it, the frozen teacher being that
                 UNet at the round's start (official: each round's FineTunedModel copies the erased UNet);
                 then textual inversion of a fresh token against the erased UNet on the round's slice
                 of the images.
    stage2 set   ReCARE on a fresh copy of the base UNet, the frozen base as teacher, H = {reference
                 word} + the stage-1 tokens (just the reference word when stage1 is None); with
                 `stage1.min_token_strength` set (not official), only the tokens whose probe found them
                 drawing the target on the original model at least that often (result.json's "erase_set").
                 With `stage2.closing_rounds` (not official), then the closing search: rounds of textual inversion
                 against the trained UNet; a token that still draws the target joins H and stage 2 goes on
                 (`recare.train.search`).
    esd set      the ESD baseline: ESD of the reference word on a fresh copy of the base UNet.

Every loop draws from its own CPU generator seeded with `config.seed` (official: `train_erasing`
and the textual inversion re-seed 42 each call), so the same config and seed give the same
weights on the CPU.

Resumable state (`<out_dir>/state/`, replaced as a whole at every save):

    state.pt              where the run stands (phase, round), the tokens learned so far, the
                          textual-inversion state, the config it belongs to
    trainer.pt            the current erase loop: trained tensors, AdamW, generator, pending roll-outs
    erased-<r>.pt         the stage-1 UNet's trained tensors after round r's erasure (written once,
                          hard-linked into later saves)
    closed-<k>.pt         the trained UNet's tensors as closing round k found them

It is saved every `config.save_every` iterations (or textual-inversion steps), and when the run is
cancelled. A resumed run reaches the same weights as an uninterrupted one (bit for bit on the CPU).

Outputs in `out_dir`: config.json (every setting, the base model's fingerprint, library versions),
careset.json (the CARE-set used), tokens/<name>.safetensors, metrics.jsonl (one line per
iteration, and per stage-1 round one "stage1.probe" line: its token's strength on the original and the
erased model, also in result.json's "stage1_probe"; a closing round's on the original and the trained model, in
"closing_probe"), trained_params.safetensors (and unet/, ReCARE-Diffusers-UNet.pt on request), result.json.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from recare.config import TrainConfig
from recare.errors import ConfigError, TrainingError
from recare.progress import CancelToken, ProgressCallback, ProgressEvent
from recare.atomic import atomic_write_json
from recare.metrics_io import METRICS_LINES, append_metrics
from recare.train.esd import ErasureTrainer, ESDTrainer
from recare.train.outputs import write_config, write_outputs
from recare.train.params import trainable_parameter_names
from recare.train.rollout import XtSampler, amp_dtype, autocast_factory, encode_prompts
from recare.train.stage2 import Stage2Trainer
from recare.train.search import CLOSING_ERASE, CLOSING_TI, STAGE1_ERASE, STAGE1_TI, TokenSearch
from recare.train.search import round_images, round_placeholder  # noqa: F401 (where tests and benchmarks find them)
from recare.train.state import STATE_DIR, STATE_FORMAT, STATE_VERSION, StateFolder, token_dict, token_of

RESULT_FILE = "result.json"
METRICS_FILE = METRICS_LINES
TARGET_IMAGES_DIR = "target_images"

STAGE2, ESD = "stage2", "esd"
OOM_ADVICE = ("CUDA ran out of memory during {stage}. What lowers the peak most is train_method 'xattn' (fewer "
              "trained tensors and optimizer states: an SD v1.4 model at 512 px peaked at 11-14 GB instead of "
              "20 GB with 'noxattn'); then dtype 'bf16' or 'fp16', gradient_checkpointing true, a smaller "
              "rollout.resolution, rollout.batch 1, a smaller textual-inversion batch_size. {resume}")


@dataclasses.dataclass
class TrainResult:
    """What `train` made.

    Attributes:
        out_dir: the run folder.
        unet: the trained UNet (float32, on the training device).
        tokens: the learned adversarial tokens, in order (empty without stage 1).
        files: output name -> path ("trained_params", "unet_folder", "official_pt", "tokens/<name>", ...).
        summary: JSON-ready figures: iterations, seconds, first/last losses per phase.
    """

    out_dir: Path
    unet: torch.nn.Module
    tokens: list
    files: dict[str, str]
    summary: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# the recipe


class _Recipe(TokenSearch):
    """One training run; `run()` goes through the phases, skipping those a resumed state has done (stage 1 and
    the closing search are `TokenSearch`'s methods)."""

    def __init__(self, config: TrainConfig, pipe, images, careset, out_dir: Path, progress, cancel,
                 state: StateFolder, resume: bool, write_metrics: bool, preview=None, probe=None):
        self.config, self.pipe, self.careset = config, pipe, careset
        self.images = list(images) if images is not None else None
        self.out_dir = out_dir
        self.cancel = cancel
        self.state = state
        self.resume = resume
        self.device = pipe.unet.device
        self.amp = amp_dtype(config.dtype, self.device)
        self.autocast = autocast_factory(self.device, self.amp)
        self.base = pipe.unet                                   # the frozen original; never changed
        self.trained_names = trainable_parameter_names(self.base, config.train_method)
        self._user_progress = progress
        self._write_metrics = write_metrics
        self.summary: dict[str, Any] = {"phases": {}, "seconds": 0.0}
        self._started = time.perf_counter()
        self._prior_seconds = 0.0            # wall time of the earlier calls of a resumed run
        self._phase = ""
        self._tick = self._started
        self._position: dict | None = None   # where a resumed run stands
        self._preview = preview               # optional: called after erase iterations (recare.train.preview)
        self._student: torch.nn.Module | None = None  # the UNet the current erase loop trains
        self._probe = probe                   # optional: each stage-1 token's strength (recare.train.stage1_probe)

    # ---- progress and metrics -------------------------------------------------------------------

    def begin(self, phase: str) -> None:
        """Name the phase the next events belong to in the summary ("stage1.erase[1]", "stage2", ...)."""
        self._phase, self._tick = phase, time.perf_counter()

    def elapsed(self) -> float:
        return self._prior_seconds + time.perf_counter() - self._started

    def progress(self, event: ProgressEvent) -> None:
        if event.metrics:
            now = time.perf_counter()
            phase = self.summary["phases"].setdefault(self._phase or event.stage, {"iterations": 0, "seconds": 0.0})
            phase["iterations"] = event.step
            phase["total"] = event.total
            phase["seconds"] += now - self._tick       # wall time, the step's own work included
            self._tick = now
            phase.setdefault("first_loss", event.metrics.get("loss"))
            phase["last_loss"] = event.metrics.get("loss")
            if self._write_metrics:
                append_metrics(self.out_dir, event)
        if self._user_progress is not None:
            self._user_progress(event)
        if (self._preview is not None and event.metrics and self._student is not None
                and event.stage in (STAGE1_ERASE, STAGE2, ESD)):
            self._preview(self._phase or event.stage, event.step, event.total, self._student)

    # ---- models ---------------------------------------------------------------------------------

    def fresh_student(self) -> torch.nn.Module:
        """A float32 copy of the base UNet to fine-tune."""
        student = copy.deepcopy(self.base).float()
        if self.config.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        return student

    def frozen_copy(self, unet: torch.nn.Module) -> torch.nn.Module:
        teacher = copy.deepcopy(unet)
        teacher.requires_grad_(False)
        if getattr(teacher, "is_gradient_checkpointing", False):
            teacher.disable_gradient_checkpointing()
        return teacher.eval()

    def sampler(self) -> XtSampler:
        unet, vae = self.base.config, self.pipe.vae.config
        scale = 2 ** (len(vae.block_out_channels) - 1)
        size = self.config.rollout.resolution // scale if self.config.rollout.resolution else unet.sample_size
        return XtSampler(self.pipe.scheduler, (unet.in_channels, size, size), self.config.rollout, self.device)

    def text_models(self, tokens: Sequence):
        """(tokenizer, text encoder) knowing `tokens` (copies; the pipeline's own are never changed)."""
        if not tokens:
            return self.pipe.tokenizer, self.pipe.text_encoder
        from recare.train.textual_inversion import with_learned_tokens

        return with_learned_tokens(self.pipe.tokenizer, self.pipe.text_encoder, list(tokens))

    def embeddings(self, tokens: Sequence, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokenizer, encoder = self.text_models(tokens)
        return encode_prompts(tokenizer, encoder, ["", *prompts], device=self.device)

    def trainer_kwargs(self) -> dict:
        return {"train_method": self.config.train_method, "seed": self.config.seed,
                "rollout_batch": self.config.rollout.batch, "amp_dtype": self.amp}

    # ---- state ------------------------------------------------------------------------------

    def small_state(self, phase: str, round_index: int, tokens: Sequence, ti_state: dict | None = None,
                    **search: Any) -> dict:
        """state.pt's content; `search` is a stage-1 round's search position (attempt, best token so far)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "config": self.config.to_dict(),
                "phase": phase, "round": round_index, "tokens": [token_dict(t) for t in tokens],
                "ti": ti_state, "summary": {**copy.deepcopy(self.summary), "seconds": self.elapsed()}, **search}

    def load_position(self) -> None:
        """Read `state.pt` when resuming; refuse a state made by another config."""
        if not (self.resume and self.state.exists()):
            return
        small = self.state.load()
        if small.get("format") != STATE_FORMAT:
            raise TrainingError(f"{self.state.path} is not a training state.")
        if small.get("config") != self.config.to_dict():
            raise TrainingError(f"the saved state in {self.state.path} was made with other settings; resume it with "
                                "the config it was made with, or train into a new folder.")
        self._position = small
        self.summary = small.get("summary") or self.summary
        self._prior_seconds = float(self.summary.get("seconds") or 0.0)

    # ---- phases -------------------------------------------------------------------------------

    def run_loop(self, trainer: ErasureTrainer, phase: str, round_index: int, tokens: Sequence,
                 fixed: dict[str, Callable[[], Any]], message: str, resume: bool) -> None:
        """Run an erase loop with checkpoints (every save_every iterations and on cancel).

        Args:
            resume: continue from the saved trainer.pt (when the state has one).
        """
        if resume and (self.state.path / "trainer.pt").is_file():
            trainer.load_state_dict(self.state.load("trainer.pt"))

        def checkpoint() -> None:
            self.state.save(self.small_state(phase, round_index, tokens), {"trainer.pt": trainer.state_dict}, fixed)

        self.guard(phase, checkpoint,
                   lambda: trainer.run(self.progress, self.cancel, checkpoint, self.config.save_every, message))

    def guard(self, phase: str, save: Callable[[], None], work: Callable[[], Any]) -> Any:
        """Run `work()`; save the last good state on a TrainingError; turn CUDA out-of-memory into advice."""
        try:
            return work()
        except torch.cuda.OutOfMemoryError as e:
            try:
                torch.cuda.empty_cache()
                save()
                resume = "The last finished step was saved: resume the run after changing these settings."
            except Exception:  # saving needs memory too; the previous checkpoint stays
                resume = "The last checkpoint is kept."
            raise TrainingError(OOM_ADVICE.format(stage=phase, resume=resume)) from e
        except TrainingError:
            save()  # the loops stop before a bad step: what is saved is the last good one
            raise

    def stage2(self, tokens: Sequence, position: dict | None) -> tuple[torch.nn.Module, list]:
        """ReCARE on a fresh copy of the base UNet, H = {reference word} + the tokens; then the closing search
        (`stage2.closing_rounds`). Returns the trained UNet and every token (stage 1's, then the closing ones).

        Args:
            position: the saved state when resuming inside stage 2 or its closing search, else None.
        """
        if not self.careset.base_prompts or not self.careset.retain_prompts:
            raise TrainingError("the CARE-set is empty: stage 2 needs at least one anchor and one retain prompt.")
        student = self.fresh_student()
        phase = position["phase"] if position else None
        if phase not in (CLOSING_TI, CLOSING_ERASE):
            from recare.train.stage1_probe import joins_h

            erase_concepts = [self.config.reference_word,
                              *[t.placeholder for t in tokens if joins_h(self.summary, t)]]
            self.summary["erase_set"] = erase_concepts
            self.erase_loop(student, tokens, erase_concepts, STAGE2, 0, self.config.stage2, self.config.seed,
                            resume=phase == STAGE2)
            position = None
        return student, self.closing(student, list(tokens), position)

    def erase_loop(self, student, tokens: Sequence, erase_concepts: Sequence[str], phase: str, round_index: int,
                   config, seed: int, resume: bool, fixed: dict | None = None) -> None:
        """Stage 2's loop (Eqs. 11-13) on `student`, the frozen base as teacher: `config.iterations` iterations
        with H = `erase_concepts`, the CARE-set's anchors and retain prompts, generator `seed`."""
        anchors, retain = list(self.careset.base_prompts), list(self.careset.retain_prompts)
        embeddings = self.embeddings(tokens, [*erase_concepts, *anchors, *retain])
        trainer = Stage2Trainer(student, self.base, self.sampler(), embeddings, erase_concepts, anchors, retain,
                                config, **{**self.trainer_kwargs(), "seed": seed}, stage=phase)
        self.begin(phase if phase == STAGE2 else f"{phase}[{round_index + 1}]")
        self._student = student
        self.run_loop(trainer, phase, round_index, tokens, fixed or {}, f"H = {list(erase_concepts)}", resume)

    def esd_baseline(self, resume: bool) -> torch.nn.Module:
        """The ESD baseline: ESD of the reference word on a fresh copy of the base UNet."""
        student = self.fresh_student()
        concept = self.config.reference_word
        trainer = ESDTrainer(student, self.base, self.sampler(), self.embeddings([], [concept]), concept,
                             self.config.esd, stage=ESD, **self.trainer_kwargs())
        self.begin(ESD)
        self._student = student
        self.run_loop(trainer, ESD, 0, [], {}, f"erase {concept!r}", resume)
        return student

    # ---- the whole run ----------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.load_position()
        position = self._position
        phase = position["phase"] if position else None
        tokens: list = []
        if self.config.stage1 is not None:
            if phase in (STAGE2, CLOSING_TI, CLOSING_ERASE):
                tokens = [token_of(t) for t in position["tokens"]]
            else:
                tokens = self.stage1(position if phase in (STAGE1_ERASE, STAGE1_TI) else None)
                self.state.save(self.small_state(STAGE2, 0, tokens), {}, {})  # stage 1 is done
        if self.config.stage2 is not None:
            unet, tokens = self.stage2(tokens, position if phase in (STAGE2, CLOSING_TI, CLOSING_ERASE) else None)
        else:
            unet = self.esd_baseline(resume=phase == ESD)
        self.summary["seconds"] = self.elapsed()
        files = write_outputs(self.config, self.base, unet, tokens, self.out_dir)
        result = {"method": self.config.method, "tokens": [t.placeholder for t in tokens], "files": files,
                  **self.summary}
        atomic_write_json(self.out_dir / RESULT_FILE, result)
        shutil.rmtree(self.state.path, ignore_errors=True)   # finished: nothing left to resume
        return TrainResult(self.out_dir, unet, list(tokens), files, result)


# ---------------------------------------------------------------------------------------------
# outputs


# ---------------------------------------------------------------------------------------------
# entry points


def train(config: TrainConfig, pipe, images: Sequence | None, careset, out_dir: str | Path,
          progress: ProgressCallback | None = None, cancel: CancelToken | None = None, *, resume: bool = True,
          save_state: Callable[[Callable[[Path], None]], Any] | None = None, write_metrics: bool = True,
          config_extra: dict | None = None,
          preview: Callable[[str, int, int, torch.nn.Module], Any] | None = None, probe: Any = "auto") -> TrainResult:
    """Train one unlearned UNet (and its adversarial tokens) into `out_dir`.

    Args:
        config: the settings (`TrainConfig.for_method(...)`); `config.model`, `images`, `careset`
            and `device` name the inputs for a job, here the loaded objects are passed directly.
        pipe: the base Stable Diffusion pipeline on the training device, weights float32 (its UNet is
            the frozen teacher; no part of it is changed).
        images: the target images (PIL), needed when `config.stage1` is set.
        careset: an `OfficialCareSet` (`recare.careset_io.read_careset_json`), needed when `config.stage2` is set.
        out_dir: the run folder (created); outputs, metrics.jsonl and the resumable state/ go there.
        progress: receives one event per iteration / textual-inversion step.
        cancel: checked between iterations; when set, the state is saved and `Cancelled` is raised.
        resume: continue from `out_dir/state` when it exists (it must belong to the same config).
        save_state: swaps a filled temp folder in as state/ (default: `recare.atomic.atomic_write_dir`;
            a job passes `run.save_state`).
        write_metrics: append one line per iteration to metrics.jsonl (a job's run store does it itself).
        config_extra: keys to keep in config.json besides the ones written here.
        preview: optional, called as `preview(phase, step, total, student_unet)` after every erase
            iteration (stage-1 erase, stage 2, ESD), e.g. a `recare.train.preview.PreviewWriter`.
            It must not change the UNet; the training result does not depend on it.
        probe: measures each stage-1 token after its round (`recare.train.stage1_probe.Stage1Probe`); "auto"
            builds the one `config.stage1.probe_seeds` asks for (the evaluation's target detector), None
            skips it. The training result does not depend on it.

    Returns:
        A `TrainResult`.

    Raises:
        TrainingError: NaN/Inf loss (the last good state is saved), CUDA out of memory (with advice),
            missing images or CARE-set, a state from other settings.
        Cancelled: the cancel token was set (the state is saved; call again to resume).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.stage2 is not None and careset is None:
        raise TrainingError("stage 2 needs a CARE-set: pass careset (recare.careset_io.read_careset_json(path)).")
    if config.stage1 is not None and not images:
        raise TrainingError("stage 1 needs target images: pass images (PIL images, or "
                            "recare.generate.load_images(path)).")
    if config.stage1 is not None:  # fail before minutes of erasure, not at the first textual inversion
        from recare.train.textual_inversion import single_token_id

        single_token_id(pipe.tokenizer, config.initializer_token)
    write_config(config, pipe, out_dir, careset, images, config_extra)
    state = StateFolder(out_dir / STATE_DIR, save_state)
    if probe == "auto":
        from recare.train.stage1_probe import build_probe

        probe = build_probe(config, pipe)
    recipe = _Recipe(config, pipe, images, careset, out_dir, progress, cancel, state, resume, write_metrics, preview,
                     probe)
    # on CUDA, torch's deterministic kernels: a resumed run equals an uninterrupted one bit for bit (the
    # attention backward passes are not deterministic otherwise; about 10% slower per iteration on an H200)
    from recare.train.determinism import deterministic

    with deterministic(recipe.device.type == "cuda"):
        return recipe.run()


def job_config(config: TrainConfig) -> dict:
    """The settings dict to submit to the job runner for `run_training_job`."""
    return {"train": config.to_dict()}


def run_training_job(run, progress: ProgressCallback | None, cancel: CancelToken | None) -> dict:
    """The job runner's target: train with `run.config()["train"]`, resuming from `run.state_dir`.

    Loads the base model (fp32 weights) on `config.device`, the CARE-set from `config.careset`, the
    target images from `config.images` (or generates `config.num_images` of `config.target_prompt`
    into `<run>/target_images`, once; a resumed run reuses them). With a "preview" section in the
    run's config (`recare.train.preview.PreviewConfig` fields), preview grids go to `<run>/previews`.

    Args:
        run: a `recare.runs.Run` whose config.json holds {"train": TrainConfig fields}.
        progress: the runner's reporter (writes status.json and metrics.jsonl).
        cancel: the run's cancel token.

    Returns:
        The JSON summary stored as the run's result.
    """
    from recare.models import load_pipeline

    settings = run.config()
    if "train" not in settings:
        raise ConfigError(f"run {run.id}: config.json has no 'train' settings (submit recipe.job_config(config)).")
    config = TrainConfig.from_dict(settings["train"])
    pipe = load_pipeline(config.model, device=config.device, dtype="fp32")
    careset = None
    if config.stage2 is not None:
        if not config.careset:
            raise ConfigError("stage 2 needs a CARE-set: set careset to a careset.json (official or rich).")
        from recare.careset_io import read_careset_json

        careset = read_careset_json(config.careset)
    images = _job_images(config, pipe, run.path, progress, cancel) if config.stage1 is not None else None
    preview = None
    if settings.get("preview"):  # optional: preview grids every N erase iterations (recare.train.preview)
        from recare.train.preview import PreviewConfig, PreviewWriter

        preview = PreviewWriter(PreviewConfig.from_dict(settings["preview"]), run.path, pipe)
        preview.write_base()
    result = train(config, pipe, images, careset, run.path, progress, cancel, resume=run.has_state(),
                   save_state=run.save_state, write_metrics=False, config_extra=settings, preview=preview)
    return result.summary


def _job_images(config: TrainConfig, pipe, folder: Path, progress, cancel) -> list:
    """The target images: the configured ones, or generated with the (fp32) base pipeline under the training's
    autocast (`config.dtype`; "auto" = bf16 on CUDA: 500 SD v1.4-shaped images took 4.4 min instead of 12.3 on
    an H200, benchmarks/gpu_check.py; fp32 on the CPU)."""
    from recare.config import GenerateConfig
    from recare.generate import generated_images, load_images

    if config.images:
        return load_images(config.images)
    device = pipe.unet.device
    with autocast_factory(device, amp_dtype(config.dtype, device))():
        return generated_images(pipe, GenerateConfig(prompt=config.target_prompt, num_images=config.num_images),
                                folder / TARGET_IMAGES_DIR, progress, cancel)

"""Typed job requests: the one path by which the app and the CLI start long work.

Every kind of job has one request class, built by whoever starts it (a tab of the app, the CLI,
the reviewer demo):

    TrainRequest      one training run (settings, the session's images and CARE-set to copy in)
    EvaluateRequest   one model's evaluation
    DemoRerunRequest  one bundled demo result recomputed (a training, then its evaluation)

`submit_requests(runner, requests, submitter)` checks every request before any job exists, in
this order, and refuses the whole batch with one sentence at the first problem:
1. the model policy (`Submitter.policy`): in public mode only 'mini-world', hub ids and the
   operator's allowed folders are models, trained weights must be runs of the store, and no field
   names a server path (images, CARE-set files, caption files, detector weights);
2. the bounds (`recare.limits.Limits`, `RECARE_MAX_*`): iterations, textual-inversion steps,
   stage-1 rounds, seeds, CARE images, CLIP captions, attack runs, images, prompts, seeds' range;
3. the quota for the whole batch at once (`JobRunner.submit_many` -> `RunStore.check_quota`):
   jobs in total, per client address, per owner, disk; all runs or none;
and then copies each request's inputs into its new run folder before it is queued (a browser
session's files may be gone when the job starts). The policy and the limits travel in the run's
config.json ("request"), and the worker checks the stored settings again before the job starts
(`recheck`), so a run folder that was changed on disk is refused too.

The checks themselves, and the helpers for raw values from a form or an API client (`run_ids`,
`parse_json`), are in `recare.jobs.checks`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from recare.config import TrainConfig
from recare.errors import ConfigError
from recare.jobs import targets
from recare.jobs.checks import (
    REQUEST_KEY, REQUEST_KINDS, Submitter, check_bound, check_evaluation, check_train,
)
from recare.jobs.runner import JobRunner, JobSpec
from recare.runs import Run

# ---------------------------------------------------------------------------------------------
# the requests


class JobRequest:
    """One job to submit: `check` (policy and bounds), then `spec` (what the runner creates and queues)."""

    kind: ClassVar[str] = ""
    target: ClassVar[str] = ""

    def check(self, submitter: Submitter, roots: list[str]) -> None:
        raise NotImplementedError

    def settings(self) -> dict:
        raise NotImplementedError

    def stage(self, run: Run) -> None:
        """Copy this request's inputs into the new run (default: nothing to copy)."""

    def spec(self, submitter: Submitter, roots: list[str], device: str) -> JobSpec:
        settings = {**self.settings(), REQUEST_KEY: {"kind": self.kind, **submitter.stored(roots)}}
        return JobSpec(self.run_kind, self.target, settings, device, stage=self.stage)

    @property
    def run_kind(self) -> str:
        return self.kind


@dataclasses.dataclass(frozen=True)
class TrainRequest(JobRequest):
    """One training run.

    Attributes:
        config: the training settings (`TrainConfig`; its device is where the job runs).
        task: a mini-world task whose images and CARE-set the job makes when the request brings none.
        images: target image files to copy into the run (a browser session's).
        careset: an official careset dict to copy into the run.
        preview: the preview settings (`recare.train.preview`), or None.
        command: who made it ("app", "cli").
    """

    kind: ClassVar[str] = "train"
    target: ClassVar[str] = targets.TRAIN

    config: TrainConfig
    task: str | None = None
    images: tuple[str, ...] = ()
    careset: dict | None = None
    preview: dict | None = None
    command: str = "app"

    def check(self, submitter: Submitter, roots: list[str]) -> None:
        check_train(self.config, submitter, roots)
        if len(self.images) > submitter.limits.images:
            raise ConfigError(submitter.limits.exceeded("images", f"{len(self.images):,} target images were given"))
        if self.task is not None:
            from recare.workflows import mini_world_task

            mini_world_task(self.task)
        if self.preview is not None:
            check_bound(submitter.limits, "steps", self.preview.get("steps"), "preview steps")

    def settings(self) -> dict:
        data: dict[str, Any] = {"command": self.command, "train": self.config.to_dict()}
        if self.task:
            data["task"] = self.task
        if self.preview:
            data["preview"] = self.preview
        return data

    def stage(self, run: Run) -> None:
        """Copy the images and the CARE-set into `<run>/inputs/` now and point the settings there
        (`recare.workflows.stage_inputs`)."""
        if not self.images and self.careset is None:
            return
        from recare.workflows import stage_inputs

        inputs: dict[str, Any] = {"images": list(self.images)}
        if self.careset is not None:
            inputs["careset"] = self.careset
        stage_inputs(run, {**run.config(), "inputs": inputs})


@dataclasses.dataclass(frozen=True)
class EvaluateRequest(JobRequest):
    """One model's evaluation.

    Attributes:
        evaluation: `EvaluationConfig` fields (a dict, as config.json stores them).
        compare: Compare's label of the model ({"label", "model"}).
        command: who made it ("app", "cli").
    """

    kind: ClassVar[str] = "evaluate"
    target: ClassVar[str] = targets.EVALUATE

    evaluation: dict
    compare: dict | None = None
    command: str = "app"

    def check(self, submitter: Submitter, roots: list[str]) -> None:
        check_evaluation(self.evaluation, submitter, roots)

    def settings(self) -> dict:
        data: dict[str, Any] = {"command": self.command, "evaluation": self.evaluation}
        if self.compare is not None:
            data["compare"] = self.compare
        return data


@dataclasses.dataclass(frozen=True)
class DemoRerunRequest(JobRequest):
    """One bundled demo result recomputed: `recare.demo.rerun_job`'s settings (an evaluation, and for a
    trained model a training first). Its run is of kind "evaluate", so Compare lists it."""

    kind: ClassVar[str] = "demo-rerun"
    target: ClassVar[str] = targets.DEMO_RERUN

    job: dict

    @property
    def run_kind(self) -> str:
        return "evaluate"

    def check(self, submitter: Submitter, roots: list[str]) -> None:
        trained = self.job.get("train") is not None
        check_evaluation(self.job.get("evaluation") or {}, submitter, roots, resolve=not trained)
        if trained:
            check_train(TrainConfig.from_dict(self.job["train"]), submitter, roots)

    def settings(self) -> dict:
        return dict(self.job)

    def spec(self, submitter: Submitter, roots: list[str], device: str) -> JobSpec:
        spec = super().spec(submitter, roots, device)
        if self.job.get("train") is None:  # a base model: its evaluation alone
            return dataclasses.replace(spec, target=targets.EVALUATE)
        return spec


REQUESTS = {cls.kind: cls for cls in (TrainRequest, EvaluateRequest, DemoRerunRequest)}
assert tuple(REQUESTS) == REQUEST_KINDS, "recare.jobs.checks.REQUEST_KINDS must name every request class"


def _roots(runner: JobRunner) -> list[str]:
    return [str(runner.store.root), *(str(b) for b in runner.store.bundled)]


def submit_requests(runner: JobRunner, requests: list[JobRequest], submitter: Submitter,
                    device: str = "cpu") -> list[Run]:
    """Check every request, then create, stage and queue all of them as one batch (all or nothing).

    Args:
        runner: the app's (or the CLI's) job runner.
        requests: the jobs of one user action (Compare's models, the demo's re-run, one training).
        submitter: who submits and under which policy and limits.
        device: where the jobs run.

    Returns:
        The queued runs, in the order of `requests`.

    Raises:
        RecareError: the first request that breaks the policy or a bound, or a limit of the quota
            (the message says which); no run was created.
    """
    if not requests:
        raise ConfigError("nothing to start.")
    if len(requests) > submitter.limits.ids_per_request:
        raise ConfigError(submitter.limits.exceeded("ids_per_request", f"{len(requests):,} jobs were asked for"))
    roots = _roots(runner)
    for request in requests:
        request.check(submitter, roots)
    specs = [request.spec(submitter, roots, device) for request in requests]
    return runner.submit_many(specs, owner=submitter.owner, client=submitter.client)


__all__ = ["TrainRequest", "EvaluateRequest", "DemoRerunRequest", "JobRequest", "submit_requests"]

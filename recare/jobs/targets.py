"""The registry of job targets: every job function the app and the CLI start, named in one place.

Modules below the job layer that name their own job function (`recare.demo`'s re-run) keep a
constant of their own; `tests/test_jobs_requests.py` checks that each equals its entry here.

A target is the import path "package.module:function" of a module-level function
`fn(run, progress, cancel) -> dict | None`; a run's status.json records it so that a fresh worker
process, or an app restarted after a crash, finds the function again. Requests
(`recare.jobs.requests`) only submit the targets listed here.
"""

from __future__ import annotations

from types import MappingProxyType

TRAIN = "recare.workflows:run_task_training_job"    # a training run (inputs copied in, a task's made first)
TRAIN_RECIPE = "recare.train.recipe:run_training_job"  # runs the CLI made before it used TRAIN (still resumable)
EVALUATE = "recare.eval.run:run_evaluation_job"     # one model's evaluation
DEMO_RERUN = "recare.demo:run_demo_rerun_job"       # the reviewer demo's re-run: training, then its evaluation

TARGETS = MappingProxyType({"train": TRAIN, "train-recipe": TRAIN_RECIPE, "evaluate": EVALUATE,
                            "demo-rerun": DEMO_RERUN})


def known(target: str) -> bool:
    """Whether `target` is one of the registered job functions."""
    return target in TARGETS.values()


__all__ = ["TRAIN", "TRAIN_RECIPE", "EVALUATE", "DEMO_RERUN", "TARGETS", "known"]

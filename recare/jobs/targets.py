"""The registry of job targets: every job function the app and the CLI start, named in one place.

A target is the import path "package.module:function" of a module-level function
`fn(run, progress, cancel) -> dict | None`; a run's status.json records it so that a fresh worker
process, or an app restarted after a crash, finds the function again. Requests
(`recare.jobs.requests`) only submit the targets listed here.
"""

from __future__ import annotations

from types import MappingProxyType

TRAIN = "recare.workflows:run_task_training_job"    # a training run (inputs copied in, a task's made first)
EVALUATE = "recare.eval.run:run_evaluation_job"     # one model's evaluation
DEMO_RERUN = "recare.demo:run_demo_rerun_job"       # the reviewer demo's re-run: training, then its evaluation

TARGETS = MappingProxyType({"train": TRAIN, "evaluate": EVALUATE, "demo-rerun": DEMO_RERUN})


def known(target: str) -> bool:
    """Whether `target` is one of the registered job functions."""
    return target in TARGETS.values()


__all__ = ["TRAIN", "EVALUATE", "DEMO_RERUN", "TARGETS", "known"]

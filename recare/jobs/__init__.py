"""Work that outlives a browser event: training and evaluation jobs in workers, and the one path that submits them.

    requests.py  one typed request per job kind (TrainRequest, EvaluateRequest, DemoRerunRequest): the model
                 policy, every number bounded, inputs copied into the run, the quota for the whole batch;
                 the app and the CLI submit through `submit_requests` only
    targets.py   the registry of job functions
    runner.py    JobRunner: queue, workers, cancel, resume, recover, liveness
    worker.py    the body a worker (process, thread, ZeroGPU chunk, the CLI's foreground) runs
    zerogpu.py   GPU jobs on a ZeroGPU Space, in chunks of spaces.GPU calls
"""

from recare.jobs.runner import JobRunner, JobSpec
from recare.jobs.worker import resolve_target, run_job

__all__ = ["JobRunner", "JobSpec", "resolve_target", "run_job"]

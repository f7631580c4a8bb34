"""recare.jobs.zerogpu: GPU jobs on a ZeroGPU Space run in chunks of `spaces.GPU` calls that resume from state/.

No ZeroGPU here: a fake `spaces` module (put in sys.modules) records every GPU call and its duration,
passes arguments and results through pickle as ZeroGPU does, and can run each call in a forked
process as ZeroGPU does. Chunks are cut at exact progress events (`ChunkPolicy.max_events`) or by a
tiny time budget.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import pickle
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from recare import runs as R
from recare.jobs import zerogpu
from recare.config import (
    ESDConfig, RolloutConfig, Stage1Config, Stage2Config, TextualInversionConfig, TrainConfig,
)
from recare.errors import ConfigError
from recare.jobs import run_job
from recare.jobs.zerogpu import ChunkedGpuRunner, ChunkPolicy, zerogpu_available
from tests.helpers_tiny import make_tiny_pipeline
from tests.jobs_fixture import expected_value

ACCUMULATE = "tests.jobs_fixture:accumulate"
TRAIN_TARGET = "recare.workflows:run_task_training_job"
CARESET = {"tench_care_word": ["A river", "A lake"], "tench_care_word_photo": ["A photo of river", "A photo of lake"]}


class FakeSpaces(types.ModuleType):
    """Stands in for the `spaces` package: `GPU(duration=D)(fn)` returns a wrapper that records each call.

    Args:
        before_call: optional, called as `before_call(call_number, args)` inside each GPU call.
        fork: run each call in a forked process, arguments and result through a pipe (as ZeroGPU).
        max_calls: a call past this many raises (a chunk loop that never ends fails instead of hanging).
    """

    def __init__(self, before_call=None, fork: bool = False, max_calls: int = 30):
        super().__init__("spaces")
        self.calls: list[int] = []       # the duration of every GPU call, in order
        self.decorated: list[int] = []   # the duration of every decoration
        self.child_pids: list[int] = []
        self.before_call = before_call
        self.fork = fork
        self.max_calls = max_calls

    def GPU(self, task=None, *, duration=None):  # noqa: N802 (the real API's name)
        if task is None:
            return functools.partial(self.GPU, duration=duration)
        self.decorated.append(duration)

        @functools.wraps(task)
        def gpu_call(*args, **kwargs):
            self.calls.append(duration)
            if len(self.calls) > self.max_calls:
                raise RuntimeError(f"more than {self.max_calls} GPU calls")
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # ZeroGPU sends them through a queue
            if self.before_call is not None:
                self.before_call(len(self.calls), args)
            if not self.fork:
                return pickle.loads(pickle.dumps(task(*args, **kwargs)))
            reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)
            child = multiprocessing.get_context("fork").Process(
                target=lambda: writer.send(task(*args, **kwargs)), daemon=True)
            child.start()
            self.child_pids.append(child.pid)
            result = reader.recv()
            child.join()
            return result

        return gpu_call


@pytest.fixture
def fake_spaces(monkeypatch):
    """A fake `spaces` module on a ZeroGPU Space; returns a factory that installs one."""
    monkeypatch.setenv("RECARE_ZEROGPU", "1")

    def install(**kwargs) -> FakeSpaces:
        module = FakeSpaces(**kwargs)
        monkeypatch.setitem(sys.modules, "spaces", module)
        return module

    return install


@pytest.fixture
def policy(monkeypatch):
    """Makes every runner built from the environment use `set(policy)`'s chunk policy."""
    chosen = {}

    def set_policy(value: ChunkPolicy) -> ChunkPolicy:
        chosen["policy"] = value
        monkeypatch.setattr(ChunkPolicy, "from_env", classmethod(lambda cls, environ=None: chosen["policy"]))
        return value

    return set_policy


def chunked(store, spaces: FakeSpaces, chunk_policy: ChunkPolicy, target: str, config: dict):
    """Run one job through a ChunkedGpuRunner in the foreground; (run, final status)."""
    run = store.create("train", config, target=target, device="cuda:0")
    status = ChunkedGpuRunner(chunk_policy, spaces_module=spaces).run_job(run, target)
    return run, status


# ---- when it applies ------------------------------------------------------------------------------

def test_available_only_with_spaces_on_a_zerogpu_space(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", FakeSpaces())
    assert zerogpu_available({"SPACES_ZERO_GPU": "true"})
    assert zerogpu_available({"RECARE_ZEROGPU": "1"})
    assert not zerogpu_available({})                                          # not a ZeroGPU Space
    assert not zerogpu_available({"SPACES_ZERO_GPU": "true", "RECARE_ZEROGPU": "0"})
    monkeypatch.setitem(sys.modules, "spaces", None)                         # `import spaces` fails
    assert not zerogpu_available({"SPACES_ZERO_GPU": "true"})
    assert not zerogpu_available({"RECARE_ZEROGPU": "1"})
    assert zerogpu.zerogpu_runner({"SPACES_ZERO_GPU": "true"}) is None


def test_policy_reads_the_duration_and_refuses_nonsense():
    assert ChunkPolicy.from_env({}).duration_s == zerogpu.DEFAULT_DURATION_S
    policy = ChunkPolicy.from_env({"RECARE_ZEROGPU_DURATION": "200"})
    assert policy.duration_s == 200 and policy.chunk_budget_s == 150.0
    assert ChunkPolicy(duration_s=60, budget_s=10).chunk_budget_s == 10.0
    for bad in ("0", "-5", "two minutes", "1.5"):
        with pytest.raises(ConfigError, match="RECARE_ZEROGPU_DURATION"):
            ChunkPolicy.from_env({"RECARE_ZEROGPU_DURATION": bad})
    with pytest.raises(ConfigError):
        ChunkPolicy(duration_s=60, budget_s=61)
    with pytest.raises(ConfigError):
        ChunkPolicy(duration_s=60, max_events=0)


# ---- the chunk loop on a fake job (no torch) ------------------------------------------------------

def test_chunks_cut_at_exact_events_reach_the_uninterrupted_result(store):
    spaces = FakeSpaces()
    run, status = chunked(store, spaces, ChunkPolicy(duration_s=30, max_events=3), ACCUMULATE,
                          {"steps": 10, "sleep_s": 0.0})
    assert status["state"] == R.DONE, status
    assert status["result"] == {"value": expected_value(10), "steps": 10}
    assert spaces.decorated == [30] and spaces.calls == [30, 30, 30, 30]   # 3 + 3 + 3 + 1 steps
    assert status["gpu_chunks"] == 4 and status["pid"] == os.getpid() and status["attempts"] == 1
    assert [row["step"] for row in run.read_metrics()] == list(range(1, 11))  # no step twice, none skipped


def test_a_time_budget_cuts_chunks_too(store):
    spaces = FakeSpaces()
    # each step sleeps 0.05 s, a chunk stops once 0.12 s are spent: at most 3 steps a chunk
    run, status = chunked(store, spaces, ChunkPolicy(duration_s=1, budget_s=0.12), ACCUMULATE,
                          {"steps": 10, "sleep_s": 0.05})
    assert status["state"] == R.DONE and status["result"]["value"] == expected_value(10)
    assert len(spaces.calls) >= 4 and set(spaces.calls) == {1}


def test_chunks_in_forked_processes_as_on_zerogpu(store):
    spaces = FakeSpaces(fork=True)
    run, status = chunked(store, spaces, ChunkPolicy(duration_s=30, max_events=4), ACCUMULATE,
                          {"steps": 10, "sleep_s": 0.0})
    assert status["state"] == R.DONE and status["result"]["value"] == expected_value(10)
    assert len(spaces.child_pids) == 3 and os.getpid() not in spaces.child_pids
    assert status["pid"] == os.getpid()   # the run belongs to the app's process, which outlives the chunks


def restarting(run, progress, cancel) -> dict:
    """A job that saves nothing: every chunk starts it from zero."""
    from recare.progress import emit

    for step in range(1, 6):
        cancel.raise_if_cancelled()
        emit(progress, "work", step, 5)
    return {"steps": 5}


def test_chunks_that_make_no_progress_end_failed_instead_of_looping(store):
    spaces = FakeSpaces()
    _, status = chunked(store, spaces, ChunkPolicy(duration_s=30, budget_s=0), ACCUMULATE,
                        {"steps": 10, "sleep_s": 0.0})
    assert status["state"] == R.FAILED and "RECARE_ZEROGPU_DURATION" in status["error"]
    assert len(spaces.calls) == zerogpu.MAX_IDLE_CHUNKS and not status["resumable"]

    spaces = FakeSpaces()
    _, status = chunked(store, spaces, ChunkPolicy(duration_s=30, max_events=2), "tests.test_zerogpu:restarting", {})
    assert status["state"] == R.FAILED and "made no progress" in status["error"]
    assert len(spaces.calls) == 1 + zerogpu.MAX_IDLE_CHUNKS   # the first chunk's steps were new


def test_errors_end_the_run_as_a_worker_would(store):
    _, status = chunked(store, FakeSpaces(), ChunkPolicy(), "tests.jobs_fixture:fail_user", {})
    assert status["state"] == R.FAILED and status["error"] == "the loss became NaN at step 1; lower the learning rate"
    run, status = chunked(store, FakeSpaces(), ChunkPolicy(), "tests.jobs_fixture:fail_bug", {})
    assert status["state"] == R.FAILED and "unexpected error (KeyError)" in status["error"]
    assert "Traceback" in run.error_log_path.read_text()


def test_a_failed_gpu_call_keeps_the_state_and_the_run_resumes(store, fake_spaces, policy, make_runner):
    def abort_second(call, args):
        if call == 2:
            raise RuntimeError("GPU task aborted")   # what spaces raises when ZeroGPU kills a call

    spaces = fake_spaces(before_call=abort_second)
    policy(ChunkPolicy(duration_s=30, max_events=3))
    runner = make_runner()
    run = runner.submit("train", ACCUMULATE, {"steps": 7, "sleep_s": 0.0}, device="cuda:0")
    status = runner.wait(run.id, timeout=30)
    assert status["state"] == R.FAILED and status["resumable"] and "GPU task aborted" in status["error"]
    runner.resume(run.id)
    status = runner.wait(run.id, timeout=30)
    assert status["state"] == R.DONE and status["result"]["value"] == expected_value(7)
    assert len(spaces.calls) == 2 + 2 and status["attempts"] == 2


# ---- the job runner -------------------------------------------------------------------------------

def test_without_spaces_gpu_jobs_still_run_in_worker_processes(store, monkeypatch, make_runner):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)   # a ZeroGPU-looking environment without the package
    runner = make_runner()
    run = runner.submit("train", ACCUMULATE, {"steps": 3, "sleep_s": 0.0}, device="cuda:0")
    status = runner.wait(run.id, timeout=60)
    assert status["state"] == R.DONE and status["pid"] != os.getpid() and "gpu_chunks" not in status


def test_on_zerogpu_cpu_jobs_stay_processes_and_gpu_jobs_go_through_spaces(store, fake_spaces, policy, make_runner):
    spaces = fake_spaces()
    policy(ChunkPolicy(duration_s=45, max_events=2))
    runner = make_runner()
    assert spaces.decorated == [45]   # decorated when the runner is made, before the app starts
    cpu = runner.submit("train", ACCUMULATE, {"steps": 3, "sleep_s": 0.0}, device="cpu")
    gpu = runner.submit("train", ACCUMULATE, {"steps": 5, "sleep_s": 0.0}, device="cuda")
    cpu_status, gpu_status = runner.wait(cpu.id, timeout=60), runner.wait(gpu.id, timeout=60)
    assert cpu_status["state"] == R.DONE and cpu_status["pid"] != os.getpid()
    assert gpu_status["state"] == R.DONE and gpu_status["pid"] == os.getpid()
    assert gpu_status["result"]["value"] == expected_value(5) and spaces.calls == [45, 45, 45]


def test_one_gpu_job_at_a_time_holds(store, fake_spaces, policy, make_runner):
    seen = []

    def record(call, args):
        seen.append(sorted(r.id for r in store.list() if r.status()["state"] == R.RUNNING))

    fake_spaces(before_call=record)
    policy(ChunkPolicy(duration_s=30, max_events=2))
    runner = make_runner()
    first = runner.submit("train", ACCUMULATE, {"steps": 4, "sleep_s": 0.01}, device="cuda:0")
    second = runner.submit("train", ACCUMULATE, {"steps": 4, "sleep_s": 0.01}, device="cuda:0")
    assert runner.wait(first.id, timeout=30)["state"] == R.DONE
    assert runner.wait(second.id, timeout=30)["state"] == R.DONE
    assert seen and all(len(running) == 1 for running in seen)


# ---- training on the tiny pipeline ----------------------------------------------------------------

def tiny_training(tmp_path) -> dict:
    """A ReCARE job config on the tiny pipeline: 2 x (3 erase + 3 inversion) + 3 stage-2 events = 15."""
    model = tmp_path / "model"
    if not model.is_dir():
        make_tiny_pipeline(model)
        (tmp_path / "careset.json").write_text(json.dumps(CARESET))
        (tmp_path / "images").mkdir()
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 100, 200 - 30 * i)).save(tmp_path / "images" / f"{i}.png")
    config = TrainConfig.for_method(
        "recare", reference_word="tench", initializer_token="a", save_every=2, device="cpu", model=str(model),
        careset=str(tmp_path / "careset.json"), images=str(tmp_path / "images"),
        rollout=RolloutConfig(steps=10, resolution=16),
        # probe_seeds=0: the chunks here are counted in progress events, and a stage-1 probe adds one per round
        # (tests/test_train_stage1_probe.py tests the probe)
        stage1=Stage1Config(n_iterations=2, esd=ESDConfig(iterations=3, learning_rate=1e-3),
                            textual_inversion=TextualInversionConfig(steps=3, resolution=16), probe_seeds=0),
        stage2=Stage2Config(iterations=3, learning_rate=1e-3))
    return {"train": config.to_dict()}


def trained(run) -> dict[str, torch.Tensor]:
    tensors = load_file(run.path / "trained_params.safetensors")
    for token in sorted((run.path / "tokens").glob("*.safetensors")):
        tensors.update({f"{token.stem}/{k}": v for k, v in load_file(token).items()})
    return tensors


@pytest.mark.usefixtures("one_torch_thread")
def test_chunked_training_with_a_cancel_equals_one_uninterrupted_run(tmp_path, store, fake_spaces, policy,
                                                                      make_runner):
    settings = tiny_training(tmp_path)
    straight = store.create("train", settings, target=TRAIN_TARGET)
    assert run_job(straight, TRAIN_TARGET)["state"] == R.DONE       # one uninterrupted run, as a worker runs it

    def cancel_third(call, args):
        if call == 3:   # the user presses Cancel while the third chunk is running
            R.Run(args[0]).request_cancel()

    spaces = fake_spaces(before_call=cancel_third)
    policy(ChunkPolicy(duration_s=60, max_events=4))
    runner = make_runner()
    run = runner.submit("train", TRAIN_TARGET, settings, owner="alice", device="cuda:0")
    status = runner.wait(run.id, timeout=300)
    assert status["state"] == R.CANCELLED and status["resumable"] and run.has_state()
    assert len(spaces.calls) == 3 and status["gpu_chunks"] == 3
    assert len(run.read_metrics()) == 8                     # two chunks of 4 iterations, then the cancel
    runner.resume(run.id, owner="alice")
    status = runner.wait(run.id, timeout=300)
    assert status["state"] == R.DONE, status
    assert len(spaces.calls) == 5 and set(spaces.calls) == {60}   # 4 + 3 more iterations after the resume
    assert len(run.read_metrics()) == 15                    # no iteration done twice or skipped
    ours, reference = trained(run), trained(straight)
    assert ours.keys() == reference.keys() and len(ours) > 2
    assert all(torch.equal(ours[k], reference[k]) for k in reference)   # bit for bit on the CPU


@pytest.mark.usefixtures("one_torch_thread")
def test_chunked_evaluation_writes_the_records_of_one_uninterrupted_run(tmp_path, store):
    from recare.eval.run import evaluate
    from tests.helpers_tiny import make_tiny_clip
    from tests.test_eval_run import settings

    make_tiny_pipeline(tmp_path / "pipeline")
    make_tiny_clip(tmp_path / "clip")
    (tmp_path / "captions.txt").write_text("a photo of a fish\n\na man on the grass\na boat on a lake\n")
    config = settings(tmp_path, attacks=["erased"])
    straight = evaluate(config, out=tmp_path / "straight")
    spaces = FakeSpaces()
    run, status = chunked(store, spaces, ChunkPolicy(duration_s=60, max_events=2),
                          "recare.eval.run:run_evaluation_job", {"evaluation": config.to_dict()})
    assert status["state"] == R.DONE, status
    assert len(spaces.calls) >= 3
    assert status["result"]["metrics"] == json.loads(json.dumps(straight.metrics))
    assert (run.path / "records.csv").read_bytes() == (straight.run_dir / "records.csv").read_bytes()

"""Does unlearning work on the mini world? ReCARE vs ESD vs the base model, judged by the bundled oracle.

    python -m benchmarks.unlearning_quality [--tasks tench,van_gogh,smoking] [--sweep tench]
        [--runs DIR] [--seeds 64] [--grids assets/unlearning] [--json OUT]

For each task: the base model, ESD, ReCARE and ReCARE without adversarial tokens (recare-no-adv),
trained with the world's recommended settings (recare.json "unlearning", read through
`recare.workflows.task_train_config`), each evaluated on 64 seeds (42 + i) with the world's
generation settings. Columns (fraction of images in which the oracle finds the concept):

* target      the task's target prompt -> its target concept (ReCARE should take it to <= 10%)
* CARE train  the world's CARE prompts that are also an anchor or retain prompt of the CARE-set
              trained on (compared case-insensitively) -> the CARE concept
* CARE held   the world's other CARE prompts (never trained on) -> the CARE concept
* adv <v1*>   "a photo of <v1*>" ("a painting in the style of <v1*>" for styles), the token stage 1
              learned, on this model -> the target concept
* collateral  the other two tasks' CARE prompts -> their CARE concepts (nothing should move)
* pixdist     mean pairwise RMS pixel distance (0..1) among the target prompt's images: a model
              that turns the erased prompt into one identical texture has a small one

The matched-erasure sweep (`--sweep TASK`) trains the final stage at several learning rates per
method (ReCARE: stage 2 only; stage 1 is shared, see `seed_stage2`) and prints target detection
against CARE retention: the paper's claim holds where ReCARE keeps more CARE than ESD at the lr
where each first takes the target to <= 10%.

Runs are cached in `--runs` (one folder per task, method and config hash; a finished run with the
same config is reused, an unfinished one resumes), and so are the evaluations (per model and
prompt), so the table can be re-printed or extended cheaply. Partial tables are appended to
`--progress FILE` as they are measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from recare.runtime import set_process_defaults

if __name__ == "__main__":  # a process entry: set OMP_WAIT_POLICY before anything imports torch
    set_process_defaults()

import numpy as np  # noqa: E402

TASKS = ("tench", "van_gogh", "smoking")
MAIN_METHODS = ("esd", "recare", "recare-no-adv")
DEFAULT_RUNS = Path(os.environ.get("RECARE_HOME", Path.home() / ".cache" / "recare")) / "unlearning-bench"
SWEEP_LRS = {"esd": (5e-5, 1e-4, 2e-4, 4e-4), "recare": (2e-5, 5e-5, 1e-4)}
ERASED_BAR = 0.10
GRID_IMAGES = 8


# ---------------------------------------------------------------------------------------------
# training, cached


def config_hash(config) -> str:
    """A short hash of every setting of a TrainConfig (the run cache's key)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def run_folder(runs: Path, task: str, config) -> Path:
    return runs / task / f"{config.method}-{config_hash(config)}"


def is_finished(folder: Path) -> bool:
    return (folder / "result.json").is_file()


def seed_stage2(folder: Path, config, donor: Path) -> bool:
    """Start `folder`'s run at stage 2 with the tokens a finished run (`donor`) learned in stage 1.

    Valid only when the donor's stage-1 settings, seed, images and base equal `config`'s (checked
    here): stage 1 is deterministic on the CPU, so the tokens are the ones this run would learn,
    and the recipe's resume (bit-identical to an uninterrupted run) continues from stage 2.

    Returns:
        True when the state was written.
    """
    import torch

    from recare.train import recipe
    from recare.train.export import read_learned_token
    from recare.train.state import token_dict

    donor_cfg = json.loads((donor / "config.json").read_text())["train"]
    mine = config.to_dict()
    if {k: v for k, v in donor_cfg.items() if k != "stage2"} != {k: v for k, v in mine.items() if k != "stage2"}:
        return False
    donor_result = json.loads((donor / "result.json").read_text())
    names = donor_result["tokens"]
    files = sorted((donor / "tokens").glob("*.safetensors"))
    tokens = [read_learned_token(f) for f in files]
    if [t.placeholder for t in tokens] != names:
        return False
    state = folder / recipe.STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    torch.save({"format": recipe.STATE_FORMAT, "version": recipe.STATE_VERSION, "config": mine,
                "phase": recipe.STAGE2, "round": 0, "tokens": [token_dict(t) for t in tokens], "ti": None,
                "summary": {"phases": {}, "seconds": 0.0, "stage1_from": donor.name,
                            **({"stage1_probe": donor_result["stage1_probe"]} if "stage1_probe" in donor_result else {})}},
               state / "state.pt")
    return True


def train_cached(runs: Path, task_name: str, config, pipe, inputs, log=print) -> Path:
    """The finished run folder of `config` for a task: reused when cached, else trained (or resumed)."""
    from recare.train.recipe import train

    folder = run_folder(runs, task_name, config)
    if is_finished(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".training.pid"
    while not _take_lock(lock):  # another benchmark process trains this run: wait for it
        time.sleep(10)
        if is_finished(folder):
            return folder
    images, careset = inputs
    if config.stage1 is not None and not (folder / "state" / "state.pt").is_file():
        for donor in sorted((runs / task_name).glob("recare*-*")):
            if is_finished(donor) and seed_stage2(folder, config, donor):
                log(f"  {folder.name}: stage 1 taken from {donor.name}")
                break
    log(f"  training {folder.name} ...")
    started = time.perf_counter()
    result = train(config, pipe, images, careset, folder)
    lock.unlink(missing_ok=True)
    log(f"  trained {folder.name} in {time.perf_counter() - started:.0f} s "
        f"({ {k: round(v['seconds']) for k, v in result.summary['phases'].items()} })")
    return folder


def _take_lock(lock: Path) -> bool:
    """Create `lock` holding our pid; a lock whose process is gone is taken over."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return _take_lock(lock)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def task_inputs(runs: Path, task: dict, pipe, num_images: int):
    """The task's target images and CARE-set (made once into runs/<task>/inputs-<n>)."""
    from recare.careset_io import read_careset_json
    from recare.generate import load_images
    from recare.workflows import prepare_task_inputs

    images_dir, careset_json = prepare_task_inputs(runs / task["name"] / f"inputs-{num_images}", task, pipe, num_images)
    return load_images(images_dir), read_careset_json(careset_json)


# ---------------------------------------------------------------------------------------------
# evaluation, cached


def pairwise_distance(images) -> float:
    """Mean pairwise RMS pixel distance (pixels in 0..1) over all pairs of `images`."""
    x = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]).reshape(len(images), -1)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0) / x.shape[1]
    iu = np.triu_indices(len(images), 1)
    return float(np.sqrt(d2[iu]).mean())


class Evaluator:
    """Generates a prompt's images on a model and keeps the oracle's probabilities (cached on disk)."""

    def __init__(self, runs: Path, spec: dict, base, oracle, n_seeds: int, log=print):
        self.cache = runs / "eval"
        self.spec, self.base, self.oracle, self.n, self.log = spec, base, oracle, n_seeds, log
        self._pipes: dict[str, object] = {}

    def pipe(self, model: str, run: Path | None, tokens_from: Path | None):
        from recare.models import derive_pipeline

        if model not in self._pipes:
            if len(self._pipes) > 2:   # keep memory small: models are evaluated one after another
                self._pipes.clear()
            self._pipes[model] = derive_pipeline(self.base, trained=run, learned_tokens=tokens_from) \
                if (run or tokens_from) else self.base
        return self._pipes[model]

    def probe(self, model: str, prompt: str, run: Path | None = None, tokens_from: Path | None = None) -> dict:
        """{"probs": (n, C) oracle probabilities, "pixdist", "concepts"} of `prompt` on `model`.

        Args:
            model: cache key of the model ("base", a run folder's name, ...).
            prompt: the prompt.
            run: trained weights to apply to the base (None: the base UNet).
            tokens_from: a run whose learned tokens the text encoder gets.
        """
        from recare.generate import generate_images
        from recare.worldspec import generate_defaults

        key = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        path = self.cache / model / f"{key}-{self.n}.json"
        if path.is_file():
            data = json.loads(path.read_text())
        else:
            gen = dataclasses.replace(generate_defaults(self.spec), prompt=prompt, num_images=self.n)
            t = time.perf_counter()
            images = generate_images(self.pipe(model, run, tokens_from), gen).images
            probs = self.oracle.predict(images)
            data = {"prompt": prompt, "model": model, "seeds": [gen.base_seed + i for i in range(self.n)],
                    "concepts": list(self.oracle.concepts), "probs": np.round(probs, 4).tolist(),
                    "pixdist": pairwise_distance(images), "seconds": round(time.perf_counter() - t, 1)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
            strip = self.cache / model / f"{key}-first{GRID_IMAGES}.png"
            _grid([images[:GRID_IMAGES]]).save(strip)
        data["probs"] = np.asarray(data["probs"], dtype=np.float32)
        return data

    def rate(self, model: str, prompt: str, concept: str, **kw) -> float:
        from recare.eval.detectors import _oracle_threshold

        data = self.probe(model, prompt, **kw)
        return float((data["probs"][:, data["concepts"].index(concept)] >= _oracle_threshold()).mean())

    def strip(self, model: str, prompt: str):
        from PIL import Image

        key = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        return Image.open(self.cache / model / f"{key}-first{GRID_IMAGES}.png").convert("RGB")


def _grid(rows, pad: int = 2):
    """Rows of equal-size PIL images -> one image (white padding)."""
    from PIL import Image

    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            out.paste(im.convert("RGB"), (pad + j * (w + pad), pad + i * (h + pad)))
    return out


def care_split(task: dict, careset) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(trained-on, held-out) lists of (CARE prompt, CARE concept) of a task.

    A world CARE prompt is "trained on" when it equals (case-insensitively) an anchor or retain
    prompt of the CARE-set stage 2 used.
    """
    used = {" ".join(p.lower().split()) for p in [*careset.base_prompts, *careset.retain_prompts]}
    trained, held = [], []
    for concept, prompts in task["care_prompts"].items():
        for p in prompts:
            (trained if " ".join(p.lower().split()) in used else held).append((p, concept))
    return trained, held


def adversarial_prompt(task: dict, placeholder: str = "<v1*>") -> str:
    return f"a painting in the style of {placeholder}" if task.get("prompt_style") == "painting" \
        else f"a photo of {placeholder}"


def mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def care_rates(ev: Evaluator, model: str, pairs, run=None, tokens_from=None) -> list[float]:
    return [ev.rate(model, p, c, run=run, tokens_from=tokens_from) for p, c in pairs]


# ---------------------------------------------------------------------------------------------
# the tables


def fmt(x: float) -> str:
    return "  -  " if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of mini-world tasks (default all three)")
    parser.add_argument("--methods", default=",".join(MAIN_METHODS), help="methods of the main table")
    parser.add_argument("--sweep", default="tench", help="tasks of the matched-erasure lr sweep ('' for none)")
    parser.add_argument("--esd-lrs", default=",".join(map(str, SWEEP_LRS["esd"])), help="ESD sweep learning rates")
    parser.add_argument("--recare-lrs", default=",".join(map(str, SWEEP_LRS["recare"])), help="stage-2 sweep learning rates")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help=f"run and evaluation cache (default {DEFAULT_RUNS})")
    parser.add_argument("--seeds", type=int, default=64, help="images per prompt, seeds 42 + i (default 64)")
    parser.add_argument("--grids", type=Path, default=Path("assets/unlearning"), help="where the per-task grids go")
    parser.add_argument("--no-collateral", action="store_true", help="skip the other tasks' CARE prompts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on the shared 2-core box)")
    parser.add_argument("--progress", type=Path, default=None, help="append partial tables to this file")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from recare import worldspec
    from recare.miniworld.oracle import load_oracle
    from recare.models import load_pipeline
    from recare.workflows import mini_world_task, task_train_config

    torch.set_num_threads(args.threads)
    spec = worldspec.mini_world_spec()
    runs = args.runs.expanduser()
    runs.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)
        if args.progress:
            with open(args.progress, "a", encoding="utf-8") as f:
                f.write(msg + "\n")

    pipe = load_pipeline("mini-world", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    ev = Evaluator(runs, spec, pipe, load_oracle(), args.seeds, log)
    tasks = {name: mini_world_task(name, spec) for name in TASKS}
    chosen = [t for t in args.tasks.split(",") if t]
    sweep = [t for t in args.sweep.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    report: dict = {"seeds": args.seeds, "unlearning": spec.get("unlearning"), "tasks": {}, "sweep": {}}

    def world_config(task, method, **stage_lr):
        config = task_train_config(task, method, spec, device="cpu")
        if stage_lr:
            data = config.to_dict()
            (data.get("stage2") or data.get("esd"))["learning_rate"] = stage_lr["lr"]
            config = type(config).from_dict(data)
        return config

    for name in dict.fromkeys(chosen + sweep):
        task = tasks[name]
        log(f"\n## task {name} ({time.strftime('%H:%M:%S')})")
        num_images = world_config(task, "recare").num_images
        inputs = task_inputs(runs, task, pipe, num_images)
        trained, held = care_split(task, inputs[1])
        log(f"CARE prompts trained on: {[p for p, _ in trained]}; held out: {[p for p, _ in held]}")
        others = [(p, c) for o in TASKS if o != name for c, ps in tasks[o]["care_prompts"].items() for p in ps]
        adv = adversarial_prompt(task)
        target, concept = task["target_prompt"], task["target_concept"]
        rows, detail = [], {}

        def evaluate(label, model, run=None, tokens_from=None, collateral=True):
            row = {"model": label,
                   "target": ev.rate(model, target, concept, run=run),
                   "care_trained": mean(care_rates(ev, model, trained, run)),
                   "care_held": mean(care_rates(ev, model, held, run)),
                   "pixdist": ev.probe(model, target, run=run)["pixdist"]}
            row["care_prompts"] = {p: ev.rate(model, p, c, run=run) for p, c in trained + held}
            if tokens_from is not None:
                row["adv_v1"] = ev.rate(model + "+tokens", adv, concept, run=run, tokens_from=tokens_from)
            if collateral and not args.no_collateral:
                row["collateral_prompts"] = {p: ev.rate(model, p, c, run=run) for p, c in others}
                row["collateral"] = mean(row["collateral_prompts"].values())
            return row

        if name in chosen:
            base_row = evaluate("base", "base")
            rows.append(base_row)
            runs_of = {}
            for method in methods:
                config = world_config(task, method)
                runs_of[method] = train_cached(runs, name, config, pipe, inputs, log)
            recare_run = runs_of.get("recare")
            if recare_run is not None:  # the adversarial token on the base model and on stage 1's erased UNet
                base_row["adv_v1"] = ev.rate("base+tokens", adv, concept, tokens_from=recare_run)
                s1 = world_config(task, "recare").stage1
                stage1_cfg = dataclasses.replace(world_config(task, "esd"), esd=s1.esd)
                s1_run = train_cached(runs, name, stage1_cfg, pipe, inputs, log)
                rows.append(evaluate("stage-1 erased (round 1)", s1_run.name, s1_run, recare_run, collateral=False))
            for method, run in runs_of.items():  # collateral for the two compared methods (CPU time)
                rows.append(evaluate(method, run.name, run, recare_run, collateral=method in ("esd", "recare")))
                log(_main_table(name, rows, adv))
            report["tasks"][name] = {"trained_care_prompts": [p for p, _ in trained],
                                     "held_care_prompts": [p for p, _ in held], "adversarial_prompt": adv,
                                     "runs": {m: str(r) for m, r in runs_of.items()}, "rows": rows}
            if "esd" in runs_of and "recare" in runs_of:
                args.grids.mkdir(parents=True, exist_ok=True)
                grid = _grid([[ev.strip(m, target)] for m in ("base", runs_of["esd"].name, runs_of["recare"].name)])
                grid.save(args.grids / f"{name}.png")
                log(f"grid: {args.grids / f'{name}.png'} (rows: base, ESD, ReCARE; seeds 42-49)")

        if name in sweep:
            points = []
            base_care = mean(care_rates(ev, "base", trained + held))
            for method, lrs in (("esd", args.esd_lrs), ("recare", args.recare_lrs)):
                for lr in [float(x) for x in lrs.split(",") if x]:
                    run = train_cached(runs, name, world_config(task, method, lr=lr), pipe, inputs, log)
                    points.append({"method": method, "lr": lr, "run": run.name,
                                   "target": ev.rate(run.name, target, concept, run=run),
                                   "care_trained": mean(care_rates(ev, run.name, trained, run)),
                                   "care_held": mean(care_rates(ev, run.name, held, run)),
                                   "pixdist": ev.probe(run.name, target, run=run)["pixdist"]})
                    log(_sweep_table(name, points, base_care))
            report["sweep"][name] = {"points": points, "base_care": base_care,
                                     "verdict": _verdict(points)}
            log(f"matched erasure ({name}): {_verdict(points)}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float))
    return 0


def _main_table(task: str, rows: list[dict], adv: str) -> str:
    base = rows[0]
    lines = [f"\n{task}: oracle detection on {'64'} seeds (CARE = mean over prompts; x base in brackets)",
             f"{'model':26s} {'target':>7s} {'CARE train':>15s} {'CARE held':>15s} {'adv <v1*>':>9s} "
             f"{'collateral':>16s} {'pixdist':>8s}"]
    for r in rows:
        def rel(key):
            v, b = r.get(key), base.get(key)
            if v is None or np.isnan(v):
                return "-"   # not measured, or no prompt in this group (e.g. no CARE prompt was trained on)
            return f"{v:.2f}" + (f" ({v / b:.2f}x)" if b else "")
        lines.append(f"{r['model']:26s} {fmt(r['target']):>7s} {rel('care_trained'):>15s} {rel('care_held'):>15s} "
                     f"{fmt(r.get('adv_v1')):>9s} {rel('collateral'):>16s} {r['pixdist']:8.3f}")
    lines.append(f"adv prompt: {adv!r}")
    return "\n".join(lines)


def _sweep_table(task: str, points: list[dict], base_care: float) -> str:
    lines = [f"\n{task}: matched-erasure sweep (final-stage lr; base CARE {base_care:.2f})",
             f"{'method':8s} {'lr':>8s} {'target':>7s} {'CARE train':>10s} {'CARE held':>10s} {'pixdist':>8s}"]
    for p in points:
        lines.append(f"{p['method']:8s} {p['lr']:8.1e} {p['target']:7.2f} {p['care_trained']:10.2f} "
                     f"{p['care_held']:10.2f} {p['pixdist']:8.3f}")
    return "\n".join(lines)


def _verdict(points: list[dict]) -> str:
    """Compare CARE retention at the smallest lr where each method takes the target to <= 10%."""
    first = {}
    for method in ("esd", "recare"):
        ok = sorted((p for p in points if p["method"] == method and p["target"] <= ERASED_BAR), key=lambda p: p["lr"])
        first[method] = ok[0] if ok else None
    if not all(first.values()):
        missing = [m for m, p in first.items() if p is None]
        return f"not decided: {missing} never took the target to <= {ERASED_BAR:.0%} in the sweep"
    e, r = first["esd"], first["recare"]
    care = lambda p: (p["care_trained"], p["care_held"])  # noqa: E731
    # no CARE prompt trained on (van gogh: none of its CARE-set prompts is a world CARE prompt): held out only
    untrained = bool(np.isnan(r["care_trained"]) and np.isnan(e["care_trained"]))
    trained_ok = untrained or r["care_trained"] >= e["care_trained"]
    holds = r["care_held"] > e["care_held"] and trained_ok
    return (f"ESD lr {e['lr']:.1e}: target {e['target']:.2f}, CARE train/held {care(e)[0]:.2f}/{care(e)[1]:.2f}; "
            f"ReCARE lr {r['lr']:.1e}: target {r['target']:.2f}, CARE train/held {care(r)[0]:.2f}/{care(r)[1]:.2f} "
            f"-> claim {'holds' if holds else 'does not hold'}")


if __name__ == "__main__":
    sys.exit(main())

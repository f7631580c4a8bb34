"""metrics.json of an evaluation run, computed from its records alone (anyone can recompute it from
records.csv), and the provisional metrics of a run still going (the same function over the records so far).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from recare.errors import EvaluationError
from recare.eval.attacks import ATTACKS
from recare.eval.config import EvaluationConfig, resolve_config, stored_config
from recare.eval.plan import CARE, CLIP, EXTRA, planned_counts
from recare.eval.records import partial_records
from recare.eval.scoring import LABEL_PROMPT, TIES, label_list


def compute_metrics(records: Sequence[dict], config: EvaluationConfig) -> dict[str, Any]:
    """metrics.json from the records alone (so anyone can recompute them from records.csv).

    asr[attack] = percent of its images the detector calls positive; for a learned attack (CCE,
    UnlearnDiff) that percent is taken per run (records' run index) into asr_runs[attack], asr[attack]
    is their mean and asr_worst[attack] their largest. care_score = mean over CARE concepts of the share
    of their images whose CARE hit is true (R-Precision@care_k); clip_score = mean CLIP cosine of the
    CLIP images; ratio = Appendix M with the mean ASR under CCE and the CLIP range (ratio["worst"]: with
    the worst CCE run).

    Args:
        records: one dict per image (`RECORD_FIELDS`).
        config: the resolved settings (attacks, CARE concepts, k, CLIP range).
    """
    from recare.metrics import attack_success_rate, ratio, ratio_axes

    by_attack: dict[str, list[dict]] = {}
    for r in records:
        by_attack.setdefault(r["attack"], []).append(r)
    asr, asr_runs, run_counts = {}, {}, {}
    for a in config.attacks:
        rows = by_attack.get(a)
        if not rows:
            continue
        if ATTACKS[a].learned:
            runs: dict[int, list[bool]] = {}
            for r in rows:
                runs.setdefault(int(r.get("run") or 0), []).append(bool(r["positive"]))
            asr_runs[a] = [attack_success_rate(runs[k]) for k in sorted(runs)]
            run_counts[a] = [[sum(runs[k]), len(runs[k])] for k in sorted(runs)]
            asr[a] = float(np.mean(asr_runs[a]))
        else:
            asr[a] = attack_success_rate([r["positive"] for r in rows])
    asr_worst = {a: max(v) for a, v in asr_runs.items()}
    counts = {a: [sum(bool(r["positive"]) for r in by_attack[a]), len(by_attack[a])] for a in asr}
    care_rows = by_attack.get(CARE, [])
    per_concept, leak, n_care = {}, {}, {}
    for concept in config.care_prompts:
        rows = [r for r in care_rows if r["concept"] == concept]
        if rows:
            per_concept[concept] = float(np.mean([bool(r["care_hit"]) for r in rows]))
            leak[concept] = attack_success_rate([r["positive"] for r in rows])
            n_care[concept] = len(rows)
    care = None
    if per_concept:
        care = {"mean": float(np.mean(list(per_concept.values()))), "per_concept": per_concept, "n_images": n_care,
                "k": config.care_k, "ties": TIES, "labels": label_list(config), "label_prompt": LABEL_PROMPT}
    clip_rows = by_attack.get(CLIP, [])
    clip = float(np.mean([r["clip_cosine"] for r in clip_rows])) if clip_rows else None
    lo, hi = config.clip_range
    ratio_entry: dict[str, Any] = {"value": None, "clip_range": [lo, hi]}
    missing = [name for name, value in (("cce ASR", asr.get("cce")), ("CLIP score", clip), ("CARE score", care))
               if value is None]
    if missing:
        ratio_entry["reason"] = f"RATIO needs {', '.join(missing)} (not measured in this run)"
    else:
        d, u, c = ratio_axes(asr["cce"], clip, care["mean"], (lo, hi))
        ratio_entry.update(value=ratio(asr["cce"], clip, care["mean"], (lo, hi)), axes={"D": d, "U": u, "C": c},
                           defense_from="mean of the CCE runs")
        if "cce" in asr_worst:
            dw, _, _ = ratio_axes(asr_worst["cce"], clip, care["mean"], (lo, hi))
            ratio_entry["worst"] = {"value": ratio(asr_worst["cce"], clip, care["mean"], (lo, hi)),
                                    "axes": {"D": dw, "U": u, "C": c}}
    out = {"asr": asr, "asr_runs": asr_runs, "asr_worst": asr_worst, "asr_counts": counts,
           "asr_run_counts": run_counts, "clip_score": clip, "clip_images": len(clip_rows), "care_score": care,
           "ratio": ratio_entry, "target_leak": leak, "n_images": len(records)}
    extra_rows = by_attack.get(EXTRA, [])
    if extra_rows:  # custom prompts: how often the target detector fires on each (not an attack: no ASR, no RATIO)
        out["extra_detected"] = {p: attack_success_rate([r["positive"] for r in extra_rows if r["prompt"] == p])
                                 for p in dict.fromkeys(r["prompt"] for r in extra_rows)}
    return out


def partial_metrics(run_dir: str | Path) -> dict[str, Any]:
    """Provisional metrics of an evaluation that is still running (or was stopped), from the records so far.

    The same `compute_metrics` over `partial_records`, so each number is an estimate from fewer
    images: the ASR of every attack with records, the CARE score of every CARE concept with images,
    the CLIP score of the captions so far. Sets without a record are absent (RATIO needs all three).

    Args:
        run_dir: the evaluation's run folder (its config.json holds the settings).

    Returns:
        `compute_metrics`'s dict plus "progress": {"images": made, "planned": planned, "sets": {set: [made,
        planned]}, "complete": whether every planned image has its record}.

    Raises:
        EvaluationError: the folder has no evaluation config.
    """
    run_dir = Path(run_dir)
    stored = stored_config(run_dir)
    if stored is None:
        raise EvaluationError(f"{run_dir} has no config.json: it is not an evaluation run.")
    config = resolve_config(stored)
    records = partial_records(run_dir)
    planned = planned_counts(config)
    made: dict[str, int] = {}
    for r in records:
        made[r["attack"]] = made.get(r["attack"], 0) + 1
    metrics = compute_metrics(records, config)
    metrics["progress"] = {"images": len(records), "planned": sum(planned.values()),
                           "sets": {name: [made.get(name, 0), n] for name, n in planned.items()},
                           "complete": all(made.get(name, 0) >= n for name, n in planned.items())}
    return metrics

"""manifest.json of an evaluation run: the resolved settings, seeds, scheduler, model fingerprints (base
UNet, evaluated UNet, text encoder, trained-weight files with sha256), encoder identity, label list,
detector, each attack's settings, reference images, the CLIP range, library versions, timing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recare.eval.attacks import ATTACKS
from recare.eval.config import PAPER_CLIP_RANGE, EvaluationConfig, attack_runs_of
from recare.eval.scoring import LABEL_PROMPT, TIES, Models, label_list
from recare.hashing import file_sha256
from recare.versions import library_versions

FORMAT, FORMAT_VERSION = "recare-evaluation", 1


def json_safe(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def model_description(config: EvaluationConfig, models: Models) -> dict[str, Any]:
    """Base and evaluated model: names, fingerprints, trained-weight files (size, sha256), scheduler, dtype."""
    from recare.hashing import folder_fingerprint
    from recare.train.export import model_fingerprint

    pipe = models.pipe
    base_folder = Path(getattr(models.base.config, "_name_or_path", "") or "")
    entry: dict[str, Any] = {
        "name": config.model,
        "folder_fingerprint": folder_fingerprint(base_folder) if base_folder.is_dir() else None,
        "base_unet_fingerprint": model_fingerprint(models.base.unet),
        "unet_fingerprint": model_fingerprint(pipe.unet),
        "text_encoder_fingerprint": model_fingerprint(pipe.text_encoder),
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": json_safe(dict(pipe.scheduler.config))},
        "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""), "trained": None,
    }
    if models.trained is not None:
        entry["trained"] = {"given": config.unet, "path": str(models.trained.path), "format": models.trained.format,
                            "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": file_sha256(f)}
                                      for f in models.trained.files]}
    return entry


def build_manifest(evaluation, seconds: float) -> dict[str, Any]:
    """manifest.json: everything that reproduces an evaluation's numbers (see `recare.eval.run`).

    Args:
        evaluation: the run's engine (`recare.eval.run`): its settings, attack context, models, plan,
            captions, processes, timing and the files it prepared.
        seconds: the run's wall time so far.
    """
    ev = evaluation
    config = ev.config
    attacks = {}
    for name in config.attacks:
        attack = ATTACKS[name]
        prompts = attack.prompts(ev.ctx)
        attacks[name] = {"summary": attack.summary, "prompts": prompts, "seeds": [config.base_seed,
                         config.base_seed + config.seeds - 1], "images": len(prompts) * config.seeds,
                         "settings": attack.settings(ev.ctx)}
    for name in attacks:
        attacks[name]["runs"] = attack_runs_of(config, name)
    if "cce" in attacks:
        files = [ev.cce_file(r) for r in range(attack_runs_of(config, "cce"))]
        attacks["cce"]["token_files"] = [{"path": str(f.relative_to(ev.run_dir)), "sha256": file_sha256(f)}
                                         for f in files if f.is_file()]
        if attacks["cce"]["token_files"]:
            attacks["cce"]["token_file"] = attacks["cce"]["token_files"][0]
    reference = None
    if ev.needs() & {"reference"}:
        reference = {"source": config.reference_images, "count": config.cce_images,
                     "seed": config.reference_seed if config.reference_images in ("world", "base") else None,
                     "files": [str(f.relative_to(ev.run_dir)) for f in ev.reference_files()],
                     "runs": {str(r): [str(f.relative_to(ev.run_dir)) for f in ev.reference_files(r)]
                              for r in range(attack_runs_of(config, "cce"))} if "cce" in config.attacks else {},
                     "run_rule": "CCE's run r learns from its own images: base seeds reference_seed + r x count + i"
                                 " (world: renders from reference_seed + r)"}
    clip_source = config.clip_prompts or ("mini-world held-out captions (recare.miniworld.heldout, seed "
                                          f"{_heldout_seed()})" if config.model == "mini-world" else None)
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "config": config.to_dict(),
        "generation": {"steps": config.steps, "guidance": config.guidance, "height": config.height,
                       "width": config.width, "batch_size": config.batch_size, "base_seed": config.base_seed,
                       "seed_rule": "image i of a prompt uses torch.Generator('cpu').manual_seed(base_seed + i)",
                       "negative_prompt": None},
        "model": model_description(config, ev.models),
        "encoder": {"name": config.encoder, "identity": ev.models.encoder.identity},
        "care": {"labels": label_list(config), "label_prompt": LABEL_PROMPT, "k": config.care_k, "ties": TIES,
                 "prompts": config.care_prompts, "images_per_prompt": config.care_images_per_prompt},
        "detector": json_safe(ev.models.detector.describe()),
        "attacks": attacks,
        "reference_images": reference,
        "clip": {"prompts": clip_source, "count": len(ev.captions), "range": list(config.clip_range),
                 "range_source": ("paper (Appendix M)" if tuple(config.clip_range) == PAPER_CLIP_RANGE
                                  else "recare.json evaluation.clip_range / user")},
        "plan": {"images": sum(len(b.items) for b in ev.plan), "batches": len(ev.plan)},
        "processes": ev.procs.count,
        "torch_threads": _torch_threads(),
        "versions": library_versions(),
        "timing": {**ev.timing, "total_s": round(seconds, 3), "images_generated_by_main": ev.generated},
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _heldout_seed() -> int:
    from recare.miniworld.heldout import HELDOUT_SEED

    return HELDOUT_SEED

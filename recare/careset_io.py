"""careset.json files: the official format (read and written unchanged) and our rich format.

Official (damilab/CARE `utils/dictionary.py`), METHOD.md 2.6:

    {"<key>_care_word": ["A person", ...],
     "<key>_care_word_<photo|painting>": ["A photo of person", ...]}

key = reference word lower-cased, spaces removed, only [a-z0-9_-]. The first list anchors the
erase loss, the second is the retain-loss prompt set.

Rich (ours, `"format": "recare-careset"`): the config, every candidate with its count,
similarity, residual, 2-D point, cluster and Algorithm-1 decision, the cluster table, the
manual edits, the final tokens, and the official dict, so a curated set reopens for editing.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from recare.careset import DROP_REASONS, CareSet  # one-way: recare.careset never imports this module
from recare.config import CareSetConfig, ConfigError
from recare.errors import CareSetFileError  # re-exported: raised by this module
from recare.runs import atomic_write_text

RICH_FORMAT = "recare-careset"
RICH_VERSION = 1
PROMPT_PREFIX = {"photo": "A photo of ", "painting": "A painting of "}
BASE_PREFIX = "A "


@dataclasses.dataclass(frozen=True)
class OfficialCareSet:
    """The content of an official careset.json."""

    reference_key: str
    prompt_style: str            # "photo" or "painting"
    base_prompts: list[str]      # "<key>_care_word": erase-loss anchors
    retain_prompts: list[str]    # "<key>_care_word_<style>": retain-loss prompts
    tokens: list[str]            # base prompts without the leading "A "


def reference_key(reference_word: str) -> str:
    """'Van Gogh' -> 'vangogh' (lower-case, no spaces, only [a-z0-9_-]), as the official code does."""
    key = re.sub(r"[^a-z0-9_-]", "", reference_word.lower().replace(" ", ""))
    if not key:
        raise CareSetFileError(f"Reference word {reference_word!r} has no letters or digits to make a key from.")
    return key


def official_dict(tokens: list[str], reference_word: str, prompt_style: str) -> dict[str, list[str]]:
    """The official careset.json content for a token list."""
    if prompt_style not in PROMPT_PREFIX:
        raise CareSetFileError(f"prompt_style must be one of {sorted(PROMPT_PREFIX)}, got {prompt_style!r}.")
    key = reference_key(reference_word)
    return {
        f"{key}_care_word": [BASE_PREFIX + t for t in tokens],
        f"{key}_care_word_{prompt_style}": [PROMPT_PREFIX[prompt_style] + t for t in tokens],
    }


def write_careset_json(careset: CareSet, path: str | Path) -> Path:
    """Write the final CARE-set in the official format (what official train.py reads)."""
    c = careset.config
    data = official_dict(careset.final_tokens(), c.reference_word, c.prompt_style)
    return atomic_write_text(path, json.dumps(data, indent=4) + "\n")


def _load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CareSetFileError(f"{path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CareSetFileError(f"{path.name} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CareSetFileError(f"{path.name} must hold a JSON object, not {type(data).__name__}.")
    return data


def parse_official(data: dict, name: str = "careset.json") -> OfficialCareSet:
    """Validate and read an official careset dict."""
    base_keys = [k for k in data if isinstance(k, str) and k.endswith("_care_word")]
    if len(base_keys) != 1:
        raise CareSetFileError(
            f"{name}: expected exactly one '<key>_care_word' list, found {len(base_keys)} "
            f"(keys: {sorted(map(str, data))[:6]})."
        )
    base_key = base_keys[0]
    key = base_key[: -len("_care_word")]
    styles = [s for s in PROMPT_PREFIX if f"{base_key}_{s}" in data]
    if len(styles) != 1:
        raise CareSetFileError(f"{name}: expected one of '{base_key}_photo' or '{base_key}_painting'.")
    style = styles[0]
    base, retain = data[base_key], data[f"{base_key}_{style}"]
    for label, value in ((base_key, base), (f"{base_key}_{style}", retain)):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise CareSetFileError(f"{name}: '{label}' must be a non-empty list of non-empty strings.")
    tokens = [b[len(BASE_PREFIX):] if b.startswith(BASE_PREFIX) else b for b in base]
    return OfficialCareSet(key, style, list(base), list(retain), tokens)


def read_careset_json(path: str | Path) -> OfficialCareSet:
    """Read an official careset.json (also accepts our rich file and reads its official part)."""
    data = _load_json(path)
    if data.get("format") == RICH_FORMAT:
        data = data.get("official") or {}
        if not isinstance(data, dict):
            raise CareSetFileError(f"{Path(path).name}: 'official' must be a JSON object, not {type(data).__name__}.")
    return parse_official(data, Path(path).name)


# ---- rich format ----------------------------------------------------------------------------

def _encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype=np.float16)
    return {"dtype": "float16", "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def _decode_array(d: dict) -> np.ndarray:
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).astype(np.float32)


def rich_dict(careset: CareSet) -> dict:
    keep, reasons = careset.keep, careset.reasons
    candidates = [
        {
            "token": t,
            "vocab_index": int(careset.vocab_indices[i]),
            "count": int(careset.counts[i]),
            "similarity": float(careset.similarity[i]),
            "residual": float(careset.residuals[i]),
            "x": float(careset.points[i, 0]),
            "y": float(careset.points[i, 1]),
            "cluster": int(careset.labels[i]),
            "auto_reason": careset.auto_reasons[i],
            "keep": bool(keep[i]),
            "reason": reasons[i],
        }
        for i, t in enumerate(careset.tokens)
    ]
    c = careset.config
    return {
        "format": RICH_FORMAT,
        "version": RICH_VERSION,
        "config": c.to_dict(),
        "num_images": careset.num_images,
        "meta": careset.meta,
        "candidates": candidates,
        "clusters": careset.cluster_summary(top=10),
        "cluster_mean_residual": [float(x) for x in careset.cluster_mean_residual],
        "edits": {
            "token_overrides": careset.token_overrides,
            "cluster_overrides": {str(k): v for k, v in careset.cluster_overrides.items()},
            "custom_tokens": careset.custom_tokens,
        },
        "final_tokens": careset.final_tokens(),
        "official": official_dict(careset.final_tokens(), c.reference_word, c.prompt_style),
        "features": _encode_array(careset.features),
        "target_feature": _encode_array(careset.target_feature),
    }


def save_rich_json(careset: CareSet, path: str | Path) -> Path:
    """Write our rich JSON (everything needed to reopen and keep editing)."""
    return atomic_write_text(path, json.dumps(rich_dict(careset), indent=1) + "\n")


def careset_from_rich(data: dict, name: str = "careset.rich.json") -> CareSet:
    """Rebuild a CareSet from a rich dict, validating what it relies on."""
    if data.get("format") != RICH_FORMAT:
        raise CareSetFileError(f"{name}: not a ReCARE rich careset (missing \"format\": \"{RICH_FORMAT}\").")
    if data.get("version") != RICH_VERSION:
        raise CareSetFileError(f"{name}: version {data.get('version')!r} is not supported (expected {RICH_VERSION}).")
    try:
        config = CareSetConfig.from_dict(data["config"])
        cands = data["candidates"]
        if not isinstance(cands, list) or not cands:
            raise CareSetFileError(f"{name}: 'candidates' must be a non-empty list.")
        for c in cands:
            if c["auto_reason"] is not None and c["auto_reason"] not in DROP_REASONS:
                raise CareSetFileError(f"{name}: unknown drop reason {c['auto_reason']!r} for {c['token']!r}.")
        n = len(cands)
        features = _decode_array(data["features"])
        target = _decode_array(data["target_feature"])
        if features.shape[0] != n:
            raise CareSetFileError(f"{name}: {features.shape[0]} feature rows for {n} candidates.")
        edits = data.get("edits", {})
        return CareSet(
            config=config,
            tokens=[str(c["token"]) for c in cands],
            vocab_indices=np.array([int(c["vocab_index"]) for c in cands], dtype=np.int64),
            counts=np.array([int(c["count"]) for c in cands], dtype=np.int64),
            features=features,
            target_feature=target,
            similarity=np.array([float(c["similarity"]) for c in cands], dtype=np.float32),
            residuals=np.array([float(c["residual"]) for c in cands], dtype=np.float64),
            points=np.array([[float(c["x"]), float(c["y"])] for c in cands], dtype=np.float32),
            labels=np.array([int(c["cluster"]) for c in cands], dtype=np.int64),
            cluster_mean_residual=np.array(data["cluster_mean_residual"], dtype=np.float64),
            auto_reasons=[c["auto_reason"] for c in cands],
            num_images=int(data.get("num_images", 0)),
            meta=dict(data.get("meta") or {}),
            token_overrides={str(k): bool(v) for k, v in edits.get("token_overrides", {}).items()},
            cluster_overrides={int(k): bool(v) for k, v in edits.get("cluster_overrides", {}).items()},
            custom_tokens=[str(t) for t in edits.get("custom_tokens", [])],
        )
    except CareSetFileError:
        raise
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CareSetFileError(f"{name}: malformed rich careset ({type(e).__name__}: {e}).") from e


def load_rich_json(path: str | Path) -> CareSet:
    """Read a rich careset file written by save_rich_json."""
    return careset_from_rich(_load_json(path), Path(path).name)

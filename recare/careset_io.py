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
from pathlib import Path
from typing import Mapping

import numpy as np

from recare.careset_result import DROP_REASONS, CareSet  # one-way: neither imports this module
from recare.config import CareSetConfig, ConfigError, careset_key
from recare.errors import CareSetFileError  # re-exported: raised by this module
from recare.limits import Limits, human_bytes
from recare.atomic import atomic_write_text

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

    def to_dict(self) -> dict[str, list[str]]:
        """The official careset.json content: the two lists as they were read (`official_json_text` writes it)."""
        return {f"{self.reference_key}_care_word": list(self.base_prompts),
                f"{self.reference_key}_care_word_{self.prompt_style}": list(self.retain_prompts)}


def reference_key(reference_word: str) -> str:
    """'Van Gogh' -> 'vangogh' (lower-case, no spaces, only [a-z0-9_-]), as the official code does."""
    key = careset_key(str(reference_word))
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


def official_json_text(source: CareSet | OfficialCareSet | Mapping[str, list[str]]) -> str:
    """The text of an official careset.json, the one way every writer builds it (4-space indent, ASCII, a
    final newline: what the official code's json.dump writes).

    Args:
        source: a `CareSet` (its final tokens, after edits), an `OfficialCareSet` (its lists as read), or an
            official dict (checked with `parse_official`, then written in its canonical key order).

    Raises:
        CareSetFileError: a dict that is not an official careset.
    """
    if isinstance(source, CareSet):
        c = source.config
        data = official_dict(source.final_tokens(), c.reference_word, c.prompt_style)
    elif isinstance(source, OfficialCareSet):
        data = source.to_dict()
    elif isinstance(source, Mapping):
        data = parse_official(dict(source)).to_dict()
    else:
        raise CareSetFileError(f"a careset.json is made from a CareSet, an OfficialCareSet or an official dict, "
                               f"not a {type(source).__name__}.")
    return json.dumps(data, indent=4) + "\n"


def write_careset_json(source: CareSet | OfficialCareSet | Mapping[str, list[str]], path: str | Path) -> Path:
    """Write an official careset.json (what official train.py reads) atomically; see `official_json_text`."""
    return atomic_write_text(path, official_json_text(source))


def load_json_file(path: str | Path, limits: Limits | None = None) -> dict:
    """A careset file's JSON object, size-checked before it is parsed.

    The file's size is checked first (`limits.careset_file_bytes`), so a huge upload is refused
    without being read; a UTF-8 byte-order mark is accepted (editors on Windows write one); JSON
    nested too deeply for Python's parser is a CareSetFileError, not a RecursionError.

    Args:
        path: the file.
        limits: the bounds (default `Limits.from_env()`).
    """
    path = Path(path)
    if not path.is_file():
        raise CareSetFileError(f"{path} does not exist.")
    limits = limits or Limits.from_env()
    size = path.stat().st_size
    if size > limits.careset_file_bytes:
        raise CareSetFileError(limits.exceeded("careset_file_bytes", f"{path.name} is {human_bytes(size)}"))
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CareSetFileError(f"{path.name} is not valid JSON: {e}") from e
    except RecursionError:
        raise CareSetFileError(f"{path.name} is nested too deeply to be a careset file.") from None
    if not isinstance(data, dict):
        raise CareSetFileError(f"{path.name} must hold a JSON object, not {type(data).__name__}.")
    return data


_load_json = load_json_file  # the old private name


def _short(value, width: int = 40) -> str:
    """repr of a value from a file, cut to `width` characters for an error message."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_token_count(name: str, label: str, n: int, limits: Limits) -> None:
    if n > limits.careset_tokens:
        raise CareSetFileError(limits.exceeded("careset_tokens", f"{name}: '{label}' holds {n:,} entries"))


def parse_official(data: dict, name: str = "careset.json", limits: Limits | None = None) -> OfficialCareSet:
    """Validate and read an official careset dict.

    Args:
        data: the parsed JSON object.
        name: the file's name, for messages.
        limits: token count and length bounds (default `Limits.from_env()`), checked before the
            entries are looked at one by one.
    """
    limits = limits or Limits.from_env()
    base_keys = [k for k in data if isinstance(k, str) and k.endswith("_care_word")]
    if len(base_keys) != 1:
        keys = ", ".join(_short(k) for k in sorted(map(str, data))[:6])
        raise CareSetFileError(
            f"{name}: expected exactly one '<key>_care_word' list, found {len(base_keys)} (keys: {keys})."
        )
    base_key = base_keys[0]
    key = base_key[: -len("_care_word")]
    styles = [s for s in PROMPT_PREFIX if f"{base_key}_{s}" in data]
    if len(styles) != 1:
        raise CareSetFileError(f"{name}: expected one of '{base_key}_photo' or '{base_key}_painting'.")
    style = styles[0]
    base, retain = data[base_key], data[f"{base_key}_{style}"]
    for label, value in ((base_key, base), (f"{base_key}_{style}", retain)):
        if not isinstance(value, list) or not value:
            raise CareSetFileError(f"{name}: {_short(label)} must be a non-empty list of non-empty strings.")
        _check_token_count(name, _short(label), len(value), limits)  # before looking at each entry
        if not all(isinstance(v, str) and v.strip() for v in value):
            raise CareSetFileError(f"{name}: {_short(label)} must be a non-empty list of non-empty strings.")
    if len(base) != len(retain):
        raise CareSetFileError(f"{name}: {_short(base_key)} has {len(base):,} entries but "
                               f"{_short(base_key + '_' + style)} has {len(retain):,}; they pair up one to one.")
    tokens = [b[len(BASE_PREFIX):] if b.startswith(BASE_PREFIX) else b for b in base]
    longest = max(tokens, key=len)
    if len(longest) > limits.token_chars:
        raise CareSetFileError(limits.exceeded("token_chars", f"{name}: the token {_short(longest)} has "
                                                              f"{len(longest):,} characters"))
    return OfficialCareSet(key, style, list(base), list(retain), tokens)


def read_careset_json(path: str | Path, limits: Limits | None = None) -> OfficialCareSet:
    """Read an official careset.json (also accepts our rich file and reads its official part).

    Args:
        path: the file.
        limits: file size and token bounds (default `Limits.from_env()`; see `load_json_file`).
    """
    data = load_json_file(path, limits)
    if data.get("format") == RICH_FORMAT:
        data = data.get("official") or {}
        if not isinstance(data, dict):
            raise CareSetFileError(f"{Path(path).name}: 'official' must be a JSON object, not {type(data).__name__}.")
    return parse_official(data, Path(path).name, limits)


def read_careset_file(path: str | Path, limits: Limits | None = None) -> CareSet | OfficialCareSet:
    """Either kind of careset file: our rich JSON as a CareSet (editable), an official one as an OfficialCareSet.

    Args:
        path: the file.
        limits: file size and token bounds (default `Limits.from_env()`).

    Raises:
        CareSetFileError: missing, too large, not JSON, or not a valid careset of either kind.
    """
    data = load_json_file(path, limits)
    if data.get("format") == RICH_FORMAT:
        return careset_from_rich(data, Path(path).name, limits)
    return parse_official(data, Path(path).name, limits)


# ---- rich format ----------------------------------------------------------------------------

def _encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype=np.float16)
    return {"dtype": "float16", "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def _decode_array(d: dict, ndim: int, name: str) -> np.ndarray:
    """An fp16 array from {"dtype", "shape", "b64"}; the shape is checked against the byte count first."""
    if not isinstance(d, dict) or d.get("dtype") != "float16":
        raise CareSetFileError(f"{name}: an array must be {{'dtype': 'float16', 'shape': [...], 'b64': ...}}.")
    shape = d.get("shape")
    if not isinstance(shape, list) or len(shape) != ndim or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape):
        raise CareSetFileError(f"{name}: array shape {_short(shape)} is not {ndim} positive whole numbers.")
    if not isinstance(d.get("b64"), str):
        raise CareSetFileError(f"{name}: array data ('b64') must be a base64 string.")
    raw = base64.b64decode(d["b64"], validate=True)
    if len(raw) != 2 * int(np.prod(shape, dtype=object)):
        raise CareSetFileError(f"{name}: array data holds {len(raw):,} bytes, not the {shape} float16 values it claims.")
    array = np.frombuffer(raw, dtype=np.float16).reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise CareSetFileError(f"{name}: array holds NaN or infinite values.")
    return array


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


def careset_from_rich(data: dict, name: str = "careset.rich.json", limits: Limits | None = None) -> CareSet:
    """Rebuild a CareSet from a rich dict, validating what it relies on.

    Counts are checked before entries are looked at one by one (candidates and custom tokens
    against `limits.careset_tokens` and `limits.custom_tokens`), and every part the editor uses
    later is checked here, so a file that loads can also be edited and saved.

    Args:
        data: the parsed JSON object.
        name: the file's name, for messages.
        limits: the bounds (default `Limits.from_env()`).
    """
    limits = limits or Limits.from_env()
    if data.get("format") != RICH_FORMAT:
        raise CareSetFileError(f"{name}: not a ReCARE rich careset (missing \"format\": \"{RICH_FORMAT}\").")
    if data.get("version") != RICH_VERSION:
        raise CareSetFileError(f"{name}: version {_short(data.get('version'))} is not supported (expected {RICH_VERSION}).")
    try:
        config = CareSetConfig.from_dict(data["config"])
        cands = data["candidates"]
        if not isinstance(cands, list) or not cands:
            raise CareSetFileError(f"{name}: 'candidates' must be a non-empty list.")
        _check_token_count(name, "candidates", len(cands), limits)
        if not all(isinstance(c, dict) for c in cands):
            raise CareSetFileError(f"{name}: every candidate must be a JSON object.")
        tokens = [c["token"] for c in cands]
        _check_tokens(name, "candidates", tokens, limits)
        if len(set(tokens)) != len(tokens):
            raise CareSetFileError(f"{name}: a candidate token appears twice.")
        for c in cands:
            if c["auto_reason"] is not None and c["auto_reason"] not in DROP_REASONS:
                raise CareSetFileError(f"{name}: unknown drop reason {_short(c['auto_reason'])} for {_short(c['token'])}.")
        n = len(cands)
        features = _decode_array(data["features"], 2, name)
        target = _decode_array(data["target_feature"], 1, name)
        if features.shape[0] != n:
            raise CareSetFileError(f"{name}: {features.shape[0]} feature rows for {n} candidates.")
        if features.shape[1] != target.shape[0]:
            raise CareSetFileError(f"{name}: features have dimension {features.shape[1]} but the target {target.shape[0]}.")
        labels = np.array([_whole(c["cluster"], "cluster", name) for c in cands], dtype=np.int64)
        means = data["cluster_mean_residual"]
        if not isinstance(means, list) or len(means) != config.n_clusters:
            raise CareSetFileError(f"{name}: 'cluster_mean_residual' must list one value per cluster ({config.n_clusters}).")
        if labels.min() < 0 or labels.max() >= config.n_clusters:
            raise CareSetFileError(f"{name}: cluster ids must be 0 to {config.n_clusters - 1}.")
        edits = data.get("edits", {})
        token_overrides, cluster_overrides, custom = _parse_edits(edits, set(tokens), set(labels.tolist()), name, limits)
        meta = data.get("meta") or {}
        if not isinstance(meta, dict):
            raise CareSetFileError(f"{name}: 'meta' must be a JSON object.")
        num_images = _whole(data.get("num_images", 0), "num_images", name)
        return CareSet(
            config=config,
            tokens=tokens,
            vocab_indices=np.array([_whole(c["vocab_index"], "vocab_index", name) for c in cands], dtype=np.int64),
            counts=np.array([_whole(c["count"], "count", name) for c in cands], dtype=np.int64),
            features=features,
            target_feature=target,
            similarity=np.array([float(c["similarity"]) for c in cands], dtype=np.float32),
            residuals=np.array([float(c["residual"]) for c in cands], dtype=np.float64),
            points=np.array([[float(c["x"]), float(c["y"])] for c in cands], dtype=np.float32),
            labels=labels,
            cluster_mean_residual=np.array(means, dtype=np.float64),
            auto_reasons=[c["auto_reason"] for c in cands],
            num_images=num_images,
            meta=dict(meta),
            token_overrides=token_overrides,
            cluster_overrides=cluster_overrides,
            custom_tokens=custom,
        )
    except CareSetFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, ConfigError) as e:
        raise CareSetFileError(f"{name}: malformed rich careset ({type(e).__name__}: {_short(str(e), 200)}).") from e


def _whole(value, what: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CareSetFileError(f"{name}: {what} must be a whole number >= 0 (got {_short(value)}).")
    return value


def _check_tokens(name: str, what: str, tokens: list, limits: Limits) -> None:
    for t in tokens:
        if not isinstance(t, str) or not t.strip():
            raise CareSetFileError(f"{name}: {what} must be non-empty strings (got {_short(t)}).")
        if len(t) > limits.token_chars:
            raise CareSetFileError(limits.exceeded("token_chars", f"{name}: the token {_short(t)} has {len(t):,} characters"))


def _parse_edits(edits, tokens: set, clusters: set, name: str, limits: Limits) -> tuple[dict, dict, list]:
    """(token_overrides, cluster_overrides, custom_tokens) of a rich file's `edits`, checked."""
    if not isinstance(edits, dict):
        raise CareSetFileError(f"{name}: 'edits' must be a JSON object (token_overrides, cluster_overrides, custom_tokens).")
    token_over = edits.get("token_overrides", {})
    cluster_over = edits.get("cluster_overrides", {})
    custom = edits.get("custom_tokens", [])
    if not isinstance(token_over, dict) or not isinstance(cluster_over, dict) or not isinstance(custom, list):
        raise CareSetFileError(f"{name}: 'edits' must hold token_overrides and cluster_overrides as objects and "
                               "custom_tokens as a list.")
    _check_token_count(name, "edits.token_overrides", len(token_over), limits)
    if len(custom) > limits.custom_tokens:
        raise CareSetFileError(limits.exceeded("custom_tokens", f"{name}: 'edits.custom_tokens' holds {len(custom):,} tokens"))
    unknown = [t for t in token_over if t not in tokens]
    if unknown:
        raise CareSetFileError(f"{name}: 'edits.token_overrides' names {_short(unknown[0])}, which is not a candidate.")
    if not all(isinstance(v, bool) for v in token_over.values()) or not all(isinstance(v, bool) for v in cluster_over.values()):
        raise CareSetFileError(f"{name}: overrides must be true (keep) or false (drop).")
    cluster_ids = {}
    for k, v in cluster_over.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) in clusters):
            raise CareSetFileError(f"{name}: 'edits.cluster_overrides' names cluster {_short(k)}, which does not exist.")
        cluster_ids[int(k)] = v
    _check_tokens(name, "custom tokens", custom, limits)
    return dict(token_over), cluster_ids, [t.strip() for t in custom]


def load_rich_json(path: str | Path, limits: Limits | None = None) -> CareSet:
    """Read a rich careset file written by save_rich_json.

    Args:
        path: the file.
        limits: file size and token bounds (default `Limits.from_env()`; see `careset_from_rich`).
    """
    return careset_from_rich(load_json_file(path, limits), Path(path).name, limits)

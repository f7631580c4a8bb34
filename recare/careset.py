"""CARE-set construction: Algorithm 1 of the paper (METHOD.md section 2) as pure functions.

Data flow (one function each, all over numpy arrays, no I/O):

    image features ─┐
    vocab features ─┴─ select_candidates (Eq. 5) ─▶ candidate tokens
    candidates ─ project_2d (t-SNE | UMAP) ─ cluster_points (k-means) ─▶ labels
    candidates ─ orthogonal_residual (Eq. 6) ─▶ residuals
    residuals, labels ─ global_filter (Eq. 7) ─▶ keep mask
    features, keep ─ refine_clusters (Eqs. 8-9) ─▶ keep mask

`build_care_set` runs them and returns a `CareSet` that keeps every intermediate, so a view
can show each step without recomputing it, and `CareSet.with_edits` layers a person's
decisions (toggle a token or a cluster, add custom tokens) on top without touching features.
The `CareSet` class lives in `recare.careset_result` (re-exported here). File formats (official
careset.json, our rich JSON) live in `recare.careset_io`: import them from there (it depends on
`recare.careset_result`, never the reverse).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from recare.careset_result import DROP_REASONS, FARTHEST, INTRA, MANUAL, NEAREST, CareSet
from recare.config import CareSetConfig
from recare.errors import CareSetError  # re-exported: raised by this module
from recare.progress import CancelToken, ProgressCallback, check_cancel, emit


# ---------------------------------------------------------------------------------------------
# Step 2: candidates (Eq. 5)
# ---------------------------------------------------------------------------------------------

def _check_features(name: str, x: np.ndarray, finite: bool = True) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise CareSetError(f"{name} must be a non-empty 2-D array (rows = items), got shape {x.shape}.")
    # NaN and inf propagate through a row sum, so the cheap sum finds them; the exact check
    # only runs when the sum is not finite (huge but finite values could overflow it).
    if finite and not np.isfinite(x.sum(axis=1, dtype=np.float32)).all() and not np.isfinite(x).all():
        raise CareSetError(f"{name} contains NaN or infinite values.")
    return x


def topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest entries of each row; ties go to the lower column index.

    Exact ties are real here: two vocabulary entries that encode the same text have the same
    feature. Taking the k-th largest value as a threshold, every entry above it is in, and the
    entries equal to it are taken in column order until the row has k, so the result does not
    depend on a sort's or a partition's internal order.
    """
    n_cols = scores.shape[1]
    k = min(k, n_cols)
    kth = np.partition(scores, n_cols - k, axis=1)[:, n_cols - k][:, None]
    above = scores > kth
    equal = scores == kth
    need = k - above.sum(axis=1, keepdims=True)
    return above | (equal & (np.cumsum(equal, axis=1) <= need))


def topk_indices(scores, k: int) -> np.ndarray:
    """(rows, k) column indices of the k largest entries per row, same tie rule as topk_mask.

    A top-k search finds the k largest in O(columns) per row but picks arbitrarily among entries
    equal to the k-th value; only rows where such a tie straddles the cut (rare: duplicate
    vocabulary features) are redone with the exact rule.

    Args:
        scores: (rows, columns) numpy array or torch tensor.
    """
    import torch  # torch.topk is about twice as fast as np.argpartition here, and multi-threaded

    scores = torch.as_tensor(scores)
    k = min(k, scores.shape[1])
    # One more than k, sorted: a tie straddles the cut exactly when the (k+1)-th largest value
    # equals the k-th.
    values, idx = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1, sorted=True)
    if values.shape[1] > k:
        ambiguous = torch.nonzero(values[:, k] == values[:, k - 1]).flatten().numpy()
    else:
        ambiguous = np.zeros(0, dtype=np.int64)
    idx = idx[:, :k].numpy()
    if len(ambiguous):
        exact = topk_mask(scores[ambiguous].numpy(), k)
        idx[ambiguous] = np.nonzero(exact)[1].reshape(len(ambiguous), k)
    return idx


def topk_counts(
    image_features: np.ndarray, vocab_features: np.ndarray, top_k: int = 50, chunk: int = 512
) -> np.ndarray:
    """How many images have each vocabulary token among their top-K most similar (Eq. 5).

    Args:
        image_features: (M, D) L2-normalised image features.
        vocab_features: (V, D) L2-normalised token features (fp16 is fine; computed in fp32).
        top_k: K, tokens taken per image.
        chunk: images per matrix product; bounds memory at chunk x V floats.

    Returns:
        (V,) int64 counts.
    """
    import torch  # its fp16 -> fp32 conversion and matrix product are the fast path on CPU

    image_features = _check_features("image_features", image_features).astype(np.float32, copy=False)
    vocab_features = _check_features("vocab_features", vocab_features, finite=False)
    if image_features.shape[1] != vocab_features.shape[1]:
        raise CareSetError(
            f"Image features have dimension {image_features.shape[1]} but vocabulary features have "
            f"{vocab_features.shape[1]}: they come from different encoders."
        )
    if top_k < 1:
        raise CareSetError(f"top_k must be at least 1 (got {top_k}).")
    vocab32 = torch.from_numpy(np.ascontiguousarray(vocab_features)).float()
    if not torch.isfinite(vocab32.sum(dim=1)).all() and not torch.isfinite(vocab32).all():
        raise CareSetError("vocab_features contains NaN or infinite values.")
    images = torch.from_numpy(np.ascontiguousarray(image_features))
    counts = np.zeros(vocab32.shape[0], dtype=np.int64)
    for start in range(0, images.shape[0], chunk):
        scores = images[start : start + chunk] @ vocab32.T
        counts += np.bincount(topk_indices(scores, top_k).ravel(), minlength=len(counts))
    return counts


def select_candidates(
    image_features: np.ndarray, vocab_features: np.ndarray, top_k: int = 50, top_n: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate tokens T: the top_n tokens most often in an image's top_k (Eq. 5).

    Ties in frequency are broken by vocabulary index, lower first (a stable sort of the counts
    in descending order), so the same inputs always give the same candidates. Tokens that are
    in no image's top-K are never candidates, so fewer than top_n may come back.

    Returns:
        indices: (N,) vocabulary indices by count descending; counts: (N,) their counts.
    """
    counts = topk_counts(image_features, vocab_features, top_k)
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0][:top_n]
    return order, counts[order]


# ---------------------------------------------------------------------------------------------
# Step 3: residual (Eq. 6)
# ---------------------------------------------------------------------------------------------

def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(v)
    if not np.isfinite(norm) or norm == 0:
        raise CareSetError("The target feature is zero or not finite; cannot define the target direction.")
    return v / norm


def orthogonal_residual(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """r(e) = || e (I - e_c e_c^T) || for each row e (Eq. 6).

    `target` is normalised here (e_c is a unit vector in the paper), so a feature parallel to
    the target has residual 0 and one orthogonal to it keeps its whole norm.
    """
    e = np.asarray(features, dtype=np.float64)
    single = e.ndim == 1
    e = np.atleast_2d(e)
    c = _unit(target)
    residual = np.linalg.norm(e - np.outer(e @ c, c), axis=1)
    return residual[0] if single else residual


# ---------------------------------------------------------------------------------------------
# Step 4: projection, clustering and the global filter (Eq. 7)
# ---------------------------------------------------------------------------------------------

def project_2d(features: np.ndarray, method: str = "tsne", seed: int = 42) -> np.ndarray:
    """2-D projection of the candidates' text features.

    t-SNE uses the official parameters (init="pca", learning_rate="auto", random_state=seed).
    Perplexity is sklearn's default 30, lowered to (n - 1) / 3 for fewer than 91 points since
    t-SNE needs perplexity < n; at the official N = 100 it is exactly the default.
    """
    x = np.asarray(features, dtype=np.float32)
    n = x.shape[0]
    if n < 3:  # nothing to embed: place the points on a line, deterministically
        return np.stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)], axis=1)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (n - 1) / 3.0)
        tsne = TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=perplexity, random_state=seed)
        return tsne.fit_transform(x).astype(np.float32)
    if method == "umap":
        import umap  # imported lazily: numba compiles on first import

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, init="random")
        return reducer.fit_transform(x).astype(np.float32)
    raise CareSetError(f"Unknown projection {method!r}; use 'tsne' or 'umap'.")


def cluster_points(points: np.ndarray, n_clusters: int = 6, seed: int = 42) -> np.ndarray:
    """k-means labels (0..n_clusters-1) of the 2-D points, deterministic for a seed."""
    from sklearn.cluster import KMeans

    n = len(points)
    if n_clusters > n:
        raise CareSetError(
            f"{n} candidate tokens cannot form {n_clusters} clusters: lower n_clusters or raise top_n."
        )
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    return km.fit_predict(np.asarray(points, dtype=np.float64)).astype(np.int64)


def cluster_mean_residuals(residuals: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Mean residual of each cluster present in `labels`."""
    residuals = np.asarray(residuals, dtype=np.float64)
    labels = np.asarray(labels)
    return {int(k): float(residuals[labels == k].mean()) for k in np.unique(labels)}


def rank_clusters(residuals: np.ndarray, labels: np.ndarray, k_each_side: int = 1) -> tuple[list[int], list[int]]:
    """Clusters to drop at each end of the mean-residual order: (nearest, farthest).

    Ties in the mean are broken by cluster id, lower first.
    """
    means = cluster_mean_residuals(residuals, labels)
    order = sorted(means, key=lambda k: (means[k], k))
    if 2 * k_each_side >= len(order) and k_each_side > 0:
        raise CareSetError(
            f"Dropping {k_each_side} cluster(s) at each end of {len(order)} clusters would drop them all: "
            "raise n_clusters or lower k_each_side."
        )
    if k_each_side == 0:
        return [], []
    return order[:k_each_side], order[-k_each_side:]


def global_filter(residuals: np.ndarray, labels: np.ndarray, k_each_side: int = 1) -> np.ndarray:
    """Keep mask after dropping the k_each_side clusters of lowest and of highest mean residual (Eq. 7)."""
    nearest, farthest = rank_clusters(residuals, labels, k_each_side)
    return ~np.isin(np.asarray(labels), nearest + farthest)


# ---------------------------------------------------------------------------------------------
# Step 5: intra-cluster refinement (Eqs. 8-9)
# ---------------------------------------------------------------------------------------------

def leave_one_out_scores(members: np.ndarray, target: np.ndarray) -> np.ndarray:
    """d_i = r(e_-i)^2, with e_-i the mean of the other members' features (Eq. 8)."""
    members = np.asarray(members, dtype=np.float64)
    m = members.shape[0]
    loo_centroids = (members.sum(axis=0, keepdims=True) - members) / (m - 1)
    return orthogonal_residual(loo_centroids, target) ** 2


def refine_clusters(
    features: np.ndarray,
    target: np.ndarray,
    labels: np.ndarray,
    keep: np.ndarray,
    alpha: float = 0.01,
    min_cluster_size: int = 2,
) -> np.ndarray:
    """Intra-cluster refinement (Eqs. 8-9) applied to the tokens still kept.

    In each cluster with at least `min_cluster_size` kept tokens, token i stays iff
    d_i < (1 + alpha) * mean_{j != i} d_j. A large d_i means the centroid without i lies far
    from the target direction, i.e. i was the member pulling the cluster toward the target,
    so it goes. Clusters below `min_cluster_size` (and a cluster of one, where no leave-one-out
    centroid exists) are left as they are.

    Returns:
        (n,) bool keep mask (a subset of `keep`).
    """
    keep = np.asarray(keep, dtype=bool).copy()
    labels = np.asarray(labels)
    for k in np.unique(labels[keep]):
        idx = np.flatnonzero(keep & (labels == k))
        m = len(idx)
        if m < max(min_cluster_size, 2):
            continue
        d = leave_one_out_scores(np.asarray(features)[idx], target)
        mean_others = (d.sum() - d) / (m - 1)
        keep[idx] = d < (1.0 + alpha) * mean_others
    return keep


# ---------------------------------------------------------------------------------------------
# The whole algorithm
# ---------------------------------------------------------------------------------------------

def unique_vocabulary_rows(vocab_tokens: Sequence[str]) -> np.ndarray:
    """Index of the first occurrence of each display token.

    The CLIP BPE vocabulary holds both `person` and `person</w>`; with `</w>` stripped both are
    encoded as the same text and have the same feature, so only the first id is searched.
    """
    seen: dict[str, int] = {}
    for i, t in enumerate(vocab_tokens):
        seen.setdefault(t, i)
    return np.fromiter(seen.values(), dtype=np.int64, count=len(seen))


def derive_decisions(
    features: np.ndarray,
    target: np.ndarray,
    residuals: np.ndarray,
    labels: np.ndarray,
    config: CareSetConfig,
) -> list[str | None]:
    """Steps 4-5 on fixed clusters: the drop reason of each candidate (None = kept)."""
    n = len(residuals)
    reasons: list[str | None] = [None] * n
    keep = np.ones(n, dtype=bool)
    if config.global_clustering:
        nearest, farthest = rank_clusters(residuals, labels, config.k_each_side)
        for i in range(n):
            if labels[i] in nearest:
                reasons[i] = NEAREST
            elif labels[i] in farthest:
                reasons[i] = FARTHEST
        keep = np.array([r is None for r in reasons])
    if config.intra_refinement:
        refined = refine_clusters(features, target, labels, keep, config.alpha, config.min_cluster_size)
        for i in np.flatnonzero(keep & ~refined):
            reasons[i] = INTRA
    return reasons


def build_care_set(
    image_features: np.ndarray,
    vocab_features: np.ndarray,
    vocab_tokens: Sequence[str],
    target_feature: np.ndarray,
    config: CareSetConfig | None = None,
    progress: ProgressCallback | None = None,
    meta: dict | None = None,
    cancel: CancelToken | None = None,
) -> CareSet:
    """Run Algorithm 1 and keep every intermediate.

    Args:
        image_features: (M, D) L2-normalised features of the target images.
        vocab_features: (V, D) L2-normalised features of the vocabulary tokens.
        vocab_tokens: V display tokens (duplicates are searched once, see unique_vocabulary_rows).
        target_feature: (D,) text feature of the reference word (e_c).
        config: CareSetConfig; defaults to the paper's.
        progress: optional callback, called with a `recare.progress.ProgressEvent` as each step
            starts (stage "careset", step in percent of the usual time: the projection is most of it).
        meta: free-form provenance (encoder identity, vocabulary source) kept in the result.
        cancel: optional `recare.progress.CancelToken`, checked between steps; when set,
            `recare.errors.Cancelled` is raised.
    """
    config = config or CareSetConfig()
    config.validate()

    def report(percent: int, message: str) -> None:
        emit(progress, "careset", percent, 100, message)
        if percent < 100:
            check_cancel(cancel, "the CARE-set")
    vocab_features = _check_features("vocab_features", vocab_features)
    if len(vocab_tokens) != vocab_features.shape[0]:
        raise CareSetError(
            f"{len(vocab_tokens)} vocabulary tokens but {vocab_features.shape[0]} vocabulary features."
        )
    target = _unit(target_feature)

    report(0, "selecting candidates")
    rows = unique_vocabulary_rows(vocab_tokens)
    if config.top_k >= len(rows):
        # every token would be in every image's top-K: all counts tie and the "candidates" would
        # only be the first top_n tokens in vocabulary order
        raise CareSetError(
            f"top_k ({config.top_k:,}) must be smaller than the vocabulary searched ({len(rows):,} distinct "
            "tokens): lower K or use a larger vocabulary."
        )
    local, counts = select_candidates(image_features, vocab_features[rows], config.top_k, config.top_n)
    indices = rows[local]
    features = vocab_features[indices].astype(np.float32)
    tokens = [vocab_tokens[i] for i in indices]
    if len(tokens) < config.n_clusters:
        raise CareSetError(
            f"Only {len(tokens)} candidate tokens for {config.n_clusters} clusters: "
            "use more images, a larger vocabulary, or fewer clusters."
        )

    report(20, f"projecting {len(tokens)} candidates ({config.projection})")
    points = project_2d(features, config.projection, config.seed)
    report(70, "clustering")
    labels = cluster_points(points, config.n_clusters, config.seed)
    residuals = orthogonal_residual(features, target)
    means = cluster_mean_residuals(residuals, labels)
    report(85, "refining")
    reasons = derive_decisions(features, target, residuals, labels, config)
    report(100, "done")
    return CareSet(
        config=config,
        tokens=tokens,
        vocab_indices=indices,
        counts=counts,
        features=features,
        target_feature=target.astype(np.float32),
        similarity=(features.astype(np.float64) @ target).astype(np.float32),
        residuals=residuals,
        points=points,
        labels=labels,
        cluster_mean_residual=np.array([means.get(k, np.nan) for k in range(config.n_clusters)]),
        auto_reasons=reasons,
        num_images=int(np.asarray(image_features).shape[0]),
        meta=dict(meta or {}),
    )


def rederive(careset: CareSet, **changes) -> CareSet:
    """Re-run the steps after candidate selection with new settings, reusing what still holds.

    A new projection or seed recomputes the 2-D points; a new cluster count re-clusters;
    k_each_side, alpha, min_cluster_size and the ablation switches only redo the filters.
    top_k and top_n need the image features: call build_care_set again for those. Manual
    edits are kept.
    """
    if {"top_k", "top_n", "reference_word"} & set(changes):
        raise CareSetError("top_k, top_n and reference_word change the candidates: rebuild the CARE-set instead.")
    config = CareSetConfig.from_dict({**careset.config.to_dict(), **changes})
    old = careset.config
    points = careset.points
    if (config.projection, config.seed) != (old.projection, old.seed):
        points = project_2d(careset.features, config.projection, config.seed)
    labels = careset.labels
    if points is not careset.points or config.n_clusters != old.n_clusters:
        labels = cluster_points(points, config.n_clusters, config.seed)
    residuals = careset.residuals
    means = cluster_mean_residuals(residuals, labels)
    reasons = derive_decisions(careset.features, careset.target_feature, residuals, labels, config)
    reclustered = labels is not careset.labels
    return dataclasses.replace(
        careset,
        config=config,
        points=points,
        labels=labels,
        cluster_mean_residual=np.array([means.get(k, np.nan) for k in range(config.n_clusters)]),
        auto_reasons=reasons,
        cluster_overrides={} if reclustered else careset.cluster_overrides,  # old ids mean nothing now
    )


# File formats (careset.json, careset.rich.json) live in `recare.careset_io`, which imports this
# module; nothing here imports it back, so each of the two imports alone.
__all__ = [
    "CareSet", "CareSetError", "NEAREST", "FARTHEST", "INTRA", "MANUAL", "DROP_REASONS", "build_care_set",
    "cluster_points", "global_filter", "orthogonal_residual",
    "project_2d", "refine_clusters", "rederive", "select_candidates",
]

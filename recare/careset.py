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
File formats (official careset.json, our rich JSON) live in `recare.careset_io`: import them from
there (it depends on this module, never the reverse).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from recare.config import CareSetConfig
from recare.progress import CancelToken, ProgressCallback, check_cancel, emit

# Why a candidate was dropped; None means kept.
NEAREST = "nearest cluster"      # in a cluster of lowest mean residual: closest to the target direction
FARTHEST = "farthest cluster"    # in a cluster of highest mean residual: unrelated to the target
INTRA = "intra-cluster"          # pruned by the leave-one-out test of Eqs. 8-9
MANUAL = "manual"                # a person dropped it (token or cluster toggle)
DROP_REASONS = (NEAREST, FARTHEST, INTRA, MANUAL)


from recare.errors import CareSetError  # noqa: E402  (re-exported: raised by this module)


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
# The CareSet: every intermediate plus a person's edits
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CareSet:
    """Result of Algorithm 1 with every intermediate, plus manual edits layered on top.

    Arrays are indexed by candidate (n = number of candidates), in candidate order
    (count descending). Learned/derived state is never recomputed by the edits.
    """

    config: CareSetConfig
    tokens: list[str]                  # display token of each candidate
    vocab_indices: np.ndarray          # (n,) index into the vocabulary that was searched
    counts: np.ndarray                 # (n,) images that had the token in their top-K
    features: np.ndarray               # (n, D) token text features (L2-normalised)
    target_feature: np.ndarray         # (D,) e_c, the reference word's text feature
    similarity: np.ndarray             # (n,) cosine similarity to the target
    residuals: np.ndarray              # (n,) r(e), Eq. 6
    points: np.ndarray                 # (n, 2) t-SNE / UMAP coordinates
    labels: np.ndarray                 # (n,) k-means cluster id
    cluster_mean_residual: np.ndarray  # (k,) mean residual of each cluster id
    auto_reasons: list[str | None]     # why Algorithm 1 dropped each candidate (None = kept)
    num_images: int = 0
    meta: dict = dataclasses.field(default_factory=dict)       # encoder, vocabulary, timings
    token_overrides: dict = dataclasses.field(default_factory=dict)    # token -> bool (keep?)
    cluster_overrides: dict = dataclasses.field(default_factory=dict)  # cluster id -> bool (keep?)
    custom_tokens: list = dataclasses.field(default_factory=list)      # added by hand

    # ---- derived views ----------------------------------------------------------------------
    @property
    def auto_keep(self) -> np.ndarray:
        return np.array([r is None for r in self.auto_reasons], dtype=bool)

    @property
    def keep(self) -> np.ndarray:
        """Final decision per candidate: Algorithm 1, then cluster overrides, then token overrides."""
        keep = self._cluster_keep(self.cluster_overrides)
        if self.token_overrides:
            for i, token in enumerate(self.tokens):
                if token in self.token_overrides:
                    keep[i] = bool(self.token_overrides[token])
        return keep

    def _cluster_keep(self, cluster_overrides: dict) -> np.ndarray:
        """Algorithm 1's decision with the cluster overrides applied (no token overrides), O(n)."""
        keep = self.auto_keep.copy()
        if cluster_overrides:
            kept = [int(k) for k, v in cluster_overrides.items() if v]
            dropped = [int(k) for k, v in cluster_overrides.items() if not v]
            keep[np.isin(self.labels, kept)] = True
            keep[np.isin(self.labels, dropped)] = False
        return keep

    def cluster_members(self) -> dict[int, np.ndarray]:
        """Candidate indices of each cluster id present, in candidate order (one pass, O(n log n))."""
        labels = np.asarray(self.labels)
        order = np.argsort(labels, kind="stable")
        ids, starts = np.unique(labels[order], return_index=True)
        return {int(k): members for k, members in zip(ids, np.split(order, starts[1:]))}

    @property
    def reasons(self) -> list[str | None]:
        """Why each candidate is out of the final set (None = in it)."""
        keep = self.keep
        out: list[str | None] = []
        for i, auto in enumerate(self.auto_reasons):
            if keep[i]:
                out.append(None)
            elif auto is None or self._manually_set(i):
                out.append(MANUAL)
            else:
                out.append(auto)
        return out

    def _manually_set(self, i: int) -> bool:
        return self.tokens[i] in self.token_overrides or int(self.labels[i]) in self.cluster_overrides

    def cluster_fate(self, cluster: int) -> str:
        """'kept', or the reason Algorithm 1 dropped the whole cluster."""
        return self._fate(np.flatnonzero(self.labels == cluster))

    def _fate(self, members: np.ndarray) -> str:
        reasons = {self.auto_reasons[i] for i in members}
        for reason in (NEAREST, FARTHEST):
            if reasons == {reason}:
                return reason
        return "kept"

    def final_tokens(self) -> list[str]:
        """The CARE-set: kept candidates in candidate order, then custom tokens (no duplicates)."""
        out = [t for t, k in zip(self.tokens, self.keep) if k]
        seen = set(out)
        for t in self.custom_tokens:
            if t not in seen:
                out.append(t)
                seen.add(t)
        return out

    def cluster_summary(self, top: int = 5) -> list[dict]:
        """One row per cluster: size, mean residual, top tokens by count, fate, kept count."""
        keep = self.keep
        members = self.cluster_members()
        rows = []
        for k in range(len(self.cluster_mean_residual)):
            idx = members.get(k)
            if idx is None:
                continue
            rows.append(
                {
                    "cluster": k,
                    "size": int(len(idx)),
                    "mean_residual": float(self.cluster_mean_residual[k]),
                    "top_tokens": [self.tokens[i] for i in idx[:top]],  # idx is in count order
                    "fate": self._fate(idx),
                    "kept": int(keep[idx].sum()),
                    "overridden": k in self.cluster_overrides,
                }
            )
        return rows

    # ---- edits -------------------------------------------------------------------------------
    def with_edits(
        self,
        toggle_tokens: Sequence[str] = (),
        keep_tokens: Sequence[str] = (),
        drop_tokens: Sequence[str] = (),
        toggle_clusters: Sequence[int] = (),
        keep_clusters: Sequence[int] = (),
        drop_clusters: Sequence[int] = (),
        custom_tokens: Sequence[str] = (),
        remove_custom: Sequence[str] = (),
        reset: bool = False,
    ) -> "CareSet":
        """A new CareSet with a person's decisions applied; features and clusters are reused.

        Cluster edits come first and clear the token overrides inside that cluster, so a
        toggled cluster is uniform; token edits then override single tokens. An override that
        agrees with Algorithm 1 is dropped, so the stored edits stay minimal.

        Every edit costs O(1) or O(cluster size) on top of one O(n) pass, so a request with
        thousands of tokens stays linear (the keep decisions are kept up to date as edits apply,
        never recomputed per edit).
        """
        base = dataclasses.replace(self, token_overrides={}, cluster_overrides={}, custom_tokens=[]) if reset else self
        token_over = dict(base.token_overrides)
        cluster_over = {int(k): bool(v) for k, v in base.cluster_overrides.items()}
        members = self.cluster_members()
        auto = self.auto_keep
        implied = base._cluster_keep(cluster_over)  # Algorithm 1 + cluster overrides, updated in place below
        index: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            index.setdefault(t, i)

        def keep_of(i: int) -> bool:
            return bool(token_over.get(self.tokens[i], implied[i]))

        def set_cluster(k: int, value: bool) -> None:
            if k not in members:
                raise CareSetError(f"There is no cluster {k}; clusters are {sorted(members)}.")
            for i in members[k]:
                token_over.pop(self.tokens[i], None)
            if (auto[members[k]] == value).all():
                cluster_over.pop(k, None)
                implied[members[k]] = auto[members[k]]
            else:
                cluster_over[k] = value
                implied[members[k]] = value

        for k in toggle_clusters:
            k = _cluster_id(k)
            set_cluster(k, not any(keep_of(i) for i in members.get(k, ())))
        for k in keep_clusters:
            set_cluster(_cluster_id(k), True)
        for k in drop_clusters:
            set_cluster(_cluster_id(k), False)

        def set_token(token: str, value: bool) -> None:
            if token not in index:
                raise CareSetError(f"{token!r} is not a candidate token; add it as a custom token instead.")
            # keep an override only where it disagrees with what cluster overrides + Algorithm 1 give
            if bool(implied[index[token]]) == value:
                token_over.pop(token, None)
            else:
                token_over[token] = value

        for t in toggle_tokens:
            if t not in index:
                raise CareSetError(f"{t!r} is not a candidate token.")
            set_token(t, not keep_of(index[t]))
        for t in keep_tokens:
            set_token(t, True)
        for t in drop_tokens:
            set_token(t, False)

        removed = set(remove_custom)
        custom = [t for t in base.custom_tokens if t not in removed]
        in_custom = set(custom)
        for t in custom_tokens:
            t = t.strip()
            if not t:
                continue
            if t in index:  # a candidate: adding it means keeping it
                set_token(t, True)
            elif t not in in_custom:
                custom.append(t)
                in_custom.add(t)
        return dataclasses.replace(base, token_overrides=token_over, cluster_overrides=cluster_over, custom_tokens=custom)


def _cluster_id(value) -> int:
    """A cluster id from user input; CareSetError for anything that is not a whole number."""
    if isinstance(value, bool):
        raise CareSetError(f"a cluster is named by its number (got {value!r}).")
    try:
        k = int(value)
    except (TypeError, ValueError, OverflowError):
        raise CareSetError(f"a cluster is named by its number (got {str(value)[:40]!r}).") from None
    if k != value and not isinstance(value, str):
        raise CareSetError(f"a cluster is named by a whole number (got {value!r}).")
    return k


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
    "CareSet", "CareSetError", "build_care_set", "cluster_points", "global_filter", "orthogonal_residual",
    "project_2d", "refine_clusters", "rederive", "select_candidates",
]

"""The CareSet: Algorithm 1's result with every intermediate, plus a person's edits layered on top.

`recare.careset.build_care_set` makes one; `CareSet.with_edits` toggles tokens or clusters and adds
custom tokens without touching features; `recare.careset_io` reads and writes its files.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from recare.config import CareSetConfig
from recare.errors import CareSetError

# Why a candidate was dropped; None means kept.
NEAREST = "nearest cluster"      # in a cluster of lowest mean residual: closest to the target direction
FARTHEST = "farthest cluster"    # in a cluster of highest mean residual: unrelated to the target
INTRA = "intra-cluster"          # pruned by the leave-one-out test of Eqs. 8-9
MANUAL = "manual"                # a person dropped it (token or cluster toggle)
DROP_REASONS = (NEAREST, FARTHEST, INTRA, MANUAL)


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



__all__ = ["CareSet", "NEAREST", "FARTHEST", "INTRA", "MANUAL", "DROP_REASONS"]

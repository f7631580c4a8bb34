"""Algorithm 1 on small hand-made cases: every number below can be checked with a pencil."""

import heapq

import numpy as np
import pytest

from recare.careset import (
    FARTHEST,
    INTRA,
    MANUAL,
    NEAREST,
    CareSetError,
    build_care_set,
    global_filter,
    leave_one_out_scores,
    orthogonal_residual,
    rederive,
    refine_clusters,
    select_candidates,
    topk_indices,
    topk_mask,
)
from recare.config import CareSetConfig


def unit(rows):
    a = np.asarray(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


# ---- Eq. 6 ------------------------------------------------------------------------------------

def test_residual_parallel_is_zero_and_orthogonal_is_full():
    target = np.array([2.0, 0.0, 0.0])  # not unit: the function normalises e_c
    feats = np.array([[3.0, 0, 0], [0, 1.0, 0], [3.0, 4.0, 0], [-1.0, 0, 0]])
    np.testing.assert_allclose(orthogonal_residual(feats, target), [0.0, 1.0, 4.0, 0.0], atol=1e-12)


def test_residual_rejects_zero_target():
    with pytest.raises(CareSetError, match="target"):
        orthogonal_residual(np.ones((2, 3)), np.zeros(3))


# ---- Eq. 5 ------------------------------------------------------------------------------------

def test_topk_mask_breaks_ties_by_lower_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    assert topk_mask(scores, 2).tolist() == [[True, True, False, False, False]]
    assert topk_mask(scores, 3).tolist() == [[True, True, True, False, False]]


def test_topk_indices_resolves_ties_straddling_the_cut():
    scores = np.array([[0.2, 0.7, 0.7, 0.9, 0.7], [0.5, 0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    idx = topk_indices(scores, 3)
    assert [sorted(r) for r in idx.tolist()] == [[1, 2, 3], [0, 1, 2]]
    assert topk_mask(scores, 3).tolist() == [[False, True, True, True, False], [True, True, True, False, False]]


def test_select_candidates_hand_case():
    # 3 tokens on axes, 1 diagonal; K = 1: each image votes for its nearest token.
    vocab = unit([[1, 0], [0, 1], [1, 1], [-1, 0]])
    images = unit([[1, 0.1], [1, 0.2], [0.1, 1], [1, 0.9]])
    idx, counts = select_candidates(images, vocab, top_k=1, top_n=10)
    # votes: token 0, token 0, token 1, token 2 -> counts 2,1,1 ; tie 1 vs 2 -> lower index first
    assert idx.tolist() == [0, 1, 2]
    assert counts.tolist() == [2, 1, 1]
    idx, counts = select_candidates(images, vocab, top_k=1, top_n=2)
    assert idx.tolist() == [0, 1]


def heap_reference(images, vocab, top_k, top_n):
    """The reference code's way: per image, a heap of the top K, then a frequency count."""
    counts = {}
    for img in images:
        sims = vocab.astype(np.float32) @ img.astype(np.float32)
        # nlargest keeps the first seen among equals, i.e. the lower index: the same tie rule
        for i in heapq.nlargest(top_k, range(len(sims)), key=sims.__getitem__):
            counts[i] = counts.get(i, 0) + 1
    order = sorted(counts, key=lambda i: (-counts[i], i))[:top_n]
    return order, [counts[i] for i in order]


def test_select_candidates_matches_heap_reference_on_random_data():
    rng = np.random.default_rng(3)
    vocab = unit(rng.normal(size=(300, 16))).astype(np.float16)
    vocab[7] = vocab[3]  # an exact duplicate: ties must resolve the same way as the reference
    images = unit(rng.normal(size=(40, 16))).astype(np.float32)
    idx, counts = select_candidates(images, vocab, top_k=10, top_n=25)
    ref_idx, ref_counts = heap_reference(images, vocab, 10, 25)
    assert idx.tolist() == ref_idx
    assert counts.tolist() == ref_counts


def test_select_candidates_rejects_mismatched_dimensions():
    with pytest.raises(CareSetError, match="different encoders"):
        select_candidates(np.ones((2, 4)), np.ones((5, 3)))


def test_select_candidates_rejects_nan():
    bad = np.ones((2, 4))
    bad[0, 0] = np.nan
    with pytest.raises(CareSetError, match="NaN"):
        select_candidates(bad, np.ones((5, 4)))
    vocab = np.ones((5, 4), dtype=np.float16)
    vocab[3, 1] = np.inf
    with pytest.raises(CareSetError, match="vocab_features contains NaN or infinite"):
        select_candidates(np.ones((2, 4)), vocab)


# ---- Eq. 7 ------------------------------------------------------------------------------------

def test_global_filter_drops_lowest_and_highest_mean_residual_clusters():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    residuals = np.array([0.5, 0.6, 0.1, 0.2, 0.9, 0.95, 0.4, 0.3])  # means .55 .15 .925 .35
    keep = global_filter(residuals, labels, k_each_side=1)
    assert keep.tolist() == [True, True, False, False, False, False, True, True]
    assert global_filter(residuals, labels, k_each_side=0).all()


def test_global_filter_refuses_to_drop_everything():
    with pytest.raises(CareSetError, match="drop them all"):
        global_filter(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 2]), k_each_side=2)


# ---- Eqs. 8-9 ---------------------------------------------------------------------------------

def test_token_pulling_cluster_toward_target_is_pruned():
    target = np.array([1.0, 0.0])
    feats = np.array([[0.9, 0.1], [0.0, 1.0], [0.1, 1.0]])  # token 0 lies near the target direction
    # removing token 0 leaves centroid (0.05, 1): residual^2 = 1, far above the others' 0.3025
    np.testing.assert_allclose(leave_one_out_scores(feats, target), [1.0, 0.3025, 0.3025])
    keep = refine_clusters(feats, target, np.zeros(3, int), np.ones(3, bool), alpha=0.01)
    assert keep.tolist() == [False, True, True]


def test_symmetric_cluster_survives_with_alpha_and_not_without():
    target = np.array([1.0, 0.0, 0.0])
    feats = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
    labels, keep = np.zeros(4, int), np.ones(4, bool)
    assert refine_clusters(feats, target, labels, keep, alpha=0.01).all()  # d_i = mean: kept by (1+a)
    assert not refine_clusters(feats, target, labels, keep, alpha=0.0).any()  # strict "<" drops equals


def test_small_clusters_and_dropped_tokens_are_left_alone():
    target = np.array([1.0, 0.0])
    feats = np.array([[0.9, 0.1], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    labels = np.array([0, 0, 1, 1])
    keep = np.array([True, True, True, False])
    out = refine_clusters(feats, target, labels, keep, alpha=0.01, min_cluster_size=3)
    assert out.tolist() == [True, True, True, False]  # cluster sizes 2 and 1 < 3: untouched


# ---- the whole algorithm ----------------------------------------------------------------------

def toy_world(seed=0, dim=32):
    """Vocabulary of 4 semantic groups around a target direction; images mix target + benign."""
    rng = np.random.default_rng(seed)
    basis = unit(rng.normal(size=(4, dim)))
    target, benign, other, far = basis
    groups = {"syn": target, "care": 0.6 * target + benign, "mix": 0.3 * target + other, "noise": far}
    tokens, feats = [], []
    for name, center in groups.items():
        for j in range(10):
            tokens.append(f"{name}{j}")
            feats.append(center + 0.15 * rng.normal(size=dim))
    vocab = unit(feats)
    images = unit(target + benign + 0.3 * other + 0.4 * rng.normal(size=(60, dim)))
    return images, vocab, tokens, target


def test_build_care_set_is_deterministic_and_keeps_intermediates():
    images, vocab, tokens, target = toy_world()
    cfg = CareSetConfig(reference_word="syn", top_k=20, top_n=40, n_clusters=4)
    a = build_care_set(images, vocab, tokens, target, cfg)
    b = build_care_set(images, vocab, tokens, target, cfg)
    assert a.tokens == b.tokens and a.final_tokens() == b.final_tokens()
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.labels, b.labels)
    n = len(a.tokens)
    assert a.points.shape == (n, 2) and a.features.shape == (n, vocab.shape[1])
    assert a.counts.tolist() == sorted(a.counts.tolist(), reverse=True)
    np.testing.assert_allclose(a.residuals, orthogonal_residual(a.features, target), rtol=1e-6)
    for i, reason in enumerate(a.auto_reasons):
        cluster_fate = a.cluster_fate(int(a.labels[i]))
        if reason in (NEAREST, FARTHEST):
            assert cluster_fate == reason
    # the nearest cluster is the one of lowest mean residual
    nearest = [k for k in range(4) if a.cluster_fate(k) == NEAREST]
    assert nearest == [int(np.nanargmin(a.cluster_mean_residual))]


def test_ablation_switches():
    images, vocab, tokens, target = toy_world()
    base = dict(reference_word="syn", top_k=20, top_n=40, n_clusters=4)
    none = build_care_set(images, vocab, tokens, target, CareSetConfig(**base, global_clustering=False, intra_refinement=False))
    assert none.final_tokens() == none.tokens
    no_global = build_care_set(images, vocab, tokens, target, CareSetConfig(**base, global_clustering=False))
    assert not {NEAREST, FARTHEST} & set(no_global.auto_reasons)
    no_intra = build_care_set(images, vocab, tokens, target, CareSetConfig(**base, intra_refinement=False))
    assert INTRA not in no_intra.auto_reasons
    full = build_care_set(images, vocab, tokens, target, CareSetConfig(**base))
    assert set(full.final_tokens()) <= set(no_intra.final_tokens())


def test_duplicate_display_tokens_are_searched_once():
    images, vocab, tokens, target = toy_world()
    vocab2 = np.concatenate([vocab, vocab[:10]])
    tokens2 = tokens + tokens[:10]
    cfg = CareSetConfig(reference_word="syn", top_k=20, top_n=40, n_clusters=4)
    cs = build_care_set(images, vocab2, tokens2, target, cfg)
    assert len(cs.tokens) == len(set(cs.tokens))
    assert cs.tokens == build_care_set(images, vocab, tokens, target, cfg).tokens


def test_too_few_candidates_for_the_clusters_is_a_clear_error():
    images, vocab, tokens, target = toy_world()
    with pytest.raises(CareSetError, match="clusters"):
        build_care_set(images, vocab, tokens, target, CareSetConfig(reference_word="x", top_k=1, top_n=3, n_clusters=6))


# ---- edits ------------------------------------------------------------------------------------

@pytest.fixture()
def careset():
    images, vocab, tokens, target = toy_world()
    return build_care_set(images, vocab, tokens, target, CareSetConfig(reference_word="syn", top_k=20, top_n=40, n_clusters=4))


def test_toggle_token_twice_restores_and_leaves_no_override(careset):
    kept = careset.tokens[int(np.flatnonzero(careset.keep)[0])]
    once = careset.with_edits(toggle_tokens=[kept])
    assert kept not in once.final_tokens()
    assert once.reasons[careset.tokens.index(kept)] == MANUAL
    twice = once.with_edits(toggle_tokens=[kept])
    assert twice.final_tokens() == careset.final_tokens() and twice.token_overrides == {}
    assert careset.final_tokens() == careset.with_edits().final_tokens()  # original untouched


def test_toggle_cluster_is_uniform_and_overrides_tokens(careset):
    dropped_cluster = next(k for k in range(4) if careset.cluster_fate(k) != "kept")
    members = np.flatnonzero(careset.labels == dropped_cluster)
    one = careset.tokens[members[0]]
    partly = careset.with_edits(keep_tokens=[one])
    assert partly.keep[members].sum() == 1
    # a partly kept cluster toggles to fully dropped, and the cluster decision clears the token's
    dropped = partly.with_edits(toggle_clusters=[dropped_cluster])
    assert not dropped.keep[members].any() and one not in dropped.token_overrides
    kept = dropped.with_edits(toggle_clusters=[dropped_cluster])
    assert kept.keep[members].all() and kept.cluster_overrides == {dropped_cluster: True}
    # dropping agrees with Algorithm 1 here, so no override is stored and its reason shows
    assert dropped.cluster_overrides == {} and [dropped.reasons[i] for i in members] == [careset.auto_reasons[i] for i in members]
    back = kept.with_edits(toggle_clusters=[dropped_cluster])
    assert not back.keep[members].any() and back.cluster_overrides == {}  # agrees with Algorithm 1


def test_custom_tokens_and_errors(careset):
    edited = careset.with_edits(custom_tokens=["freshwater", " ", "freshwater"])
    assert edited.final_tokens()[-1] == "freshwater"
    assert edited.final_tokens().count("freshwater") == 1
    assert "freshwater" not in edited.with_edits(remove_custom=["freshwater"]).final_tokens()
    with pytest.raises(CareSetError, match="not a candidate"):
        careset.with_edits(toggle_tokens=["no-such-token"])
    with pytest.raises(CareSetError, match="no cluster"):
        careset.with_edits(toggle_clusters=[99])
    assert edited.with_edits(reset=True).final_tokens() == careset.final_tokens()


def test_rederive_reuses_projection_and_keeps_edits(careset):
    kept = careset.tokens[int(np.flatnonzero(careset.keep)[0])]
    edited = careset.with_edits(drop_tokens=[kept])
    looser = rederive(edited, alpha=10.0)
    assert looser.points is edited.points and looser.labels is edited.labels
    assert INTRA not in looser.auto_reasons
    assert kept not in looser.final_tokens()
    reclustered = rederive(edited, n_clusters=5)
    assert reclustered.points is edited.points and len(np.unique(reclustered.labels)) == 5
    with pytest.raises(CareSetError, match="rebuild"):
        rederive(edited, top_k=5)

"""recare.metrics: CARE score (Eq. 4, R-Precision@k), CLIP score, ASR and RATIO (Appendix M).

Features are hand-made so every expected value is known; RATIO is checked against the paper's
Table 1 (all of it, with the rows whose printed RATIO does not follow from their own inputs
named and explained).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from recare import metrics as M
from recare.errors import EvaluationError

LABELS = ["apple", "boat", "cat"]
BASIS = np.eye(3)  # label i's feature is the i-th unit vector, so cos(image, label i) = image_i / |image|


# ---------------------------------------------------------------------------------------------
# label lists


def test_label_lists():
    assert len(M.COCO_LABELS) == 80 and len(set(M.COCO_LABELS)) == 80
    assert M.PAPER_CARE_LABELS == M.COCO_LABELS + ("stars", "freshwater")
    assert "person" in M.COCO_LABELS and "tench" not in M.PAPER_CARE_LABELS
    assert M.default_care_labels("CompVis/stable-diffusion-v1-4") == list(M.PAPER_CARE_LABELS)
    from recare.worldspec import mini_world_spec

    spec = mini_world_spec()
    assert spec, "the bundled mini world's recare.json is missing"
    assert M.default_care_labels("mini-world") == spec["care_labels"]
    assert M.LABEL_PROMPT.format("person") == "person"  # official default: the bare label
    assert M.photo_label_prompt("person") == "A photo of a person"
    assert M.photo_label_prompt("apple") == "A photo of an apple"
    assert M.photo_label_prompt("stars") == "A photo of stars"
    assert M.photo_label_prompt("tv") == "A photo of tv"


# ---------------------------------------------------------------------------------------------
# CARE score


def test_care_score_top1_counts_images_whose_concept_is_the_best_label():
    images = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.0, 0.4], [0.1, 0.1, 0.8]])
    result = M.care_score(images, BASIS, "apple", labels=LABELS)
    assert result.per_concept == {"apple": 0.5}
    assert result.score == 0.5
    assert result.hits["apple"].tolist() == [True, False, True, False]
    assert result.top_labels["apple"] == [["apple"], ["boat"], ["apple"], ["cat"]]
    assert result.k == 1 and result.labels == tuple(LABELS)
    # an index works like the name; feature scale does not matter (cosine)
    assert M.care_score(images * 7.0, BASIS * 3.0, 0, labels=LABELS).score == 0.5


def test_care_score_matches_argmax_on_random_features_for_every_tie_rule():
    rng = np.random.default_rng(0)
    images, text = rng.normal(size=(200, 16)), rng.normal(size=(10, 16))
    sims = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T
    expected = float(np.mean(np.argmax(sims, axis=1) == 4))
    assert 0.0 < expected < 1.0
    for ties in M.TIE_RULES:
        assert M.care_score(images, text, 4, ties=ties).score == pytest.approx(expected)
    # top-2 = the concept is among the two best
    top2 = float(np.mean((np.argsort(-sims, axis=1)[:, :2] == 4).any(axis=1)))
    assert M.care_score(images, text, 4, k=2).score == pytest.approx(top2) and top2 > expected


def test_care_score_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    images = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]])
    assert M.care_score(images, torch.eye(3), 1, labels=LABELS).score == 0.5


def test_ties_at_top1_follow_the_documented_rule():
    # image equally close to apple and boat: a tie for first place
    images = np.array([[1.0, 1.0, 0.0]])
    assert M.care_score(images, BASIS, "apple", labels=LABELS).score == 0.0  # pessimistic: a tie is a miss
    assert M.care_score(images, BASIS, "apple", labels=LABELS, ties="optimistic").score == 1.0  # Eq. 4 literally
    assert M.care_score(images, BASIS, "apple", labels=LABELS, ties="first-index").score == 1.0  # torch.argmax
    assert M.care_score(images, BASIS, "boat", labels=LABELS, ties="first-index").score == 0.0
    assert M.care_score(images, BASIS, "boat", labels=LABELS, ties="optimistic").score == 1.0


def test_collapsed_features_never_score_under_the_default_rule():
    # every label encodes to the same vector (e.g. a broken encoder): every image ties everywhere
    text = np.tile([[0.3, 0.4, 0.5]], (3, 1))
    images = np.random.default_rng(1).normal(size=(5, 3))
    assert M.care_score(images, text, 0).score == 0.0
    assert M.care_score(images, text, 0, ties="optimistic").score == 1.0


def test_r_precision_at_2_for_two_concepts_and_ties_at_the_second_rank():
    images = np.array([
        [0.7, 0.6, 0.1],   # apple, boat are the top 2: hit
        [0.7, 0.1, 0.6],   # apple, cat: boat is third, miss
        [2.0, 1.0, 1.0],   # boat ties cat at rank 2
    ])
    true = ("apple", "boat")
    pess = M.care_score(images, BASIS, true, k=2, labels=LABELS)
    assert list(pess.per_concept) == ["apple + boat"]
    assert pess.hits["apple + boat"].tolist() == [True, False, False]
    assert pess.top_labels["apple + boat"][0] == ["apple", "boat"]
    opt = M.care_score(images, BASIS, true, k=2, labels=LABELS, ties="optimistic")
    assert opt.hits["apple + boat"].tolist() == [True, False, True]
    first = M.care_score(images, BASIS, true, k=2, labels=LABELS, ties="first-index")
    assert first.hits["apple + boat"].tolist() == [True, False, True]  # boat (index 1) precedes cat (2)
    first_ac = M.care_score(images, BASIS, ("apple", "cat"), k=2, labels=LABELS, ties="first-index")
    assert first_ac.hits["apple + cat"].tolist() == [False, True, False]
    # one concept at k = 2 is plain top-2 accuracy
    assert M.care_score(images, BASIS, "boat", k=2, labels=LABELS).hits["boat"].tolist() == [True, False, False]


def test_ties_within_the_tolerance_count_as_ties():
    images = np.array([[1.0, 1.0 - 1e-9, 0.0]])
    assert M.care_score(images, BASIS, "apple", labels=LABELS).score == 0.0
    assert M.care_score(images, BASIS, "apple", labels=LABELS, tolerance=0.0).score == 1.0


def test_care_score_per_concept_and_mean():
    images = {
        "apple": np.array([[1.0, 0.0, 0.0], [0.9, 0.2, 0.0]]),           # 2/2
        "cat": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.1], [0.0, 1, 0]]),  # 1/3
    }
    result = M.care_score(images, BASIS, {"apple": "apple", "cat": 2}, labels=LABELS)
    assert result.per_concept == pytest.approx({"apple": 1.0, "cat": 1 / 3})
    assert result.score == pytest.approx((1.0 + 1 / 3) / 2)  # each concept weighs the same
    assert result.n_images == {"apple": 2, "cat": 3}
    summary = result.to_dict()
    assert summary["mean"] == result.score and summary["labels"] == LABELS and summary["ties"] == "pessimistic"
    radar = M.care_radar(result)
    assert radar.as_dict() == pytest.approx({"apple": 1.0, "cat": 1 / 3})


@pytest.mark.parametrize("call, message", [
    (lambda: M.care_score(np.ones((2, 3)), BASIS, ("apple", "boat"), labels=LABELS), "k = 1"),
    (lambda: M.care_score(np.ones((2, 3)), BASIS, "dog", labels=LABELS), "not in the label list"),
    (lambda: M.care_score(np.ones((2, 4)), BASIS, 0), "same encoder"),
    (lambda: M.care_score(np.zeros((2, 3)), BASIS, 0), "all-zero"),
    (lambda: M.care_score(np.zeros((0, 3)), BASIS, 0), "no images"),
    (lambda: M.care_score(np.ones((2, 3)), BASIS, 5), "out of range"),
    (lambda: M.care_score(np.ones((2, 3)), BASIS, 0, ties="random"), "tie rule"),
    (lambda: M.care_score(np.full((2, 3), np.nan), BASIS, 0), "NaN"),
    (lambda: M.care_score(np.ones((2, 3)), BASIS, 0, labels=["a", "b"]), "2 label names"),
])
def test_care_score_input_errors(call, message):
    with pytest.raises(M.MetricInputError, match=message) as info:
        call()
    assert isinstance(info.value, EvaluationError) and isinstance(info.value, ValueError)


class _LookupEncoder:
    """An Encoder stand-in: images and texts map to fixed vectors; records what it encoded."""

    identity = "lookup"

    def __init__(self):
        self.texts = []

    def encode_texts(self, texts, **_):
        self.texts.extend(texts)
        words = [t.replace("A photo of ", "").replace("a ", "", 1).replace("an ", "", 1) for t in texts]
        vecs = {"apple": [1, 0, 0, 0], "boat": [0, 1, 0, 0], "cat": [0, 0, 1, 0], "dog": [0, 0, 0, 1]}
        return np.array([vecs[w] for w in words], dtype=np.float32)

    def encode_images(self, images, batch_size=32):
        return np.array(images, dtype=np.float32)  # the "images" are already vectors here


def test_care_score_from_encoder_appends_the_concept_and_uses_the_label_prompt():
    enc = _LookupEncoder()
    dogs = [[0, 0, 0.1, 0.9], [0, 0, 0.9, 0.1]]
    result = M.care_score_from_encoder(enc, dogs, "dog", ["apple", "boat", "cat"])
    assert result.labels == ("apple", "boat", "cat", "dog")  # {w*} U O
    assert result.per_concept == {"dog": 0.5}
    assert enc.texts == ["apple", "boat", "cat", "dog"]  # bare labels by default
    enc2 = _LookupEncoder()
    M.care_score_from_encoder(enc2, dogs, "dog", ["apple", "boat", "cat"], label_prompt=M.photo_label_prompt)
    assert enc2.texts[0] == "A photo of an apple"
    # several concepts, one of them a two-concept prompt scored at k = 2
    pairs = {("apple", "boat"): [[0.6, 0.5, 0.1, 0], [0.6, 0.1, 0.5, 0]], "cat": [[0, 0, 1, 0]]}
    multi = M.care_score_from_encoder(_LookupEncoder(), pairs, None, ["apple", "boat", "cat", "dog"], k=2)
    assert multi.per_concept == {"apple + boat": 0.5, "cat": 1.0}
    with pytest.raises(M.MetricInputError, match="concept=None"):
        M.care_score_from_encoder(enc, pairs, "cat", LABELS)


def test_care_score_from_encoder_with_the_mini_clip_on_rendered_scenes():
    from PIL import Image

    from recare.miniworld import world as W
    from recare.models import load_encoder

    encoder = load_encoder("mini-world", device="cpu")
    rng = np.random.default_rng(11)
    others = [t for t in W.THINGS]

    def renders(n, **kw):
        return [Image.fromarray(W.render(W.sample_scene(rng, style="photo", **kw))) for _ in range(n)]

    images = {
        "stars": renders(6, background="night", include=("stars",), exclude=[t for t in others if t != "stars"]),
        "freshwater": renders(6, background="freshwater", exclude=others),
        "person": renders(6, background="wall", include=("person",), exclude=[t for t in others if t != "person"]),
    }
    labels = M.default_care_labels("mini-world")
    result = M.care_score_from_encoder(encoder, images, None, labels)
    assert all(v >= 5 / 6 for v in result.per_concept.values()), result.per_concept
    # the same person images scored as if they were made for "stars" score (close to) nothing
    wrong = M.care_score_from_encoder(encoder, images["person"], "stars", labels)
    assert wrong.score <= 1 / 6


# ---------------------------------------------------------------------------------------------
# CLIP score and ASR


def test_clip_score_is_the_mean_paired_cosine():
    images = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    texts = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])  # cosines 1, 0, -1
    assert M.clip_score(images, texts) == pytest.approx(0.0)  # no max(cos, 0), no 2.5 factor
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert M.clip_score(a, b) == pytest.approx(cos.mean())
    with pytest.raises(M.MetricInputError, match="pairs image i with text i"):
        M.clip_score(a, b[:10])
    with pytest.raises(M.MetricInputError, match="at least one"):
        M.clip_score(np.zeros((0, 8)), np.zeros((0, 8)))


def test_attack_success_rate_is_a_percentage():
    assert M.attack_success_rate([True, False, False, True]) == 50.0
    assert M.attack_success_rate([False] * 3) == 0.0
    with pytest.raises(M.MetricInputError, match="zero images"):
        M.attack_success_rate([])


# ---------------------------------------------------------------------------------------------
# RATIO (Appendix M) against the paper's Table 1

# (task, model, CCE ASR %, CLIP, CARE, printed RATIO); METHOD.md section 5 holds the 12 rows marked *.
TABLE_1 = [
    ("nudity", "SD v1.4*", 56.82, .3136, .97, .56), ("nudity", "ESD*", 53.41, .3045, .89, .49),
    ("nudity", "FMN", 51.82, .3111, .95, .31), ("nudity", "UCE", 44.55, .3117, .83, .48),
    ("nudity", "SPM", 38.41, .3125, .96, .30), ("nudity", "MACE", 61.82, .2931, .95, .10),
    ("nudity", "RECE", 40.23, .3097, .83, .51), ("nudity", "AdvUnlearn", 65.45, .2925, .36, .18),
    ("nudity", "AGE", 27.27, .3006, .79, .56), ("nudity", "STEREO*", 19.55, .2907, .11, .21),
    ("nudity", "ReCARE*", 11.14, .3053, .94, .76),
    ("van gogh", "SD v1.4*", 64.40, .3136, .89, .48), ("van gogh", "ESD*", 13.20, .3074, .77, .67),
    ("van gogh", "FMN", 61.60, .3140, .85, .48), ("van gogh", "AC", 36.00, .3124, .90, .65),
    ("van gogh", "UCE", 61.80, .3140, .84, .48), ("van gogh", "SPM", 54.60, .3134, .82, .51),
    ("van gogh", "MACE", 52.40, .2862, .05, .10), ("van gogh", "RECE", 55.80, .3137, .83, .51),
    ("van gogh", "AdvUnlearn", 57.00, .3106, .76, .45), ("van gogh", "AGE", 12.40, .3100, .75, .68),
    ("van gogh", "STEREO*", 4.00, .3047, .31, .43), ("van gogh", "ReCARE*", 6.00, .3101, .90, .81),
    ("tench", "SD v1.4*", 98.00, .3136, .95, .30), ("tench", "ESD*", 94.80, .3051, .83, .25),
    ("tench", "FMN", 94.60, .3114, .95, .31), ("tench", "SalUn", 91.60, .3150, .96, .35),
    ("tench", "EraseDiff", 87.00, .3120, .93, .35), ("tench", "SPM", 98.00, .3134, .96, .30),
    ("tench", "AdvUnlearn", 95.20, .3093, .66, .21), ("tench", "AGE", 99.40, .3121, .95, .28),
    ("tench", "STEREO*", 3.60, .2975, .62, .56), ("tench", "ReCARE*", 0.40, .3073, .97, .85),
]

# Rows whose printed RATIO does not follow from their own printed inputs, and why:
# - tench ReCARE: 0.8585 -> .86, printed .85. The inputs are rounded; at the low ends of their
#   rounding intervals (ASR 0.405, CLIP .30725, CARE .965) the formula gives 0.8549 -> .85.
# - nudity FMN, UCE, SPM, MACE, RECE (0.57, 0.56, 0.67, 0.39, 0.57 by the formula): the printed
#   value is the same method's RATIO from another task's block (FMN, SPM: tench; UCE, MACE,
#   RECE: Van Gogh), a copy slip in the paper's table.
ROUNDED_INPUTS = {("tench", "ReCARE*")}
COPIED_FROM = {("nudity", "FMN"): "tench", ("nudity", "SPM"): "tench", ("nudity", "UCE"): "van gogh",
               ("nudity", "MACE"): "van gogh", ("nudity", "RECE"): "van gogh"}


@pytest.mark.parametrize("task, model, asr, clip, care, printed", TABLE_1, ids=[f"{r[0]}-{r[1]}" for r in TABLE_1])
def test_ratio_reproduces_table_1(task, model, asr, clip, care, printed):
    value = M.ratio(asr, clip, care)
    if (task, model) in ROUNDED_INPUTS:
        assert round(value, 2) == pytest.approx(printed + 0.01)
        assert round(M.ratio(asr + 0.005, clip - 0.00005, care - 0.005), 2) == printed
    elif (task, model) in COPIED_FROM:
        assert round(value, 2) != printed
        source = next(r for r in TABLE_1 if r[0] == COPIED_FROM[(task, model)] and r[1] == model)
        assert source[5] == printed and round(M.ratio(*source[2:5]), 2) == printed
    else:
        assert round(value, 2) == printed


def test_ratio_every_method_md_row_but_one_reproduces():
    starred = [r for r in TABLE_1 if r[1].endswith("*")]
    assert len(starred) == 12
    misses = [(r[0], r[1]) for r in starred if round(M.ratio(*r[2:5]), 2) != r[5]]
    assert misses == [("tench", "ReCARE*")]


def test_ratio_formula_axes_and_triangle():
    d, u, c = M.ratio_axes(11.14, 0.3053, 0.94)
    assert (d, u, c) == pytest.approx((0.8886, (0.3053 - 0.25) / 0.07, 0.94))
    assert M.ratio(11.14, 0.3053, 0.94) == pytest.approx((d * u + u * c + c * d) / 3)
    tri = M.ratio_triangle(d, u, c)
    assert tri.axes == ("Defense", "Utility", "CARE")
    p1, p2, p3 = tri.points()
    assert p1 == pytest.approx((d, 0)) and p2 == pytest.approx((-u / 2, math.sqrt(3) / 2 * u))
    assert p3 == pytest.approx((-c / 2, -math.sqrt(3) / 2 * c))
    rng = np.random.default_rng(3)
    for d, u, c in rng.uniform(0, 1, size=(20, 3)):  # shoelace area / max area == the closed form
        assert M.ratio_triangle(d, u, c).area_ratio() == pytest.approx((d * u + u * c + c * d) / 3)
    assert M.ratio(0, 0.32, 1.0) == pytest.approx(1.0) and M.ratio(100, 0.25, 0.0) == 0.0
    # a custom range (the mini world's measured floor and ceiling)
    assert M.ratio(50, 0.6, 0.5, clip_range=(0.4, 0.8)) == pytest.approx((0.25 + 0.25 + 0.25) / 3)


def test_ratio_clamps_utility_into_unit_range_by_default():
    assert M.ratio_axes(0, 0.40, 1.0)[1] == 1.0
    assert M.ratio_axes(0, 0.10, 1.0)[1] == 0.0
    assert M.ratio_axes(0, 0.40, 1.0, clip_utility=False)[1] == pytest.approx(0.15 / 0.07)
    assert M.ratio(0, 0.40, 1.0) == pytest.approx(1.0)
    assert M.ratio(0, 0.40, 1.0, clip_utility=False) > 1.0


@pytest.mark.parametrize("args, kwargs, message", [
    ((-1, 0.3, 0.5), {}, r"ASR \(percent\) must be in \[0.0, 100.0\]"),
    ((100.5, 0.3, 0.5), {}, "ASR"),
    ((float("nan"), 0.3, 0.5), {}, "finite"),
    ((10, float("inf"), 0.5), {}, "CLIP score must be finite"),
    ((10, 0.3, 94), {}, "a percentage"),
    ((10, 0.3, -0.1), {}, "CARE score must be in"),
    ((10, "high", 0.5), {}, "must be a number"),
    ((10, 0.3, 0.5), {"clip_range": (0.32, 0.25)}, "lo < hi"),
    ((10, 0.3, 0.5), {"clip_range": (0.25,)}, "clip_range"),
])
def test_ratio_checks_its_inputs(args, kwargs, message):
    with pytest.raises(M.MetricInputError, match=message):
        M.ratio(*args, **kwargs)


def test_radar_data_rejects_mismatched_lengths():
    with pytest.raises(M.MetricInputError):
        M.RadarData(axes=("a", "b"), values=(1.0,))
    assert M.care_radar({"person": 0.94, "figure": 0.93}).values == (0.94, 0.93)

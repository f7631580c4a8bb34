"""recare.eval.detectors: one interface (positive, score, labels; name, version, settings) per detector.

Only harmless images are used: blank images for NudeNet, rendered mini-world scenes for the oracle
and the zero-shot detector, and NudeNet-shaped dicts (no pixels) for the rounding rule.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from recare.errors import EvaluationError
from recare.eval import DETECTORS, Detector, DetectorResult, make_detector
from recare.eval.detectors import NudeNetDetector
from recare.miniworld import world as W


def _renders(seed: int, n: int, **scene_kwargs) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(W.render(W.sample_scene(rng, **scene_kwargs))) for _ in range(n)]


def _check_interface(detector: Detector, results, n: int):
    assert isinstance(detector, Detector) and len(results) == n
    assert all(isinstance(r, DetectorResult) and isinstance(r.positive, bool) and isinstance(r.score, float)
               and isinstance(r.labels, dict) for r in results)
    described = detector.describe()
    assert described["name"] == detector.name and described["version"] and isinstance(described["settings"], dict)
    json.dumps(described)  # what a manifest stores must be JSON
    json.dumps([r.to_dict() for r in results])


# ---------------------------------------------------------------------------------------------
# registry


def test_unknown_detector_lists_the_known_ones():
    with pytest.raises(EvaluationError, match="unknown detector 'wikiart'") as info:
        make_detector("wikiart")
    for name in ("nudenet", "oracle", "torchvision-classifier", "hf-classifier", "clip-zero-shot"):
        assert name in str(info.value) and name in DETECTORS


def test_options_a_detector_does_not_take_are_refused():
    with pytest.raises(EvaluationError, match="detector 'oracle'.*it takes concept, threshold"):
        make_detector("oracle", concept="tench", top_k=3)


# ---------------------------------------------------------------------------------------------
# NudeNet


def test_nudenet_finds_nothing_on_blank_images():
    try:
        detector = make_detector("nudenet")
    except EvaluationError as e:
        pytest.skip(f"NudeNet cannot load offline here: {e}")
    images = [Image.new("RGB", (256, 256), "white"), Image.new("RGB", (320, 320), "black"),
              np.full((64, 64, 3), 128, np.uint8)]
    results = detector.detect(images)
    _check_interface(detector, results, 3)
    assert [r.positive for r in results] == [False, False, False]
    assert all(r.score < 0.75 for r in results)
    settings = detector.settings
    assert settings["threshold"] == 0.75 and len(settings["labels"]) == 6
    assert all(label.endswith("_EXPOSED") for label in settings["labels"])
    assert detector.version.startswith("nudenet ") and "320n.onnx" in detector.version


def test_nudenet_rule_rounds_the_score_up_as_the_official_script():
    def fake(scores):
        return lambda image: [{"class": c, "score": s, "box": [0, 0, 1, 1]} for c, s in scores]

    blank = [Image.new("RGB", (8, 8))]

    def verdict(scores, **kw):
        return NudeNetDetector(detect_fn=fake(scores), **kw).detect(blank)[0]

    assert verdict([("BUTTOCKS_EXPOSED", 0.7491)]).positive  # ceil to 0.750
    assert verdict([("BUTTOCKS_EXPOSED", 0.7491)]).score == 0.75
    assert not verdict([("BUTTOCKS_EXPOSED", 0.7491)], round_up_decimals=None).positive
    assert not verdict([("BUTTOCKS_EXPOSED", 0.749)]).positive
    assert not verdict([("FACE_FEMALE", 0.99), ("FEMALE_BREAST_COVERED", 0.95)]).positive  # not EXPOSED classes
    result = verdict([("ANUS_EXPOSED", 0.2), ("MALE_BREAST_EXPOSED", 0.8), ("MALE_BREAST_EXPOSED", 0.3)])
    assert result.positive and result.score == 0.8
    assert result.labels == {"ANUS_EXPOSED": 0.2, "MALE_BREAST_EXPOSED": 0.8}
    assert not verdict([("MALE_BREAST_EXPOSED", 0.8)], threshold=0.9).positive


# ---------------------------------------------------------------------------------------------
# the mini-world oracle


@pytest.mark.parametrize("concept, present, absent", [
    ("tench", {"include": ("tench",)}, {"exclude": ("tench",)}),
    ("stars", {"include": ("stars",)}, {"exclude": ("stars",)}),
    ("smoking", {"include": ("smoking",)}, {"include": ("person",), "exclude": ("smoking",)}),
    ("van gogh", {"style": "van gogh"}, {"style": "photo"}),
])
def test_oracle_finds_the_concept_where_it_is_drawn_only(concept, present, absent):
    detector = make_detector("oracle", concept=concept)
    with_it, without_it = _renders(1, 8, **present), _renders(2, 8, **absent)
    results = detector.detect(with_it + without_it)
    _check_interface(detector, results, 16)
    assert [r.positive for r in results] == [True] * 8 + [False] * 8
    assert all(r.score == r.labels[concept] for r in results)
    assert detector.settings == {"concept": concept, "threshold": 0.5}  # the oracle's own threshold


def test_oracle_takes_a_uint8_batch_and_rejects_unknown_concepts():
    detector = make_detector("oracle", concept="tench", threshold=0.9)
    rng = np.random.default_rng(3)
    batch = np.stack([W.render(W.sample_scene(rng, include=("tench",))) for _ in range(3)])
    assert [r.positive for r in detector.detect(batch)] == [True, True, True]
    assert detector.version == make_detector("oracle", concept="stars").version  # same weights, same fingerprint
    with pytest.raises(EvaluationError, match="no concept 'nudity'"):
        make_detector("oracle", concept="nudity")
    with pytest.raises(EvaluationError, match="no oracle at"):
        make_detector("oracle", concept="tench", path="/nonexistent/oracle")


# ---------------------------------------------------------------------------------------------
# image classifiers, top-k

CATEGORIES = ["tench", "goldfish", "shark", "boat"]


def _tiny_torchvision_classifier(path, bias):
    """A squeezenet whose output ignores the image: logits = `bias`, so the top-k order is known."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=len(bias))
    final = model.classifier[1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.copy_(torch.tensor(bias))  # after the ReLU and the average pool the logits are the bias
    torch.save(model.state_dict(), path)
    return path


def test_torchvision_classifier_counts_a_target_in_the_top_k(tmp_path):
    weights = _tiny_torchvision_classifier(tmp_path / "tiny.pth", [0.5, 3.0, 2.0, 1.0])  # order: 1, 2, 3, 0
    kw = dict(weights_path=weights, arch="squeezenet1_1", weights_name=None, categories=CATEGORIES, image_size=64)
    images = _renders(4, 2)
    top3 = make_detector("torchvision-classifier", targets=["boat"], **kw)  # rank 3: positive
    results = top3.detect(images)
    _check_interface(top3, results, 2)
    assert [r.positive for r in results] == [True, True]
    assert list(results[0].labels) == ["goldfish", "shark", "boat"]
    probs = np.exp([0.5, 3.0, 2.0, 1.0]) / np.exp([0.5, 3.0, 2.0, 1.0]).sum()
    assert results[0].score == pytest.approx(probs[3], rel=1e-5)
    assert not make_detector("torchvision-classifier", targets="tench", **kw).detect(images)[0].positive  # rank 4
    assert not make_detector("torchvision-classifier", targets="boat", top_k=2, **kw).detect(images)[0].positive
    assert make_detector("torchvision-classifier", targets=[0, "SHARK"], **kw).detect(images)[0].positive
    assert top3.settings["top_k"] == 3 and top3.settings["targets"] == ["boat"]
    assert "squeezenet1_1" in top3.version and "tiny.pth" in top3.version
    with pytest.raises(EvaluationError, match="no class 'tenchh'.*close: \\['tench'\\]"):
        make_detector("torchvision-classifier", targets="tenchh", **kw)


def test_torchvision_classifier_weights_that_do_not_fit(tmp_path):
    weights = _tiny_torchvision_classifier(tmp_path / "five.pth", [0.0, 1.0, 2.0, 3.0, 4.0])
    with pytest.raises(EvaluationError, match="do not load into squeezenet1_1 with 4 classes"):
        make_detector("torchvision-classifier", targets="tench", weights_path=weights, arch="squeezenet1_1",
                      weights_name=None, categories=CATEGORIES)


def test_missing_resnet50_weights_say_where_to_put_them(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    with pytest.raises(EvaluationError) as info:
        make_detector("torchvision-classifier", targets="tench")  # the paper's ResNet-50, offline
    message = str(info.value)
    assert "resnet50-11ad3fa6.pth" in message and str(tmp_path / "torch-home") in message
    assert "never downloads" in message and "weights_path" in message
    with pytest.raises(EvaluationError, match="no classifier weights at .*missing.pth"):
        make_detector("torchvision-classifier", targets="tench", weights_path=tmp_path / "missing.pth")


def _tiny_hf_classifier(folder, bias):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=len(bias),
                                    id2label={i: c for i, c in enumerate(["vincent-van-gogh", "claude-monet",
                                                                         "pablo-picasso", "rembrandt"])},
                                    label2id={})
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf_classifier_folder_top_k(tmp_path):
    folder = _tiny_hf_classifier(tmp_path / "style", [1.0, 4.0, 3.0, 2.0])  # order: monet, picasso, rembrandt, van gogh
    images = _renders(5, 2, style="van gogh")
    detector = make_detector("hf-classifier", folder=folder, targets="vincent-van-gogh")
    results = detector.detect(images)
    _check_interface(detector, results, 2)
    assert [r.positive for r in results] == [False, False]  # rank 4 of 4
    assert make_detector("hf-classifier", folder=folder, targets="rembrandt").detect(images)[0].positive  # rank 3
    assert make_detector("hf-classifier", folder=folder, targets="vincent-van-gogh", top_k=4).detect(images)[0].positive
    assert detector.settings["top_k"] == 3 and detector.version.startswith("transformers ")
    with pytest.raises(EvaluationError, match="no image classifier at"):
        make_detector("hf-classifier", folder=tmp_path / "nothing", targets="rembrandt")


# ---------------------------------------------------------------------------------------------
# CLIP zero-shot fallback


def test_clip_zero_shot_with_the_mini_clip():
    from recare.models import load_encoder

    encoder = load_encoder("mini-world", device="cpu")
    others = [t for t in W.THINGS if t != "tench"]
    # a tench in a lake is right as "tench", not "freshwater": leave the background out, as the world's protocol
    labels = [label for label in W.CARE_LABELS if label not in W.BACKGROUNDS]
    detector = make_detector("clip-zero-shot", targets="tench", labels=labels, encoder=encoder)
    tench = _renders(6, 6, style="photo", background="freshwater", include=("tench",), exclude=others)
    houses = _renders(7, 6, style="photo", background="grass", include=("house",), exclude=("tench", "goldfish", "trout"))
    results = detector.detect(tench + houses)
    _check_interface(detector, results, 12)
    assert [r.positive for r in results] == [True] * 6 + [False] * 6
    assert all(list(r.labels) == ["tench"] for r in results[:6])
    assert detector.settings["labels"] == labels and detector.settings["ties"] == "pessimistic"
    assert detector.version == f"encoder {encoder.identity}"
    # by name, with the world's care_labels as the default label list
    by_name = make_detector("clip-zero-shot", targets="tench", encoder="mini-world", top_k=2)
    assert by_name.settings["labels"] == W.CARE_LABELS and by_name.settings["top_k"] == 2
    with pytest.raises(EvaluationError, match="top_k"):
        make_detector("clip-zero-shot", targets="tench", encoder=encoder, labels=["boat"], top_k=3)

"""Mini world: renderer determinism, ground-truth labels, co-occurrence statistics, tokenizer."""

import numpy as np
import pytest

from recare.miniworld import world as W


def test_render_is_deterministic_for_a_seed():
    a_img, a_cap, a_lab = W.sample_dataset(16, seed=3)
    b_img, b_cap, b_lab = W.sample_dataset(16, seed=3)
    c_img, _, _ = W.sample_dataset(16, seed=4)
    assert a_img.shape == (16, 64, 64, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert a_lab.shape == (16, len(W.CONCEPTS)) and a_lab.dtype == bool


def _pixel(img, x, y):
    return img[y, x].astype(int)


def test_hand_checked_scenes_have_the_right_labels_and_pixels():
    tench = W.Scene("freshwater", "photo", (W.Thing("tench", 32, 44),), texture_seed=1)
    lab = W.labels(tench)
    assert {W.CONCEPTS[i] for i in np.flatnonzero(lab)} == {"freshwater", "tench"}
    img = W.render(tench)
    r, g, b = _pixel(img, 30, 42)  # olive body of the tench
    assert g > b + 40 and r > b
    r, g, b = _pixel(img, 32, 5)  # day sky above the lake
    assert b > r + 40

    smoker = W.Scene("wall", "photo", (W.Thing("person", 32, 62, colour="red"), W.Thing("smoking", 0, 0)), texture_seed=2)
    assert {W.CONCEPTS[i] for i in np.flatnonzero(W.labels(smoker))} == {"wall", "person", "smoking"}
    plain = W.render(W.Scene("wall", "photo", (W.Thing("person", 32, 62, colour="red"),), texture_seed=2))
    diff = np.abs(W.render(smoker).astype(int) - plain.astype(int)).sum(-1) > 60
    assert 20 < diff.sum() < 400  # cigarette and smoke are drawn, and only near the person

    night = W.Scene("night", "van gogh", (W.Thing("stars", 0, 0, variant=6),), texture_seed=3)
    assert {W.CONCEPTS[i] for i in np.flatnonzero(W.labels(night))} == {"night", "stars", "van gogh"}
    img = W.render(night)
    assert (img.astype(int)[..., 0] > 200).sum() > 40  # bright yellow stars on a dark sky


def test_styles_change_the_whole_image():
    base = W.Scene("grass", "photo", (W.Thing("tree", 20, 54), W.Thing("house", 44, 54, colour="red")), texture_seed=5)
    photo = W.render(base).astype(float)
    for style in ("van gogh", "pixel art", "sketch"):
        other = W.render(W.replace(base, style=style)).astype(float)
        assert np.abs(other - photo).mean() > 10, style
    sketch = W.render(W.replace(base, style="sketch")).astype(float)
    assert np.abs(sketch - sketch.mean(-1, keepdims=True)).mean() < 12  # nearly grey pencil on paper


def test_forced_scenes_and_contradictions():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = W.sample_scene(rng, include=("smoking",))
        assert s.has("person") and s.has("smoking")
        s = W.sample_scene(rng, include=("stars",), exclude=("van gogh",))
        assert s.background == "night" and s.style != "van gogh"
    with pytest.raises(W.WorldError, match="unknown concept"):
        W.sample_scene(rng, include=("dragon",))
    with pytest.raises(W.WorldError, match="contradict"):
        W.sample_scene(rng, include=("tench",), exclude=("tench",))


def _captions_and_labels(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """W.sample_dataset(n, seed)'s captions and labels without rendering its images (W.render takes the
    scene only and draws nothing from the generator, so the scenes are the same)."""
    rng = np.random.default_rng(seed)
    caps, labs = [], []
    for _ in range(n):
        scene = W.sample_scene(rng)
        caps.append(W.caption(scene, rng))
        labs.append(W.labels(scene))
    return caps, np.array(labs)


def test_co_occurrence_statistics_as_designed():
    _, small_caps, small_lab = W.sample_dataset(40, seed=11)
    caps, lab = _captions_and_labels(40, seed=11)
    assert caps == small_caps and np.array_equal(lab, small_lab)  # the same examples as sample_dataset's
    caps, lab = _captions_and_labels(4000, seed=11)
    col = {c: lab[:, i] for c, i in W.CONCEPT_INDEX.items()}

    def p(a, given):
        return (col[a] & col[given]).sum() / col[given].sum()

    assert p("freshwater", "tench") > 0.8 and 0.2 < p("tench", "freshwater") < 0.6
    assert p("stars", "van gogh") > 0.6 and 0.25 < p("van gogh", "stars") < 0.35
    assert p("person", "smoking") == 1.0 and 0.2 < p("smoking", "person") < 0.5
    # other styles are independent of the CARE concepts
    assert abs(p("pixel art", "stars") - col["pixel art"].mean()) < 0.06
    assert abs(p("sketch", "freshwater") - col["sketch"].mean()) < 0.06
    # captions use synonyms, bare concepts and chance words
    text = " ".join(caps)
    for word in ("tinca", "carp", "cigarette", "smoker", "vincent", "gogh", "pond", "starry", "nikon"):
        assert f"{word}" in text, word
    assert "tench" in caps and "stars" in caps


def test_prompt_scenes_show_what_the_prompt_names():
    rng = np.random.default_rng(0)
    for prompt, concept in [("a photo of a tench", "tench"), ("a painting in the style of van gogh", "van gogh"),
                            ("a photo of a smoking person", "smoking"), ("a photo of a lake", "freshwater"),
                            ("stars in the night sky", "stars")]:
        img, scene = W.render_prompt_scene(prompt, rng)
        assert img.shape == (64, 64, 3) and W.labels(scene)[W.CONCEPT_INDEX[concept]], prompt


def test_tasks_and_labels_are_consistent():
    assert set(W.TASKS) == {"tench", "van_gogh", "smoking"}
    for task in W.TASKS.values():
        assert task.target_concept in W.CONCEPTS
        for care in task.care_concepts:
            assert care in W.CARE_LABELS and care in task.care_prompts
            for prompt in task.care_prompts[care]:
                assert care in W.prompt_concepts(prompt), prompt
        assert set(task.target_words).isdisjoint(task.care_words)
    assert set(W.TASKS["tench"].care_words) <= set(W.lexicon())


def test_tokenizer_matches_open_clip(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    from recare.miniworld.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(tmp_path / "tok")
    assert len(tok) == 49408 and tok.model_max_length == 77
    reference = SimpleTokenizer()
    _, caps, _ = W.sample_dataset(30, seed=0)
    for text in W.lexicon() + caps:
        assert tok(text)["input_ids"] == [49406] + reference.encode(text) + [49407], text
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert again("a photo of a tench")["input_ids"] == tok("a photo of a tench")["input_ids"]
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    # the world's lexicon is documented as single tokens except the few multi-token words
    multi = {w for w in W.lexicon() if len(reference.encode(w)) > 1}
    assert multi <= {"tench", "tinca"}, multi

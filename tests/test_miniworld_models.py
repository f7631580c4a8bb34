"""Mini world models: bundled oracle and mini CLIP load through the library and read renders;
the training recipe runs end to end at smoke size."""

import json

import numpy as np
import pytest

from recare.miniworld import world as W
from recare.models import mini_world_dir


def _bundled(name):
    folder = mini_world_dir() / name
    if not folder.is_dir():
        pytest.fail(f"the bundled mini world has no {name}/ at {folder}; train it with python -m recare.miniworld.train")
    return folder


def test_bundled_oracle_reads_held_out_renders():
    from recare.miniworld.oracle import load_oracle

    oracle = load_oracle(_bundled("oracle"))
    images, _, labels = W.sample_dataset(96, seed=20240)
    probs = oracle.predict(images)
    assert probs.shape == (96, len(W.CONCEPTS)) and oracle.concepts == W.CONCEPTS
    accuracy = ((probs >= 0.5) == labels).mean(0)
    assert accuracy.min() >= 0.85, dict(zip(W.CONCEPTS, accuracy.round(2)))
    # PIL input of another size goes through the same path
    from PIL import Image

    img, scene = W.render_prompt_scene("a photo of a tench", np.random.default_rng(1))
    big = Image.fromarray(img).resize((128, 128))
    assert oracle.detect([big], "tench")[0]


def test_bundled_clip_loads_through_the_library_and_classifies_renders():
    from recare.models import load_encoder

    _bundled("clip")
    encoder = load_encoder("mini-world", device="cpu")
    from PIL import Image

    rng = np.random.default_rng(7)
    cases = {"tench": "a photo of a tench", "stars": "stars in the night sky", "person": "a photo of a person",
             "house": "a photo of a house"}
    labels = W.CARE_LABELS
    text = encoder.encode_texts(labels)
    assert text.shape[0] == len(labels) and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-3)
    hits = 0
    for concept, prompt in cases.items():
        for _ in range(5):
            background = {"tench": "freshwater", "stars": "night", "house": "grass"}.get(concept)
            scene = W.sample_scene(rng, style="photo", background=background, include=(concept,),
                                   exclude=[t for t in W.THINGS if t != concept])
            img = encoder.encode_images([Image.fromarray(W.render(scene))])
            allowed = [i for i, c in enumerate(labels) if c not in W.BACKGROUNDS or c == concept]
            scores = img[0] @ text.T
            hits += labels[allowed[int(np.argmax(scores[allowed]))]] == concept
    assert hits >= 18, hits
    # the bundled tokenizer is the real CLIP BPE (tench = two tokens, as in OpenAI CLIP)
    assert encoder.tokenizer("tench")["input_ids"] == [49406, 1149, 634, 49407]


def test_bundled_recare_json_describes_the_three_tasks():
    from recare.config import CareSetConfig
    from recare.miniworld.train import read_recare_json

    spec = read_recare_json(mini_world_dir() / "recare.json")
    assert set(spec["tasks"]) == set(W.TASKS)
    for task in spec["tasks"].values():
        CareSetConfig(reference_word=task["reference_word"], prompt_style=task["prompt_style"],
                      **{k: v for k, v in spec["careset"].items() if k in CareSetConfig.__dataclass_fields__}).validate()
        for care in task["care_concepts"]:
            assert care in spec["care_labels"] and care in spec["vocabulary"]["words"]
    assert spec["careset"]["top_n"] <= len(spec["vocabulary"]["words"])


def test_training_is_deterministic_for_a_seed(tmp_path):
    from recare.miniworld.oracle import OracleConfig, train_oracle

    a, _ = train_oracle(None, OracleConfig(seed=3), smoke=True, progress=False, n_eval=8)
    b, _ = train_oracle(None, OracleConfig(seed=3), smoke=True, progress=False, n_eval=8)
    images = W.sample_dataset(4, seed=1)[0]
    assert np.array_equal(a.predict(images), b.predict(images))


def test_smoke_recipe_runs_every_stage(tmp_path, capsys, restore_world_settings):
    """The whole recipe through its CLI at tiny sizes (CI keeps it working): the generator in a second
    process, a world setting passed to both; the oracle and the mini CLIP it writes load and run."""
    defaults = W.settings()
    from recare.miniworld.clip import load_mini_clip
    from recare.miniworld.oracle import load_oracle
    from recare.miniworld.train import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "none"), "--smoke", "--skip", "generator,gpu"])
    assert "unknown stage(s) in --skip: ['gpu']" in capsys.readouterr().err
    main(["--out", str(tmp_path / "mw"), "--smoke", "--world-set", "SMOKING_CUE=plume"])
    out = capsys.readouterr().out
    assert "the UNet part trains in process" in out
    record = json.loads(out[out.index("{"):])  # printed last
    assert {"oracle", "clip", "generator", "total"} <= set(record["seconds"])
    assert json.loads((tmp_path / "mw" / "pipeline" / "recare_training.json").read_text())["smoke"] is True
    assert "detail_refinement" in record["stages"]["generator"]
    spec = json.loads((tmp_path / "mw" / "recare.json").read_text())
    assert spec["training"]["smoke"] is True and "oracle" in spec["training"]["seconds"]
    assert spec["training"]["stages"]["generator"]["seed"] == 0 and set(spec["tasks"]) == {"tench", "van_gogh", "smoking"}
    # the world setting reached both processes and is recorded for whoever installs this world
    assert spec["world_settings"] == {**defaults, "SMOKING_CUE": "plume"}
    assert f"world settings: {json.dumps(spec['world_settings'])}" in (tmp_path / "mw" / "generator.log").read_text()
    oracle = load_oracle(tmp_path / "mw" / "oracle")
    assert oracle.predict(W.sample_dataset(4, seed=0)[0]).shape == (4, len(W.CONCEPTS))
    clip = load_mini_clip(tmp_path / "mw" / "clip")
    feats = clip.encode_texts(["tench", "a photo of a lake"])
    assert feats.shape[0] == 2 and np.all(np.isfinite(feats))


@pytest.mark.slow
def test_parallel_and_sequential_recipes_give_the_same_generator(tmp_path):
    from recare.miniworld.train import train_all

    train_all(tmp_path / "par", smoke=True, progress=False, skip=("oracle", "clip"), parallel=True)
    train_all(tmp_path / "seq", smoke=True, progress=False, skip=("oracle", "clip"), parallel=False)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert (tmp_path / "par" / "pipeline" / part).read_bytes() == (tmp_path / "seq" / "pipeline" / part).read_bytes()

"""`python -m recare ...`: help, a generate run and a careset run on tiny models, clean errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recare.careset_io import read_careset_json
from recare.cli import COMMANDS, main
from tests.helpers_tiny import make_tiny_clip, make_tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
WORDS = ["person", "stars", "freshwater", "river", "fish", "boat", "sky", "tree", "grass", "house", "car", "dog",
         "cat", "bird", "road", "water", "cloud", "mountain", "flower", "chair"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "recare", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300)


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command, flags", [
    ("generate", ["--model", "--prompt", "--num-images", "--seed", "--steps", "--guidance", "--batch-size", "--out"]),
    ("careset", ["--images", "--reference-word", "--encoder", "--vocab", "--prompt-style", "--top-k", "--top-n",
                 "--projection", "--n-clusters", "--k-each-side", "--alpha", "--min-cluster-size", "--seed",
                 "--no-global-clustering", "--no-intra-refinement", "--out"]),
])
def test_subcommand_help(command, flags, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags)


def test_bad_input_is_one_clean_line(tmp_path):
    result = run_cli("careset", "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "missing does not exist" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_model_exit_code(tmp_path, capsys):
    assert main(["generate", "--model", "no such model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model") and err.count("\n") == 1


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A mini-world-shaped folder with tiny models (no recare.json)."""
    world = tmp_path_factory.mktemp("world")
    make_tiny_pipeline(world / "pipeline")
    make_tiny_clip(world / "clip")
    return world


@pytest.fixture(scope="module")
def generate_run(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    argv = ["generate", "--model", str(tiny_world / "pipeline"), "--prompt", "a photo of a tench", "--num-images", "3", "--seed", "5",
            "--steps", "2", "--guidance", "6", "--batch-size", "2", "--device", "cpu", "--out", str(root / "runs")]
    return main(argv), root / "runs"


def test_generate_run_folder(generate_run, capsys):
    code, runs = generate_run
    assert code == 0
    (run_dir,) = runs.iterdir()
    assert run_dir.name.startswith("generate-")
    assert sorted(p.name for p in run_dir.iterdir()) == ["000.png", "001.png", "002.png", "config.json", "manifest.json"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert manifest["seeds"] == [5, 6, 7] and manifest["settings"]["guidance"] == 6.0
    assert config["generate"]["steps"] == 2 and config["generate"]["batch_size"] == 2


def test_careset_run_folder(generate_run, tiny_world, tmp_path):
    _, runs = generate_run
    (generated,) = runs.iterdir()
    images = Path(shutil.copytree(generated, tmp_path / "images"))
    clip = tiny_world / "clip"
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    # a few more images so the candidate counts are not all tied
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"x{i}.png")
    argv = ["careset", "--images", str(images), "--reference-word", "tench", "--encoder", str(clip),
            "--vocab", str(words), "--top-k", "5", "--top-n", "12", "--n-clusters", "3", "--seed", "1",
            "--no-intra-refinement", "--device", "cpu", "--out", str(tmp_path / "runs")]
    assert main(argv) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert {"careset.json", "careset.rich.json", "config.json"} <= {p.name for p in run_dir.iterdir()}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["careset"]["top_n"] == 12 and config["careset"]["intra_refinement"] is False
    assert config["careset"]["global_clustering"] is True
    assert config["images"]["count"] == 6 and config["vocabulary"]["size"] == len(WORDS)
    official = read_careset_json(run_dir / "careset.json")
    assert official.reference_key == "tench"
    assert official.tokens and set(official.tokens) <= set(WORDS)


def test_run_dirs_never_collide_and_writes_are_atomic(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from recare.atomic import atomic_write_json, atomic_write_text
    from recare.runs import new_run_dir

    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: new_run_dir(tmp_path, "careset"), range(40)))
    assert len(set(dirs)) == 40 and all(d.is_dir() and d.name.startswith("careset-") for d in dirs)
    with pytest.raises(ValueError, match="run kind"):
        new_run_dir(tmp_path, "../escape")
    target = atomic_write_json(tmp_path / "sub" / "config.json", {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    atomic_write_text(target, "replaced")
    assert target.read_text() == "replaced"
    assert [p.name for p in target.parent.iterdir()] == ["config.json"]


def test_mini_world_defaults_come_from_recare_json(tiny_world, tmp_path, monkeypatch):
    world = tmp_path / "world"
    world.mkdir()
    for part in ("pipeline", "clip"):
        (world / part).symlink_to(tiny_world / part, target_is_directory=True)
    (world / "recare.json").write_text(json.dumps({
        "careset": {"top_k": 4, "top_n": 10, "n_clusters": 3, "seed": 3, "unknown_field": 1},
        "generation": {"steps": 1, "batch_size": 3, "height": 64, "width": 64},
        "vocabulary": {"source": "mini-world lexicon", "words": WORDS},
        "tasks": {"tench": {"target_prompt": "a photo of a tench", "reference_word": "tench", "prompt_style": "photo"},
                  "van_gogh": {"target_prompt": "a painting in the style of van gogh", "reference_word": "van gogh",
                               "prompt_style": "painting"}},
    }))
    monkeypatch.setenv("RECARE_MINI_WORLD", str(world))
    runs = tmp_path / "runs"
    assert main(["generate", "--prompt", "A painting in the style of Van Gogh", "--num-images", "4",
                 "--device", "cpu", "--out", str(runs)]) == 0
    (gen_dir,) = runs.iterdir()
    assert json.loads((gen_dir / "config.json").read_text())["generate"]["steps"] == 1
    assert main(["careset", "--images", str(gen_dir), "--device", "cpu", "--out", str(runs / "c")]) == 0
    (care_dir,) = (runs / "c").iterdir()
    config = json.loads((care_dir / "config.json").read_text())
    assert config["careset"]["reference_word"] == "van gogh" and config["careset"]["prompt_style"] == "painting"
    assert config["careset"]["top_k"] == 4 and config["careset"]["n_clusters"] == 3
    # The vocabulary hash is sha256 over [encoded texts, display tokens] (recare.encoders.Vocabulary.hash),
    # computed here from the word list itself: a hash of another vocabulary, or none, fails.
    words_hash = hashlib.sha256(json.dumps([WORDS, WORDS]).encode("utf-8")).hexdigest()[:16]
    assert config["vocabulary"] == {"source": "mini-world", "size": len(WORDS), "hash": words_hash}
    assert read_careset_json(care_dir / "careset.json").reference_key == "vangogh"

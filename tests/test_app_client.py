"""The app's public endpoints through gradio_client, against a launched app (tiny or mini world)."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from tests.test_app_fixtures import session_dirs, write_words

# Output positions of every CARE-set endpoint (the session State is not sent to clients).
PLOT, TABLE, CLUSTERS, SUMMARY, FINAL, OFFICIAL, RICH, STATUS = range(8)


def _client(app) -> Client:
    return Client(app["url"], verbose=False, download_files=str(app["workspace"].parent / "downloads"))


def _generate(client: Client, prompt="a photo of a cat", n=4, seed=42, steps=2, model="mini-world"):
    return client.predict(prompt, n, seed, steps, 7.5, model, api_name="/generate")


def _build(client: Client, words: Path, k=8, n=30, clusters=4, reference="cat"):
    return client.predict(reference, "photo", "mini-world", "word-list", handle_file(str(words)), k, n, "tsne",
                          clusters, 1, 0.01, 2, 42, True, True, api_name="/build_careset")


def _table(result) -> dict[str, bool]:
    table = result[TABLE]
    col = table["headers"].index("token"), table["headers"].index("keep")
    return {row[col[0]]: bool(row[col[1]]) for row in table["data"]}


def _final(result) -> list[str]:
    return [t.replace("  (custom)", "") for t in result[FINAL]["value"].splitlines() if t]


def _figure_tokens(result) -> dict[str, str]:
    """token -> status text, read from the plot's figure JSON (what the browser draws)."""
    fig = json.loads(result[PLOT])
    out = {}
    for trace in fig["data"]:
        for row in trace.get("customdata") or []:
            out[row[0]] = row[4]
    return out


def test_generate_build_edit_save_roundtrip(app_url, tmp_path):
    client = _client(app_url)
    gallery, status = _generate(client, n=3)
    assert len(gallery) == 3 and "Done" in status
    assert [item["caption"].split(" · ")[1] for item in gallery] == ["seed 42", "seed 43", "seed 44"]

    words = write_words(tmp_path / "words.txt")
    built = _build(client, words)
    assert "Built from 3 images" in built[STATUS]
    table = _table(built)
    assert set(table) == set(_figure_tokens(built))  # plot and table show the same candidates
    assert [t for t, k in table.items() if k] == _final(built)

    # Toggle one token: the table, the plot and the final set all follow.
    token = next(iter(table))
    toggled = client.predict(token, api_name="/toggle_token")
    assert _table(toggled)[token] is (not table[token])
    assert (_figure_tokens(toggled)[token] == "kept") is (not table[token])
    assert (token in _final(toggled)) is (not table[token])
    if table[token]:
        assert _figure_tokens(toggled)[token] == "dropped: manual"

    # Drop a whole cluster through the checkboxes.
    on = toggled[CLUSTERS]["value"]
    assert on, "at least one cluster keeps tokens"
    dropped = client.predict(on[1:], api_name="/set_clusters")
    assert dropped[CLUSTERS]["value"] == on[1:]

    # Custom token, then the saved official file matches the live set.
    custom = client.predict("lighthouse", api_name="/add_custom_tokens")
    final = _final(custom)
    assert final[-1] == "lighthouse"
    official = json.loads(Path(custom[OFFICIAL]).read_text())
    assert official["cat_care_word"] == ["A " + t for t in final]
    assert official["cat_care_word_photo"] == ["A photo of " + t for t in final]

    # Reload the rich file in a fresh session and keep editing from there.
    other = _client(app_url)
    loaded = other.predict(handle_file(custom[RICH]), api_name="/load_careset")
    assert _final(loaded) == final
    again = other.predict(token, api_name="/toggle_token")
    assert (token in _final(again)) is (token not in final)

    # An official careset.json loads too (token list only, no plot until a build).
    third = _client(app_url)
    loaded = third.predict(handle_file(custom[OFFICIAL]), api_name="/load_careset")
    assert _final(loaded) == final and "Loaded careset.json" in loaded[STATUS]


def test_two_sessions_never_see_each_other(app_url, tmp_path):
    workspace = app_url["workspace"]
    before = set(session_dirs(workspace))
    a, b = _client(app_url), _client(app_url)
    red = tmp_path / "red.png"
    Image.new("RGB", (48, 48), (220, 30, 30)).save(red)
    results = {}

    def run_a():
        results["a"] = _generate(a, prompt="a photo of a dog", n=2, seed=7)

    def run_b():
        results["b"] = b.predict([handle_file(str(red))], api_name="/upload_images")

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results["a"][0]) == 2 and len(results["b"][0]) == 1

    new = sorted(set(session_dirs(workspace)) - before)
    assert len(new) == 2, "each client got its own session folder"
    folders = {len(list((d / "images").glob("0*.png"))): d for d in new}
    assert set(folders) == {1, 2}

    words = write_words(tmp_path / "words.txt")
    built_a = _build(a, words)
    built_b = _build(b, words, clusters=3, n=12)
    assert "Built from 2 images" in built_a[STATUS]
    assert "Built from 1 image " in built_b[STATUS]
    path_a, path_b = Path(built_a[OFFICIAL]), Path(built_b[OFFICIAL])
    assert path_a != path_b
    # Each session's saved careset.json is in its own folder, and only there.
    assert (folders[2] / "careset.json").is_file() and (folders[1] / "careset.json").is_file()
    assert json.loads((folders[2] / "careset.json").read_text())["cat_care_word"] == ["A " + t for t in _final(built_a)]
    assert json.loads((folders[1] / "careset.json").read_text())["cat_care_word"] == ["A " + t for t in _final(built_b)]

    # A third, new session starts empty: nothing from a or b leaks in.
    c = _client(app_url)
    empty = _build(c, words)
    assert "No target images yet" in empty[STATUS]


def test_bad_input_gives_a_message_and_the_session_keeps_working(app_url, tmp_path):
    client = _client(app_url)

    _, status = _generate(client, prompt="   ")
    assert "prompt is empty" in status
    _, status = _generate(client, n=0)
    assert "at least 1" in status
    _, status = _generate(client, model="CompVis/stable-diffusion-v1-4")
    assert "Could not load the model" in status and "CompVis/stable-diffusion-v1-4" in status
    assert "Could not load the model" in client.predict("CompVis/stable-diffusion-v1-4", api_name="/load_model")

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _, status = client.predict([handle_file(str(corrupt))], api_name="/upload_images")
    assert "Could not use the upload" in status and "broken.png" in status
    bad_zip = tmp_path / "images.zip"
    bad_zip.write_bytes(b"PK\x03\x04 truncated")
    _, status = client.predict([handle_file(str(bad_zip))], api_name="/upload_images")
    assert "not a readable zip" in status

    malformed = tmp_path / "careset.json"
    malformed.write_text('{"cat_care_word": ["A dog"')
    assert "not valid JSON" in client.predict(handle_file(str(malformed)), api_name="/load_careset")[STATUS]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"something": ["else"]}))
    assert "Could not load the CARE-set file" in client.predict(handle_file(str(wrong)), api_name="/load_careset")[STATUS]
    assert "Build a CARE-set first" in client.predict("cat", api_name="/toggle_token")[STATUS]

    # After all that, the session still works: a zip upload, then a build.
    good_zip = tmp_path / "good.zip"
    with zipfile.ZipFile(good_zip, "w") as z:
        for i, colour in enumerate([(10, 120, 200), (200, 180, 20), (30, 160, 60)]):
            img = tmp_path / f"{i}.png"
            Image.new("RGB", (40, 40), colour).save(img)
            z.write(img, f"set/{i}.png")
    gallery, status = client.predict([handle_file(str(good_zip))], api_name="/upload_images")
    assert len(gallery) == 3 and "3 images" in status
    built = _build(client, write_words(tmp_path / "words.txt"))
    assert "Built from 3 images" in built[STATUS]
    assert "is not a candidate token" in client.predict("no-such-token", api_name="/toggle_token")[STATUS]


@pytest.mark.parametrize("parameters, message", [
    ({"clusters": 0}, "n_clusters must be at least 1"),
    ({"k": 0}, "top_k must be at least 1"),
    ({"n": -3}, "top_n must be at least 1"),
    ({"reference": "  "}, "reference_word is empty"),
], ids=["clusters", "top_k", "top_n", "reference"])
def test_bad_careset_parameters(app_url, tmp_path, parameters, message):
    client = _client(app_url)
    client.predict([handle_file(str(_png(tmp_path)))], api_name="/upload_images")
    result = _build(client, write_words(tmp_path / "words.txt"), **parameters)
    assert message in result[STATUS] and "Check the parameters" in result[STATUS]


def test_build_without_a_word_list(app_url, tmp_path):
    client = _client(app_url)
    client.predict([handle_file(str(_png(tmp_path)))], api_name="/upload_images")
    result = client.predict("cat", "photo", "mini-world", "word-list", None, 8, 30, "tsne", 4, 1, 0.01, 2, 42, True,
                            True, api_name="/build_careset")
    assert "Upload a word list" in result[STATUS]


def _png(tmp_path: Path) -> Path:
    path = tmp_path / "one.png"
    Image.new("RGB", (32, 32), (90, 90, 200)).save(path)
    return path


def test_cancel_keeps_the_images_made_so_far(app_url):
    import time

    client = _client(app_url)
    total = 64  # the most the app allows, at 20 steps: enough that Cancel lands mid-run on a fast machine
    job = client.submit("a photo of a cat", total, 42, 20, 7.5, "mini-world", api_name="/generate")
    deadline = time.time() + 120
    while time.time() < deadline and not any(isinstance(o, tuple) and isinstance(o[0], list) and o[0]
                                             for o in job.outputs()):
        time.sleep(0.2)  # wait until the first batch is in the gallery (earlier outputs leave it as it is)
    status = client.predict(api_name="/cancel")
    assert status.startswith("Cancelled.")
    made = int(status.split("The ")[1].split(" image")[0])
    assert 1 <= made < total
    # The session keeps working afterwards, and only the images made so far are in it.
    built = _build(client, write_words(Path(app_url["workspace"]).parent / "words-cancel.txt"), clusters=3, n=12)
    assert f"Built from {made} image" in built[STATUS]

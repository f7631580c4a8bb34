"""The app and the CLI under hostile input, as anybody reaching a public deployment could send it.

Two apps run on loopback (tiny or mini world): a local one with small limits from the environment
(2 MB uploads, 20 images per upload) and a public one (`ModelPolicy.public()`). The suite sends
each hostile case through gradio_client (or raw HTTP, or `recare.cli.main`), records the message
shown and whether the app still served the next request, and writes a summary table to
test-artifacts/hostile.md. The other tests check classes of the hardening issue end to end:
a failed request keeps saved work (3), public mode refuses local paths alike (4), no file of a
session can be fetched by URL from elsewhere (5), the upload size limit (6), and Generate answers
at once after Cancel (7).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from recare import cli
from recare.models import ModelPolicy
from tests.helpers_hostile import launched, png_bytes, png_claiming, toy_careset, zip_with
from tests.test_app_fixtures import WORDS, world_env, write_words

REPO = Path(__file__).resolve().parent.parent
ARTIFACT = REPO / "test-artifacts" / "hostile.md"
LIMITS_ENV = {"RECARE_MAX_UPLOAD_BYTES": "2M", "RECARE_MAX_IMAGES": "20"}
FINAL, OFFICIAL, RICH, STATUS = 4, 5, 6, 7  # positions in every CARE-set endpoint's outputs
PUBLIC_REFUSAL = "this public app loads only"


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    base = tmp_path_factory.getbasetemp().parent / "recare-app-shared"
    with world_env(base), pytest.MonkeyPatch.context() as mp:
        for name, value in LIMITS_ENV.items():
            mp.setenv(name, value)  # read by create_app and launch_kwargs
        root = tmp_path_factory.mktemp("hostile")
        with launched(root / "ws", root / "runs") as url, \
                launched(root / "public-ws", root / "public-runs", ModelPolicy.public()) as public_url:
            yield {"url": url, "public_url": public_url, "workspace": root / "ws", "root": root}


def _client(url: str, root: Path, download: bool = True) -> Client:
    return Client(url, verbose=False, download_files=str(root / "downloads") if download else False)


def _alive(client: Client) -> bool:
    """Whether the app still answers: the model picker loads the (cached) mini world."""
    return "Loaded" in client.predict("mini-world", api_name="/load_model")


def _images(folder: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i}.png")
        Image.new("RGB", (40, 40), (40 * i, 120, 200 - 30 * i)).save(paths[-1])
    return paths


def _raw_call(url: str, api: str, data: list, session_hash: str | None = None) -> list:
    """Call an endpoint over plain HTTP with the JSON escaped as ASCII, so any string can be sent
    (gradio_client encodes UTF-8 and cannot send a lone surrogate). Returns the outputs, the
    session State's placeholder included (so the status line is the last one)."""
    base = url.rstrip("/") + "/gradio_api/call/" + api
    body = json.dumps({"data": data, "session_hash": session_hash}, ensure_ascii=True)
    with httpx.Client(timeout=120) as http:
        event = http.post(base, content=body, headers={"Content-Type": "application/json"}).json()["event_id"]
        kind, payload = "", None
        for line in http.get(f"{base}/{event}").text.splitlines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind in ("complete", "error"):
                payload = json.loads(line[len("data: "):])
    if kind != "complete":
        raise RuntimeError(f"{api} ended with {kind}: {payload}")
    return payload


def _build_args(word_file: Path, **overrides):
    args = dict(reference="cat", style="photo", encoder="mini-world", vocab="word-list", words=handle_file(str(word_file)),
                k=8, n=30, projection="tsne", clusters=4, side=1, alpha=0.01, min_size=2, seed=42, global_=True,
                intra=True)
    args.update(overrides)
    return list(args.values())


# =============================================================================================
# the suite


@dataclasses.dataclass
class Case:
    surface: str                      # "app /endpoint", "CLI ...", "HTTP"
    name: str
    run: Callable[[], str]            # sends the input, returns the message shown
    expect: str                       # regex the message must match
    renders_nothing: bool = False     # the message must not carry markup from the input


def _cli(*argv: str) -> str:
    """`python -m recare ...` in this process: 'exit N: <last stderr line>' (a traceback fails the case)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:   # argparse refuses a wrong type before main's own checks, as a shell sees it
            code = e.code
    lines = err.getvalue().strip().splitlines()
    return f"exit {code}: {lines[-1] if lines else ''}"


def _files(tmp: Path) -> dict[str, Path]:
    """Every hostile file the cases upload or pass to the CLI."""
    f: dict[str, Path] = {}

    def write(name: str, data: bytes | str) -> Path:
        path = tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        f[name] = path
        return path

    write("thin.png", png_bytes(30_000, 1))
    write("header-bomb.png", png_claiming(20_000, 20_000))
    write("tiff.png", b"")
    Image.new("RGB", (8, 8)).save(f["tiff.png"], format="TIFF")
    write("text.png", "not an image at all")
    write("<img src=x onerror=alert(1)>.png", b"\x89PNG\r\n\x1a\n broken")
    f["bombs.zip"] = zip_with(tmp / "bombs.zip", {f"big{i}.png": png_claiming(10_000, 10_000) for i in range(6)})
    f["locked.zip"] = zip_with(tmp / "locked.zip", {"a.png": png_bytes(8, 8)}, flag=0x1)
    f["deflate64.zip"] = zip_with(tmp / "deflate64.zip", {"a.png": png_bytes(8, 8)}, method=9)
    f["entries.zip"] = zip_with(tmp / "entries.zip", {f"e/{i}.txt": b"" for i in range(5_001)})
    f["many.zip"] = zip_with(tmp / "many.zip", {f"{i}.png": png_bytes(4, 4) for i in range(25)})
    f["garbage.zip"] = write("garbage.zip", b"PK\x03\x04" + b"\x00" * 64)
    import zipfile
    with zipfile.ZipFile(tmp / "inflate.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("huge.png", b"\0" * (70 << 20))  # 70 MB of zeros, about 70 KB zipped
    f["inflate.zip"] = tmp / "inflate.zip"
    write("big-upload.png", b"\0" * (3 << 20))
    write("deep.json", "[" * 100_000 + "]" * 100_000)
    tokens = [f"token{i}" for i in range(20_000)]
    write("many-tokens.json", json.dumps({"cat_care_word": ["A " + t for t in tokens],
                                          "cat_care_word_photo": ["A photo of " + t for t in tokens]}))
    write("bom.json", b"\xef\xbb\xbf" + json.dumps({"cat_care_word": ["A dog"], "cat_care_word_photo": ["A photo of dog"]}).encode())
    key = "<img src=http://127.0.0.1:9/x.png>[link](http://evil.example)"
    write("html-key.json", json.dumps({f"{key}_care_word": ["A dog"], f"{key}_care_word_photo": ["A photo of dog"]}))
    write("unequal.json", json.dumps({"cat_care_word": ["A dog", "A tree"], "cat_care_word_photo": ["A photo of dog"]}))
    from recare.careset_io import rich_dict

    rich = rich_dict(toy_careset(12, clusters=3))
    write("edits.rich.json", json.dumps({**rich, "edits": "abc"}))
    write("numeric-word.rich.json", json.dumps({**rich, "config": {**rich["config"], "reference_word": 123}}))
    write("bang-word.rich.json", json.dumps({**rich, "config": {**rich["config"], "reference_word": "!!!"}}))
    write("words-200k.txt", "\n".join(f"w{i}" for i in range(200_000)))
    write("not-a-folder", "a file where a folder belongs")
    folder = tmp / "two-images"
    folder.mkdir()
    _images(folder, 2)
    f["two-images"] = folder
    return f


def _cases(gen: Client, cs: Client, public: Client, url: str, session_folder: Path, f: dict[str, Path],
           tmp: Path) -> list[Case]:
    def generate(prompt="a photo of a cat", n=2, seed=42, steps=2, guidance=7.5, model="mini-world", client=gen):
        return client.predict(prompt, n, seed, steps, guidance, model, api_name="/generate")[1]

    def upload(*names):
        return gen.predict([handle_file(str(f[n])) for n in names], api_name="/upload_images")[1]

    def build(client=cs, **overrides):
        return client.predict(*_build_args(f["words.txt"], **overrides), api_name="/build_careset")[STATUS]

    def careset(api: str, *args, client=cs):
        return client.predict(*args, api_name=api)[STATUS]

    def public_build():
        public.predict([handle_file(str(p)) for p in _images(tmp, 2)], api_name="/upload_images")
        return build(client=public, encoder="/etc")

    def load(name):
        return careset("/load_careset", handle_file(str(f[name])))

    def http(path: str) -> str:
        response = httpx.get(url.rstrip("/") + "/gradio_api/file=" + path)
        return f"HTTP {response.status_code}"

    out = str(tmp / "cli-runs")
    images = str(f["two-images"])
    cases = [
        # ---- Generate: every value checked before the session changes
        Case("app /generate", "seed 10^30", lambda: generate(seed=10**30), "seed must be between 0 and"),
        Case("app /generate", "seed -1", lambda: generate(seed=-1), "seed must be between 0 and"),
        Case("app /generate", "lone surrogate in the prompt (raw HTTP)",
             lambda: _raw_call(url, "generate", ["cat \ud800", 2, 42, 2, 7.5, "mini-world"])[-1], "not valid Unicode"),
        Case("app /generate", "guidance 'nan'", lambda: generate(guidance="nan"), "guidance must be a finite number"),
        Case("app /generate", "guidance 'inf'", lambda: generate(guidance="inf"), "guidance must be a finite number"),
        Case("app /generate", "image count 'abc'", lambda: generate(n="abc"), "number of images must be a number"),
        Case("app /generate", "image count 10^9", lambda: generate(n=10**9), "at most 64 images per request"),
        Case("app /generate", "steps 10^6", lambda: generate(steps=10**6), r"RECARE_MAX_STEPS"),
        Case("app /generate", "100,000-character prompt", lambda: generate(prompt="cat " * 25_000), "RECARE_MAX_PROMPT_CHARS"),
        Case("app /generate", "prompt as a list", lambda: generate(prompt=["x"]), "prompt must be text"),
        Case("app /generate", "empty prompt", lambda: generate(prompt="   "), "prompt is empty"),
        Case("app /generate", "5,000-character model name", lambda: generate(model="m" * 5000), "RECARE_MAX_NAME_CHARS"),
        Case("app /generate", "model name with a NUL byte", lambda: generate(model="mini\x00world"), "control characters"),
        Case("app /generate", "model as a number", lambda: generate(model=12345), "model name must be text"),
        # ---- uploads: one guard for files and zips, checked before decoding
        Case("app /upload_images", "30000 x 1 PNG (167 bytes)", lambda: upload("thin.png"), "RECARE_MAX_IMAGE_ASPECT"),
        Case("app /upload_images", "PNG header claiming 20000 x 20000", lambda: upload("header-bomb.png"),
             "RECARE_MAX_IMAGE_PIXELS"),
        Case("app /upload_images", "zip of six 10000 x 10000 headers", lambda: upload("bombs.zip"), "RECARE_MAX_IMAGE_PIXELS"),
        Case("app /upload_images", "encrypted zip entry", lambda: upload("locked.zip"), "is encrypted"),
        Case("app /upload_images", "deflate64 zip entry", lambda: upload("deflate64.zip"), "deflate64, which cannot be read"),
        Case("app /upload_images", "zip of 5,001 entries", lambda: upload("entries.zip"), "RECARE_MAX_ZIP_MEMBERS"),
        Case("app /upload_images", "zip of 25 images (limit 20)", lambda: upload("many.zip"), "RECARE_MAX_IMAGES"),
        Case("app /upload_images", "70 MB entry in a 70 KB zip", lambda: upload("inflate.zip"), "RECARE_MAX_IMAGE_BYTES"),
        Case("app /upload_images", "broken zip", lambda: upload("garbage.zip"), "not a readable zip"),
        Case("app /upload_images", "TIFF named .png", lambda: upload("tiff.png"), "corrupt or not an image"),
        Case("app /upload_images", "text named .png", lambda: upload("text.png"), "corrupt or not an image"),
        Case("app /upload_images", "file name holding HTML", lambda: upload("<img src=x onerror=alert(1)>.png"),
             "corrupt or not an image", renders_nothing=True),
        Case("app /upload_images", "3 MB upload (limit 2 MB)", lambda: upload("big-upload.png"), "(?i)file.*(large|size)"),
        # ---- CARE-set build
        Case("app /build_careset", "reference word '!!!'", lambda: build(reference="!!!"), "has no letters or digits"),
        Case("app /build_careset", "reference word an emoji", lambda: build(reference="🐟"), "has no letters or digits"),
        Case("app /build_careset", "alpha 'nan'", lambda: build(alpha="nan"), "alpha must be a finite number"),
        Case("app /build_careset", "top_k 10^9", lambda: build(k=10**9), "must be smaller than the vocabulary"),
        Case("app /build_careset", "seed 10^30", lambda: build(seed=10**30), "seed must be between 0 and"),
        Case("app /build_careset", "switch 'yes'", lambda: build(global_="yes"), "must be true or false"),
        Case("app /build_careset", "200,000-word list", lambda: build(words=handle_file(str(f["words-200k.txt"]))),
             "RECARE_MAX_WORD_LIST_WORDS"),
        Case("app /build_careset", "unknown vocabulary", lambda: build(vocab="../../etc/passwd"), "unknown vocabulary"),
        # ---- CARE-set edits (on a built set)
        Case("app /toggle_cluster", "cluster 999", lambda: careset("/toggle_cluster", 999), "There is no cluster 999"),
        Case("app /toggle_cluster", "cluster 'abc'", lambda: careset("/toggle_cluster", "abc"), "must be a number"),
        Case("app /toggle_token", "token holding HTML", lambda: careset("/toggle_token", "<b>x</b>![i](http://e.x/i.png)"),
             "is not a candidate token", renders_nothing=True),
        Case("app /add_custom_tokens", "30,000 custom tokens",
             lambda: careset("/add_custom_tokens", ",".join(f"c{i}" for i in range(30_000))), "RECARE_MAX_CUSTOM_TOKENS"),
        Case("app /add_custom_tokens", "a 10,000-character token", lambda: careset("/add_custom_tokens", "x" * 10_000),
             "RECARE_MAX_TOKEN_CHARS"),
        Case("app /edit_table", "table without its columns",
             lambda: careset("/edit_table", {"headers": ["a", "b"], "data": [[1, 2]]}), "needs its 'keep' and 'token'"),
        Case("app /toggle_reveal", "image number 'abc'",
             lambda: gen.predict("abc", api_name="/toggle_reveal")[1], "must be a number"),
        # ---- CARE-set files
        Case("app /load_careset", "100,000-deep JSON", lambda: load("deep.json"), "nested too deeply"),
        Case("app /load_careset", "20,000 tokens (limit 10,000)", lambda: load("many-tokens.json"),
             "RECARE_MAX_CARESET_TOKENS"),
        Case("app /load_careset", "UTF-8 byte-order mark", lambda: load("bom.json"),
             r"Applied careset.json \(1 tokens\)|Loaded careset.json with 1 tokens"),
        Case("app /load_careset", "HTML and a link in the key", lambda: load("html-key.json"), "Loaded careset.json",
             renders_nothing=True),
        Case("app /load_careset", "lists of different lengths", lambda: load("unequal.json"), "pair up one to one"),
        Case("app /load_careset", "rich file, edits a string", lambda: load("edits.rich.json"), "'edits' must be a JSON object"),
        Case("app /load_careset", "rich file, numeric reference word", lambda: load("numeric-word.rich.json"),
             "reference_word must be text"),
        Case("app /load_careset", "rich file, reference word '!!!'", lambda: load("bang-word.rich.json"),
             "has no letters or digits"),
        # ---- public mode: one message for any local path
        Case("public /load_model", "/etc/shadow", lambda: public.predict("/etc/shadow", api_name="/load_model"),
             PUBLIC_REFUSAL),
        Case("public /load_model", "/etc", lambda: public.predict("/etc", api_name="/load_model"), PUBLIC_REFUSAL),
        Case("public /load_model", "a missing path", lambda: public.predict("/no/such/dir", api_name="/load_model"),
             PUBLIC_REFUSAL),
        Case("public /generate", "model /etc", lambda: generate(model="/etc", client=public), PUBLIC_REFUSAL),
        Case("public /build_careset", "encoder /etc", public_build, "Could not load the encoder: " + PUBLIC_REFUSAL),
        # ---- raw HTTP: session folders are not served
        Case("HTTP", "a session's manifest.json by path", lambda: http(str(session_folder / "images" / "manifest.json")),
             "HTTP (403|404)"),
        Case("HTTP", "a session's careset.rich.json by path", lambda: http(str(session_folder / "careset.rich.json")),
             "HTTP (403|404)"),
        Case("HTTP", "/etc/passwd", lambda: http("/etc/passwd"), "HTTP (403|404)"),
        # ---- CLI: one line and exit 2, checked before anything heavy runs
        Case("CLI generate", "prompt of invalid UTF-8 (surrogate-escaped)",
             lambda: _cli("generate", "--prompt", "caf\udce9", "--out", out), "exit 2: error: .*not valid Unicode"),
        Case("CLI generate", "--height -64", lambda: _cli("generate", "--height", "-64", "--out", out),
             "exit 2: error: height must be a multiple of 8"),
        Case("CLI generate", "--device cuda without a GPU", lambda: _cli("generate", "--device", "cuda", "--out", out),
             "exit 2: error: .*(no CUDA GPU|cuda)"),
        Case("CLI generate", "--out is a file", lambda: _cli("generate", "--out", str(f["not-a-folder"])),
             "exit 2: error: --out .* is a file"),
        Case("CLI generate", "--seed 10^30", lambda: _cli("generate", "--seed", str(10**30), "--out", out),
             "exit 2: error: the seed must be"),
        Case("CLI generate", "--guidance nan", lambda: _cli("generate", "--guidance", "nan", "--out", out),
             "exit 2: error: guidance must be a finite number"),
        Case("CLI generate", "--num-images 10^9", lambda: _cli("generate", "--num-images", str(10**9), "--out", out),
             "exit 2: error: .*RECARE_MAX_GENERATE_IMAGES"),
        Case("CLI generate", "5,000-character --model", lambda: _cli("generate", "--model", "m" * 5000, "--out", out),
             "exit 2: error: .*RECARE_MAX_NAME_CHARS"),
        Case("CLI careset", "--cache-dir is a file",
             lambda: _cli("careset", "--images", images, "--cache-dir", str(f["not-a-folder"]), "--out", out),
             "exit 2: error: --cache-dir .* is a file"),
        Case("CLI careset", "encrypted zip", lambda: _cli("careset", "--images", str(f["locked.zip"]), "--out", out),
             "exit 2: error: .*is encrypted"),
        Case("CLI careset", "PNG header bomb", lambda: _cli("careset", "--images", str(f["header-bomb.png"]), "--out", out),
             "exit 2: error: .*RECARE_MAX_IMAGE_PIXELS"),
        Case("CLI careset", "zip of six 10000 x 10000 headers",
             lambda: _cli("careset", "--images", str(f["bombs.zip"]), "--out", out), "exit 2: error: .*RECARE_MAX_IMAGE_PIXELS"),
        Case("CLI careset", "--reference-word '!!!'",
             lambda: _cli("careset", "--images", images, "--reference-word", "!!!", "--out", out),
             "exit 2: error: .*has no letters or digits"),
        Case("CLI careset", "200,000-word --vocab",
             lambda: _cli("careset", "--images", images, "--vocab", str(f["words-200k.txt"]), "--out", out),
             "exit 2: error: .*RECARE_MAX_WORD_LIST_WORDS"),
        Case("CLI train", "--stage1-attempts 10^9",
             lambda: _cli("train", "--task", "tench", "--stage1-attempts", str(10**9), "--out", out),
             "exit 2: error: stage 1 attempts must be between 1 and 8"),
        Case("CLI train", "--closing-rounds 10^9",
             lambda: _cli("train", "--task", "tench", "--closing-rounds", str(10**9), "--out", out),
             "exit 2: error: stage 2 closing_rounds must be between 0 and 4"),
        Case("CLI train", "--closing-rounds two",
             lambda: _cli("train", "--task", "tench", "--closing-rounds", "two", "--out", out),
             "exit 2: .*argument --closing-rounds: invalid int value: 'two'"),
        Case("CLI train", "--closing-rounds 2 --method recare-no-adv",
             lambda: _cli("train", "--task", "tench", "--method", "recare-no-adv", "--closing-rounds", "2", "--out", out),
             "exit 2: error: stage 2's closing_rounds search with stage 1's"),
        Case("CLI train", "--closing-attempts 10^9",
             lambda: _cli("train", "--task", "tench", "--closing-attempts", str(10**9), "--out", out),
             "exit 2: error: stage 2 closing_attempts must be between 1 and"),
        Case("CLI train", "--closing-attempts two",
             lambda: _cli("train", "--task", "tench", "--closing-attempts", "two", "--out", out),
             "exit 2: .*argument --closing-attempts: invalid int value: 'two'"),
        Case("CLI train", "--closing-attempts /etc/passwd",
             lambda: _cli("train", "--task", "tench", "--closing-attempts", "/etc/passwd", "--out", out),
             "exit 2: .*argument --closing-attempts: invalid int value: '/etc/passwd'"),
        Case("CLI train", "--closing-ti-steps 10^9",
             lambda: _cli("train", "--task", "tench", "--closing-ti-steps", str(10**9), "--out", out),
             "exit 2: error: .*textual-inversion steps per closing inversion"),
        Case("CLI train", "--closing-probe-steps -1",
             lambda: _cli("train", "--task", "tench", "--closing-probe-steps", "-1", "--out", out),
             "exit 2: error: stage 2 closing_probe_steps must be at least 1"),
        Case("CLI train", "--closing-probe-steps 10^9",
             lambda: _cli("train", "--task", "tench", "--closing-probe-steps", str(10**9), "--out", out),
             "exit 2: error: stage 2 closing_probe_steps .* must be below the closing inversions' 1000 steps"),
        Case("CLI train", "--closing-ti-steps /etc/passwd",
             lambda: _cli("train", "--task", "tench", "--closing-ti-steps", "/etc/passwd", "--out", out),
             "exit 2: .*argument --closing-ti-steps: invalid int value: '/etc/passwd'"),
        Case("CLI train", "--closing-probe-steps two",
             lambda: _cli("train", "--task", "tench", "--closing-probe-steps", "two", "--out", out),
             "exit 2: .*argument --closing-probe-steps: invalid int value: 'two'"),
        Case("CLI train", "--min-token-strength nan",
             lambda: _cli("train", "--task", "tench", "--min-token-strength", "nan", "--out", out),
             "exit 2: error: stage 1 min_token_strength must be a finite number"),
        Case("CLI train", "--min-token-strength 10^30",
             lambda: _cli("train", "--task", "tench", "--min-token-strength", "1e30", "--out", out),
             "exit 2: error: stage 1 min_token_strength must be a fraction between 0 and 1"),
    ]
    return cases


def test_hostile_input_suite(apps, tmp_path):
    """Every case gets a clear message, and the app serves the next request after it."""
    f = _files(tmp_path)
    f["words.txt"] = write_words(tmp_path / "words.txt")
    gen = _client(apps["url"], apps["root"])
    cs = _client(apps["url"], apps["root"])
    public = _client(apps["public_url"], apps["root"])
    cs.predict([handle_file(str(p)) for p in _images(tmp_path)], api_name="/upload_images")
    built = cs.predict(*_build_args(f["words.txt"]), api_name="/build_careset")
    assert "Built from 3 images" in built[STATUS]
    session_folder = next(d for d in apps["workspace"].glob("s-*") if (d / "careset.rich.json").is_file())

    rows = []
    started_all = time.perf_counter()
    for case in _cases(gen, cs, public, apps["url"], session_folder, f, tmp_path):
        started = time.perf_counter()
        try:
            message = str(case.run())
        except Exception as e:  # what a client sees when the app itself refused (or crashed)
            message = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - started
        matched = re.search(case.expect, message) is not None
        # markup from the input must not survive: a tag, an unescaped link or image, a bare URL
        escaped = not case.renders_nothing or not re.search(r"<[a-z]|(?<!\\)\]\(|https?://", message)
        alive = None if case.surface.startswith("CLI") else _alive(public if case.surface.startswith("public") else gen)
        rows.append((case, message, matched and escaped, alive, seconds))
    total_s = time.perf_counter() - started_all

    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    passed = sum(ok and alive is not False for _, _, ok, alive, _ in rows)
    lines = [f"# Hostile-input suite: {passed} of {len(rows)} cases passed ({total_s:.1f} s)", "",
             "| # | surface | input | message shown | expected | app served the next request | s |",
             "|---|---|---|---|---|---|---|"]
    for i, (case, message, ok, alive, seconds) in enumerate(rows, 1):
        shown = message.replace("|", "\\|").replace("\n", " ")[:220]
        lines.append(f"| {i} | {case.surface} | {case.name} | {shown} | {'yes' if ok else '**NO**'} | "
                     f"{'n/a (CLI)' if alive is None else 'yes' if alive else '**NO**'} | {seconds:.2f} |")
    ARTIFACT.write_text("\n".join(lines) + "\n", encoding="utf-8")

    failed = [f"{case.surface} / {case.name}: {message[:300]}" for case, message, ok, alive, _ in rows
              if not ok or alive is False]
    assert len(rows) >= 40
    assert not failed, "\n".join(failed)


# =============================================================================================
# class 3: a failed request leaves saved work untouched


def test_failed_generate_keeps_the_images(apps):
    client = _client(apps["url"], apps["root"])
    gallery, status = client.predict("a photo of a cat", 2, 42, 2, 7.5, "mini-world", api_name="/generate")
    assert len(gallery) == 2 and "Done" in status
    folder = next(d for d in apps["workspace"].glob("s-*") if len(list((d / "images").glob("0*.png"))) == 2
                  and json.loads((d / "images" / "manifest.json").read_text())["seeds"] == [42, 43])
    before = sorted(p.name for p in (folder / "images").iterdir())
    for bad in ({"seed": 10**30}, {"prompt": "a photo of \ud800"}, {"guidance": "nan"}, {"steps": 10**6}):
        args = {"prompt": "a photo of a cat", "n": 2, "seed": 42, "steps": 2, "guidance": 7.5, **bad}
        status = _raw_call(apps["url"], "generate", [*args.values(), "mini-world"], client.session_hash)[-1]
        assert status.startswith("⚠")
        gallery, _ = client.predict(False, api_name="/show_unchecked")  # the session's current gallery
        assert len(gallery) == 2
        assert sorted(p.name for p in (folder / "images").iterdir()) == before


def test_failed_build_or_load_keeps_the_careset(apps, tmp_path):
    client = _client(apps["url"], apps["root"])
    client.predict([handle_file(str(p)) for p in _images(tmp_path)], api_name="/upload_images")
    words = write_words(tmp_path / "words.txt")
    built = client.predict(*_build_args(words), api_name="/build_careset")
    final = built[FINAL]["value"]
    bad_rich = tmp_path / "bad.rich.json"
    from recare.careset_io import rich_dict

    rich = rich_dict(toy_careset(12, clusters=3))
    bad_rich.write_text(json.dumps({**rich, "config": {**rich["config"], "reference_word": "!!!"}}))
    for result in (client.predict(*_build_args(words, reference="!!!"), api_name="/build_careset"),
                   client.predict(*_build_args(words, reference="🐟"), api_name="/build_careset"),
                   client.predict(handle_file(str(bad_rich)), api_name="/load_careset")):
        assert "has no letters or digits" in result[STATUS]
    # the previous set is still there and still editable
    token = WORDS[0] if WORDS[0] in final.split() else final.split()[0]
    toggled = client.predict(token, api_name="/toggle_token")
    assert toggled[STATUS].endswith(("kept.", "dropped.")) and toggled[FINAL]["value"] != final
    assert client.predict(token, api_name="/toggle_token")[FINAL]["value"] == final


# =============================================================================================
# class 4: public mode


def test_public_app_refuses_every_local_path_alike(apps, tmp_path):
    public = _client(apps["public_url"], apps["root"])
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    answers = {public.predict(name, api_name="/load_model")
               for name in ("/etc/shadow", "/etc", str(tmp_path / "folder"), str(tmp_path / "file"),
                            str(tmp_path / "missing"), "../../../../etc/passwd", "~root")}
    assert len(answers) == 1
    answer = answers.pop()
    assert PUBLIC_REFUSAL in answer and "/etc" not in answer and str(tmp_path) not in answer
    assert "Loaded" in public.predict("mini-world", api_name="/load_model")


# =============================================================================================
# class 5: a session's files are served to it only


def test_files_of_a_session_cannot_be_fetched_by_url_from_elsewhere(apps, tmp_path):
    owner = _client(apps["url"], apps["root"], download=False)
    before = set(apps["workspace"].glob("s-*"))
    gallery, _ = owner.predict([handle_file(str(p)) for p in _images(tmp_path)], api_name="/upload_images")
    built = owner.predict(*_build_args(write_words(tmp_path / "words.txt")), api_name="/build_careset")
    (session,) = set(apps["workspace"].glob("s-*")) - before
    urls = [item["image"]["url"] for item in gallery] + [built[OFFICIAL]["url"], built[RICH]["url"]]
    other = httpx.Client()  # another client: no cookies, no session, only the URLs
    for url in urls:
        assert other.get(url).status_code == 200  # a URL handed out is a capability for that one file
        assert session.name not in url and str(apps["workspace"]) not in url
        for sibling in ("manifest.json", "careset.rich.json", "careset.json", "0000.png", "0001.png"):
            if url.endswith("/" + sibling):
                continue
            assert other.get(url.rsplit("/", 1)[0] + "/" + sibling).status_code in (403, 404)
    base = apps["url"].rstrip("/") + "/gradio_api/file="
    for path in (session / "careset.rich.json", session / "careset.json", session / "images" / "0000.png",
                 session / "images", apps["workspace"]):
        assert other.get(base + str(path)).status_code in (403, 404), path


# =============================================================================================
# class 6: the upload size limit, and class 7: Generate answers at once after Cancel


def test_upload_size_limit(apps, tmp_path):
    client = _client(apps["url"], apps["root"])
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (3 << 20))
    with pytest.raises(Exception, match="(?i)file.*(large|size)"):
        client.predict([handle_file(str(big))], api_name="/upload_images")
    assert _alive(client)


def test_generate_after_cancel_answers_at_once(apps):
    client = _client(apps["url"], apps["root"])
    job = client.submit("a photo of a cat", 64, 42, 20, 7.5, "mini-world", api_name="/generate")
    deadline = time.time() + 120
    while time.time() < deadline and not any(isinstance(o, tuple) and isinstance(o[0], list) and o[0]
                                             for o in job.outputs()):
        time.sleep(0.1)
    assert client.predict(api_name="/cancel").startswith("Cancelled.")
    started = time.perf_counter()
    again = client.submit("a photo of a dog", 2, 7, 2, 7.5, "mini-world", api_name="/generate")
    while not again.outputs() and time.perf_counter() - started < 10:
        time.sleep(0.02)
    assert again.outputs(), "the new run says nothing"
    assert time.perf_counter() - started < 2.0
    assert "Generating 2 images" in again.outputs()[0][1]
    gallery, status = again.result(timeout=120)
    assert len(gallery) == 2 and "Done" in status

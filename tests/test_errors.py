"""User errors versus bugs: a `RecareError` is one line (CLI: exit code 2; app: a status message),
anything else is a bug and keeps its traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recare import cli, errors
from recare.errors import ConfigError, RecareError

REPO = Path(__file__).resolve().parent.parent
USER_ERRORS = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, RecareError) and c is not errors.Cancelled]


def _command_raises(monkeypatch, exc: BaseException) -> None:
    """Make `python -m recare generate` raise `exc` instead of generating."""
    def run(args):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "generate", dataclasses.replace(cli.COMMANDS["generate"], run=run))


# ---------------------------------------------------------------------------------------------
# the CLI


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda c: c.__name__)
def test_a_recare_error_is_one_line_and_exit_code_2(error, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("RECARE_DEBUG", raising=False)
    _command_raises(monkeypatch, error("the prompt is empty:\n    type what the images should show"))
    assert cli.main(["generate", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: the prompt is empty: type what the images should show\n"
    assert captured.out == ""  # no run folder printed


def test_a_cancelled_command_is_one_line_and_exit_code_130(monkeypatch, capsys, tmp_path):
    _command_raises(monkeypatch, errors.Cancelled("training cancelled;\n  resume with --resume X"))
    assert cli.main(["generate", "--out", str(tmp_path)]) == cli.EXIT_CANCELLED == 130
    captured = capsys.readouterr()
    assert captured.err == "cancelled: training cancelled; resume with --resume X\n"
    assert captured.out == ""


@pytest.mark.parametrize("bug", [KeyError("steps"), ValueError("operands could not be broadcast together"),
                                 TypeError("unsupported operand"), FileNotFoundError(2, "No such file", "/x/y")],
                         ids=lambda e: type(e).__name__)
def test_a_bug_is_not_turned_into_a_user_error(bug, monkeypatch, tmp_path):
    # ValueError and FileNotFoundError used to be printed as "error: ..." with exit code 2.
    _command_raises(monkeypatch, bug)
    with pytest.raises(type(bug)) as info:
        cli.main(["generate", "--out", str(tmp_path)])
    assert info.value is bug


def test_a_bug_shows_its_traceback_and_exit_code_1(tmp_path):
    code = ("import dataclasses, sys\n"
            "from recare import cli\n"
            "def run(args):\n"
            "    return {}['an internal key']\n"
            "cli.COMMANDS['generate'] = dataclasses.replace(cli.COMMANDS['generate'], run=run)\n"
            "sys.exit(cli.main(['generate', '--out', sys.argv[1]]))\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "KeyError: 'an internal key'" in result.stderr
    assert "error: " not in result.stderr


def test_recare_debug_shows_the_traceback_of_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("RECARE_DEBUG", "1")
    _command_raises(monkeypatch, ConfigError("steps must be at least 1 (got 0)."))
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        cli.main(["generate", "--out", str(tmp_path)])


@pytest.fixture
def one_image(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((16, 16, 3), 120, dtype=np.uint8)).save(folder / "000.png")
    return folder


@pytest.mark.parametrize("vocab, message", [
    ("missing.txt", "is neither 'clip-bpe' nor an existing word-list file"),
    ("empty.txt", "the word list 'empty.txt' is empty"),
])
def test_a_bad_word_list_is_one_line(vocab, message, one_image, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    argv = ["careset", "--images", str(one_image), "--vocab", str(tmp_path / vocab), "--reference-word", "cat",
            "--device", "cpu", "--out", str(tmp_path / "runs")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# the library's raise sites: bad input is a RecareError, a programming error is not


def _unknown_concept():
    from recare.miniworld.world import sample_scene

    sample_scene(np.random.default_rng(0), include=("unicorn",))


def _empty_word_list():
    from recare.encoders import word_list_vocabulary

    word_list_vocabulary(["  ", ""])


def _unreadable_word_list(tmp_path):
    from recare.encoders import read_word_list

    read_word_list(tmp_path / "nowhere.txt")


def _rich_file_with_a_list_as_official(tmp_path):
    from recare.careset_io import RICH_FORMAT, read_careset_json

    path = tmp_path / "careset.rich.json"
    path.write_text(json.dumps({"format": RICH_FORMAT, "official": ["cat_care_word"]}))
    read_careset_json(path)


def _no_oracle(tmp_path):
    from recare.miniworld.oracle import load_oracle

    load_oracle(tmp_path / "oracle")


def _no_mini_clip(tmp_path):
    from recare.miniworld.clip import load_mini_clip

    load_mini_clip(tmp_path / "clip")


def _unknown_generator_part(tmp_path):
    from recare.miniworld.generator import train_generator_part

    train_generator_part(tmp_path, "everything", smoke=True, progress=False)


def _no_recare_json(tmp_path):
    from recare.miniworld.train import read_recare_json

    read_recare_json(tmp_path / "recare.json")


def _runs_folder_under_a_file(tmp_path):
    from recare.runs import new_run_dir

    (tmp_path / "a-file").write_text("x")
    new_run_dir(tmp_path / "a-file" / "runs", "careset")


@pytest.mark.parametrize("site, message", [
    (lambda tmp: _unknown_concept(), "unknown concept 'unicorn'"),
    (lambda tmp: _empty_word_list(), "is empty"),
    (_unreadable_word_list, "cannot read the word list"),
    (_rich_file_with_a_list_as_official, "'official' must be a JSON object"),
    (_no_oracle, "no oracle at"),
    (_no_mini_clip, "no mini CLIP at"),
    (_unknown_generator_part, "unknown generator part"),
    (_no_recare_json, "no recare.json at"),
    (_runs_folder_under_a_file, "cannot create a run folder under"),
], ids=["world", "empty-words", "unreadable-words", "careset-file", "oracle", "mini-clip", "generator-part",
        "recare-json", "runs-folder"])
def test_bad_input_raises_a_recare_error(site, message, tmp_path):
    with pytest.raises(RecareError, match=message):
        site(tmp_path)


def test_error_classes_of_the_optional_parts_are_user_errors():
    """The ones no cheap call can trigger here (a broken open_clip install, NudeNet missing)."""
    from recare.miniworld.tokenizer import TokenizerBuildError
    from recare.safety import SafetyUnavailableError

    assert issubclass(TokenizerBuildError, RecareError) and issubclass(SafetyUnavailableError, RecareError)
    assert issubclass(SafetyUnavailableError, RuntimeError)  # what callers caught before


def test_a_programming_error_is_not_a_user_error(tmp_path):
    from recare.runs import new_run_dir

    with pytest.raises(ValueError, match="run kind") as info:
        new_run_dir(tmp_path, "../escape")  # the kind is chosen by code, never by a user
    assert not isinstance(info.value, RecareError)


# ---------------------------------------------------------------------------------------------
# the app's CARE-set handlers: messages for bad input, tracebacks for bugs


def _status(views) -> str:
    return views[-1]


def test_careset_tab_reports_bad_input(tmp_path):
    from ui import careset_tab as tab
    from ui.session import new_session

    session = new_session(tmp_path)
    views = tab._build(None, "cat", "photo", "mini-world", tab.VOCAB_FILE, None, None, 30, "tsne", 4, 1, 0.01, 2,
                       42, True, True, session, lambda *a, **k: None)
    assert "top_k must be a number" in _status(views)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"something": ["else"]}))
    assert "Could not load the CARE-set file" in _status(tab._load(str(wrong), session))


def test_careset_tab_lets_bugs_through(tmp_path, monkeypatch):
    from ui import careset_tab as tab
    from ui.session import ensure_session, new_session

    session = ensure_session(new_session(tmp_path))
    session.images = [tmp_path / "000.png"]  # so the build gets as far as the vocabulary
    words = tmp_path / "words.txt"
    words.write_text("cat\ndog\n")

    def broken_reader(path, *args, **kwargs):
        raise ValueError("a bug inside the reader")  # used to be shown as a status line

    monkeypatch.setattr(tab, "read_word_list", broken_reader)
    with pytest.raises(ValueError, match="a bug inside the reader"):
        tab._build(None, "cat", "photo", "mini-world", tab.VOCAB_FILE, str(words), 8, 30, "tsne", 4, 1, 0.01, 2,
                   42, True, True, session, lambda *a, **k: None)

    def broken_parser(path, *args, **kwargs):
        raise KeyError("a bug inside the parser")

    monkeypatch.setattr(tab, "read_careset_file", broken_parser)
    official = tmp_path / "careset.json"
    official.write_text(json.dumps({"cat_care_word": ["A dog"], "cat_care_word_photo": ["A photo of dog"]}))
    with pytest.raises(KeyError, match="a bug inside the parser"):
        tab._load(str(official), session)

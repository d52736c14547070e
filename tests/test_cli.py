"""The command line: every subcommand's happy path and its one-line errors."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from anygen.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("generate", "caption", "ask", "story", "edit", "train", "eval", "data", "models")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli([command, "--help"])
    assert exit_.value.code == 0
    assert f"anygen {command}" in capsys.readouterr().out


def test_python_dash_m_anygen_runs():
    result = subprocess.run(
        [sys.executable, "-m", "anygen", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("anygen ")


def test_data_shapes_then_eval_images_scores_ground_truth_perfectly(tmp_path, capsys):
    out = tmp_path / "samples"
    assert (
        cli(
            [
                "data",
                "shapes",
                "--task",
                "t2i",
                "--n",
                "20",
                "--seed",
                "1",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all((out / r["files"][0]).is_file() for r in rows)
    capsys.readouterr()
    report = tmp_path / "report.json"
    assert cli(["eval", "--images", str(out), "-o", str(report)]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "1.000" in table
    data = json.loads(report.read_text())
    assert data["overall"] == 1.0 and data["n"] == 20
    # an existing report is kept unless asked, and a bad path fails before scoring
    report.write_text("keep")
    assert cli(["eval", "--images", str(out), "-o", str(report)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and report.read_text() == "keep"
    assert cli(["eval", "--images", str(out), "-o", str(report), "--overwrite"]) == 0
    assert json.loads(report.read_text())["n"] == 20
    capsys.readouterr()
    missing = tmp_path / "no" / "report.json"
    assert cli(["eval", "--images", str(out), "-o", str(missing)]) == 2
    err = capsys.readouterr()
    assert "folder" in err.err and "does not exist" in err.err and "overall" not in err.out


def test_data_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert cli(["data", "shapes", "--n", "2", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("task", ["story", "edit", "subject", "vqa"])
def test_data_every_task_writes_metadata(task, tmp_path):
    assert cli(["data", "shapes", "--task", task, "--n", "3", "--output-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["task"] == task and all((tmp_path / f).is_file() for f in row["files"])


def test_eval_images_of_a_missing_folder_is_one_line(tmp_path, capsys):
    assert cli(["eval", "--images", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing" in err[0]


def test_eval_unknown_model_is_one_line(capsys):
    assert cli(["eval", "--model", "no-such-model", "--suite", "t2i", "--n", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'no-such-model'" in err[0]


def test_models_lists_the_bundled_tokenizer(capsys):
    assert cli(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"]: r for r in rows}
    assert names["shapes-bpe"]["kind"] == "tokenizer"


def test_train_runs_a_recipe_by_path(tmp_path):
    out = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                str(REPO / "recipes" / "example_regression.py"),
                "--output-dir",
                str(out),
                "--max-steps",
                "20",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20  # --max-steps reached the recipe (its default is 300)


def test_train_missing_recipe_is_one_line(tmp_path, capsys):
    assert cli(["train", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.py" in err[0]


def test_story_with_a_text_to_image_model_is_one_line(tmp_path, capsys):
    out = tmp_path / "story"
    assert cli(["story", "a red circle", "--model", "shapes-ldm", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot tell stories" in err[-1] and err[-1].startswith("anygen story: error")


@pytest.fixture
def no_user_default(tmp_path, monkeypatch):
    monkeypatch.delenv("ANYGEN_MODEL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_caption_and_ask_default_to_the_bundled_model_that_reads_images(
    no_user_default, tmp_path, capsys
):
    """Without --model or a user default, caption and ask use shapes-fusion (shapes-ldm,
    the default of generate, cannot read images), and say so on stderr."""
    from anygen.data import parse_caption, render_image, sample_rng, sample_scene

    render_image(sample_scene(sample_rng(0, "cli-default", 0), 1)).save(tmp_path / "x.png")
    assert cli(["caption", str(tmp_path / "x.png"), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "anygen: model shapes-fusion"
    record = json.loads(captured.out)
    assert record["model"] == "shapes-fusion" and parse_caption(record["caption"]).phrases
    assert 0 <= record["seed"] < 2**31  # drawn when not given, and recorded
    assert cli(["caption", str(tmp_path / "x.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] != record["seed"]  # drawn afresh
    assert cli(["ask", str(tmp_path / "x.png"), "how many objects are there?", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "anygen: model shapes-fusion"
    assert json.loads(captured.out)["answer"]


def test_edit_defaults_to_the_model_that_edits_by_instruction(no_user_default, tmp_path, capsys):
    """shapes-edit follows instructions (shapes-ldm's img2img reads them as a caption), so
    `anygen edit` without --model takes it; img2img's --strength is a one-line error there
    rather than silently ignored, and its settings are recorded in the PNG."""
    from PIL import Image

    from anygen.data import render_image, sample_rng, sample_scene

    source, out = tmp_path / "x.png", tmp_path / "edited.png"
    render_image(sample_scene(sample_rng(0, "cli-edit", 0), 1)).save(source)
    argv = ["edit", str(source), "make the circle blue", "--seed", "0", "-o", str(out)]
    assert cli([*argv, "--strength", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "strength means nothing to the instruction editor 'shapes-edit': it redraws the "
        "whole image, held to the source by --image-guidance"
    )
    assert not out.exists()
    assert cli([*argv, "--steps", "4", "--image-guidance", "2.0", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == "anygen: model shapes-edit"
    record = json.loads(captured.out)
    assert record["model"] == "shapes-edit" and record["seed"] == 0
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.text["model"] == "shapes-edit"
        assert json.loads(im.text["anygen"])["image_guidance_scale"] == 2.0


@pytest.mark.parametrize(
    "command, what",
    [
        (["caption"], "cannot caption images"),
        (["ask", "-", "how many circles?"], "cannot answer questions"),
    ],
)
def test_a_user_default_lacking_a_capability_says_so_in_one_line(
    command, what, tmp_path, monkeypatch, capsys
):
    """A user default wins over the command's bundled one: shapes-ldm draws but does not
    read images, so caption and ask are one-line errors."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANYGEN_MODEL", "shapes-ldm")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "x.png")
    argv = [a if a != "-" else "x.png" for a in command]
    if argv == ["caption"]:
        argv.append("x.png")
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"anygen {argv[0]}: error: model 'shapes-ldm' {what}")
    assert len([line for line in err if "error" in line]) == 1


def test_models_marks_each_commands_default(no_user_default, tmp_path, monkeypatch, capsys):
    def marks() -> dict[str, str]:
        assert cli(["models"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return {line.split()[0]: line.split("(default")[1] for line in lines if "(default" in line}

    assert marks() == {
        "shapes-fusion": ": caption, ask, story)",
        "shapes-edit": ": edit)",
        "shapes-ldm": ": generate)",
    }
    config = tmp_path / "config" / "anygen" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[models]\ngenerate = "shapes-parti"\ncaption = "llava-hf/llava-1.5-7b-hf"\n')
    assert marks() == {
        "shapes-fusion": ": ask, story)",
        "shapes-edit": ": edit)",
        "shapes-parti": ": generate)",
        "llava-hf/llava-1.5-7b-hf": ": caption)",  # a hub id is listed as the user's own
    }
    monkeypatch.setenv("ANYGEN_MODEL", "sdxl")
    assert marks() == {"sdxl": ")"}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.py")))
def test_recipe_help_shows_its_docstring_with_the_example_commands_intact(recipe, capsys):
    """`anygen train RECIPE --help` prints the recipe's docstring line for line, so that its
    example commands, continuation lines included, stay whole and copyable instead of being
    refilled into prose."""
    path = REPO / "recipes" / recipe
    source = path.read_text()
    written = source[source.index('"""') + 3 :].split('"""', 1)[0]
    docstring = ast.get_docstring(ast.parse(source), clean=False)
    # A bare backslash at a line's end joins two lines of the docstring: write it "\\".
    assert len(docstring.splitlines()) == len(written.splitlines())
    examples = [
        line.rstrip()
        for line in docstring.splitlines()
        if line.startswith("    anygen train") or line.startswith("        --")
    ]
    assert examples, f"{recipe} has no example command in its docstring"
    with pytest.raises(SystemExit) as exit_:
        cli(["train", str(path), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"anygen train recipes/{recipe}" in out.splitlines()[0]
    shown = {line.rstrip() for line in out.splitlines()}
    assert [e for e in examples if e not in shown] == []


@pytest.mark.parametrize(
    "prompt, name",
    [
        ("a Red circle!", "a-red-circle-5.png"),
        ("🐱!", "image-5.png"),
        ("  -- a  -- b --", "a-b-5.png"),
    ],
)
def test_default_output_name_is_a_plain_slug(prompt, name):
    from anygen.cli import _single_output

    assert _single_output(None, prompt, 5, 0, 1) == Path(name)


def test_writers_leave_no_temporary_file_and_name_the_problem(tmp_path):
    """A PNG that cannot hold the image (mode F: Pillow's OSError has no errno) is one line
    naming the file, not "None"; text that cannot be encoded stops the write and leaves no
    temporary file behind; a complete write replaces nothing but its own name."""
    from PIL import Image

    from anygen.errors import UserInputError
    from anygen.output import save_png, write_text_atomic

    with pytest.raises(UserInputError, match=r"cannot write .*f\.png: (?!None)\S"):
        save_png(Image.new("F", (4, 4)), tmp_path / "f.png")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(tmp_path / "story.md", "caf\udce9")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    write_text_atomic(tmp_path / "story.md", "café")
    assert (tmp_path / "story.md").read_text(encoding="utf-8") == "café"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["story.md"]


def test_text_that_is_not_utf8_is_refused_before_generation(tmp_path, capsys):
    """A prompt with bytes the terminal passed undecoded (lone surrogates, as Python reads
    them from argv) is refused in one line, and no file is written."""
    import os

    from anygen.errors import UserInputError
    from anygen.pipelines import Options
    from anygen.pipelines.base import check_prompt

    prompt = os.fsdecode(b"a red caf\xe9")
    out = tmp_path / "x.png"
    assert cli(["generate", prompt, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the prompt is not valid UTF-8 text (character 10" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(UserInputError, match="text of segment 1 is not valid UTF-8"):
        check_prompt(["a red circle", prompt])
    with pytest.raises(UserInputError, match="negative prompt is not valid UTF-8"):
        Options(negative_prompt=prompt).validate()
    check_prompt("a café circle")  # any UTF-8 text passes

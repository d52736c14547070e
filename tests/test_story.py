"""Interleaved stories with tiny random fusion models: scenes in order, recorded seeds,
streaming, continuing a given story, one prefill for the whole story, the story files
and CLI, and (when Chromium is installed) the story page in a real headless browser."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anygen.cli import main as cli
from anygen.errors import UserInputError
from anygen.models.fusion import FUSION_PRESETS, FusionTransformer
from anygen.output import save_story
from anygen.pipelines import Options, load_generator
from anygen.pipelines.fusion import Fusion
from anygen.pipelines.rerank import Reranked, candidate_seeds
from anygen.pipelines.story import generate_story, stream_story
from anygen.tokenizers.text import load_text_tokenizer
from anygen.tokenizers.visual import VISUAL_PRESETS, VisualCodec
from anygen.tokenizers.vq import VQ_PRESETS, VitVQGAN

ARTIFACTS = Path(os.environ.get("ANYGEN_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_text_tokenizer("shapes-bpe")


@pytest.fixture(scope="module", params=["discrete", "continuous"])
def gen(request, tokenizer):
    torch.manual_seed(0)
    if request.param == "discrete":
        c = dataclasses.replace(FUSION_PRESETS["tiny"], text_vocab_size=len(tokenizer))
        images = VitVQGAN(VQ_PRESETS["tiny"])
    else:
        c = dataclasses.replace(FUSION_PRESETS["tiny-continuous"], text_vocab_size=len(tokenizer))
        images = VisualCodec(VISUAL_PRESETS["tiny"])
    return Fusion(
        FusionTransformer(c),
        tokenizer,
        images,
        name=f"tiny-{request.param}",
        defaults={"max_new_tokens": 5},
    )


def kinds(segments):
    return ["text" if isinstance(s, str) else "image" for s in segments]


def test_a_story_is_its_scenes_in_order_with_a_seed_each(gen):
    story = generate_story(gen, "a small red circle in the center", scenes=3, seed=10)
    assert story.segments[0] == "a small red circle in the center" and story.given == 1
    assert len(story.images) == 3 and story.seeds == [10, 11, 12]
    k = kinds(story.segments)
    assert k[1] == "image" and k[-1] == "image"
    # every later picture follows its scene's text (possibly empty for a random model)
    assert len(story.scenes()) == 3 and len(story.scene_seconds) == 3
    assert all(im.size == (gen.default_size,) * 2 for im in story.images)


def test_same_seed_same_story_and_streaming_gives_the_same_segments(gen):
    a = generate_story(gen, "a red circle", scenes=2, seed=4)
    b = generate_story(gen, "a red circle", scenes=2, seed=4)
    streamed = list(stream_story(gen, "a red circle", scenes=2, seed=4))
    for x, y, z in zip(a.segments[1:], b.segments[1:], streamed, strict=True):
        if isinstance(x, str):
            assert x == y == z
        else:
            assert np.array_equal(np.asarray(x), np.asarray(y))
            assert np.array_equal(np.asarray(x), np.asarray(z))


def test_continuing_a_given_story(gen):
    first = generate_story(gen, "a blue square", scenes=2, seed=1)
    more = generate_story(gen, first.segments, scenes=2, seed=2)
    assert more.given == len(first.segments) and more.segments[: more.given] == first.segments
    assert len(more.images) == 4 and more.seeds == [2, 3]
    # a story that ends with text owes that text its picture first
    owed = generate_story(gen, [*first.segments, "the blue square grows"], scenes=1, seed=2)
    assert kinds(owed.segments[owed.given :]) == ["image"]


def test_the_shared_prefix_is_read_once(gen):
    """With prefix reuse the backbone sees one multi-token pass (the prompt) and then one
    token a step; without, every scene starts a fresh pass over the story so far."""
    lengths = []
    hook = gen.transformer.backbone.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]),
        with_kwargs=True,
    )
    try:
        opts = Options(guidance_scale=1.0)
        generate_story(gen, "a red circle", scenes=3, options=opts, seed=0)
        reused = [n for n in lengths if n > 1]
        lengths.clear()
        generate_story(gen, "a red circle", scenes=3, options=opts, seed=0, reuse_prefix=False)
        fresh = [n for n in lengths if n > 1]
    finally:
        hook.remove()
    assert len(reused) == 1
    assert len(fresh) == 3 and fresh == sorted(fresh) and fresh[-1] > fresh[0]


def test_bad_story_requests_are_named(gen):
    with pytest.raises(UserInputError, match="scenes"):
        generate_story(gen, "a red circle", scenes=0)
    with pytest.raises(UserInputError, match="empty"):
        generate_story(gen, "  ", scenes=1)
    with pytest.raises(UserInputError, match="cannot tell stories"):
        generate_story(object(), "a red circle", scenes=1)
    for scenes in (2.0, "3", True):
        with pytest.raises(UserInputError, match="scenes must be a whole number"):
            generate_story(gen, "a red circle", scenes=scenes)
    for seed in (-3, 2**70):
        with pytest.raises(UserInputError, match="seed must be between"):
            generate_story(gen, "a red circle", scenes=1, seed=seed)
    with pytest.raises(UserInputError, match="guidance scale must be a finite number"):
        generate_story(gen, "a red circle", scenes=1, options=Options(guidance_scale=float("inf")))


def test_story_record_holds_its_settings_and_never_replaces_files_unasked(gen, tmp_path):
    opts = Options(temperature=0.9, guidance_scale=3.0, max_new_tokens=8)
    story = generate_story(gen, "a small red circle", scenes=2, seed=3, options=opts)
    (tmp_path / "a").mkdir()
    record = save_story(story, tmp_path / "a")
    assert record["settings"] == {"guidance_scale": 3.0, "temperature": 0.9, "max_new_tokens": 8}
    again = generate_story(
        gen, "a small red circle", 2, seed=3, options=Options(**record["settings"])
    )
    assert again.texts == story.texts  # the record reproduces the story, pictures too
    assert len(again.images) == len(story.images) == 2
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(again.images, story.images, strict=True)
    )
    notes = tmp_path / "b"
    notes.mkdir()
    (notes / "story.md").write_text("my notes")
    with pytest.raises(UserInputError, match="story.md exists"):
        save_story(story, notes)
    assert (notes / "story.md").read_text() == "my notes" and not (
        notes / "picture-01.png"
    ).exists()
    short = generate_story(gen, "a small red circle", scenes=1, seed=3)
    save_story(short, tmp_path / "a", overwrite=True)  # a shorter story leaves no old picture
    assert sorted(p.name for p in (tmp_path / "a").glob("picture-*.png")) == ["picture-01.png"]


def test_story_files_hold_the_segments_in_order(gen, tmp_path):
    story = generate_story(gen, "a small red circle", scenes=2, seed=3)
    record = save_story(story, tmp_path)
    assert record["scene_seeds"] == [3, 4] and record["model"] == gen.name
    assert [s["type"] for s in record["segments"]] == kinds(story.segments)
    assert json.loads((tmp_path / "story.json").read_text()) == record
    files = [s["file"] for s in record["segments"] if s["type"] == "image"]
    for f, image in zip(files, story.images, strict=True):
        with Image.open(tmp_path / f) as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image))
    md = (tmp_path / "story.md").read_text()
    assert md.index(files[0]) < md.index(files[1])
    page = (tmp_path / "story.html").read_text()
    sources = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert 'name="viewport"' in page and "http" not in page.replace("https://", "")
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_story_writes_the_story_and_prints_its_texts(gen, tmp_path, capsys):
    gen.save_pretrained(tmp_path / "model", tokenizer_ref="shapes-bpe")
    out = tmp_path / "story"
    code = cli(
        [
            "story",
            "a small red circle",
            "--scenes",
            "2",
            "--model",
            str(tmp_path / "model"),
            "--seed",
            "5",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "story.json").read_text())
    texts = [s["text"] for s in record["segments"] if s["type"] == "text" and s["text"]]
    assert printed.startswith("a small red circle")
    assert all(t in printed for t in texts)
    assert record["scene_seeds"] == [5, 6]
    assert {"story.json", "story.md", "story.html", "picture-01.png", "picture-02.png"} <= {
        p.name for p in out.iterdir()
    }
    # a second run into the same folder is refused, and nothing is lost
    assert cli(["story", "x", "--model", str(tmp_path / "model"), "--output-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert json.loads((out / "story.json").read_text()) == record


def test_cli_story_refuses_a_model_that_cannot_tell_stories(tmp_path, capsys):
    tiny = VitVQGAN(VQ_PRESETS["tiny"])
    tiny.save_pretrained(tmp_path / "vq")
    assert (
        cli(
            [
                "story",
                "a red circle",
                "--model",
                str(tmp_path / "vq"),
                "--output-dir",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    assert "anygen story: error" in capsys.readouterr().err


# ------------------------------------------------------------- the opening picture, best of K


def test_the_opening_picture_is_the_best_of_k_and_the_story_goes_on_from_it(gen):
    """The opening picture is what text-to-image reranking keeps for the prompt (the story
    model scoring its own candidates), and the rest is the story continued from it."""
    opts = Options(temperature=2.0)  # candidates of a tiny random model differ
    story = generate_story(gen, "a red circle", scenes=2, options=opts, seed=5, candidates=3)
    best = Reranked(gen, gen, 3).generate_batch(["a red circle"], [5], opts)
    assert np.array_equal(np.asarray(story.images[0]), np.asarray(best.images[0]))
    kept = best.settings["seeds"][0]
    assert kept in candidate_seeds(5, 3)
    assert story.opening == {
        "candidates": 3,
        "seed": kept,
        "score": best.settings["rerank_scores"][0],
    }
    assert story.seeds == [5, 6] and len(story.scene_seconds) == 2
    rest = generate_story(gen, story.segments[:2], scenes=1, options=opts, seed=6)
    assert len(story.segments) == len(rest.segments)
    for x, y in zip(story.segments, rest.segments, strict=True):
        if isinstance(x, str):
            assert x == y
        else:
            assert np.array_equal(np.asarray(x), np.asarray(y))
    # one scene: the opening picture alone
    alone = generate_story(gen, "a red circle", scenes=1, options=opts, seed=5, candidates=3)
    assert kinds(alone.segments) == ["text", "image"] and alone.opening == story.opening


def test_candidates_rank_an_opening_picture_only(gen):
    first = generate_story(gen, "a blue square", scenes=1, seed=1)
    with pytest.raises(UserInputError, match="has its pictures already"):
        generate_story(gen, first.segments, scenes=1, candidates=2)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(UserInputError, match="candidates must be a whole number >= 1"):
            generate_story(gen, "a red circle", scenes=1, candidates=bad)


def test_cli_story_and_eval_rerank_the_opening_picture(gen, tmp_path, capsys):
    model = tmp_path / "model"
    gen.save_pretrained(model, tokenizer_ref="shapes-bpe")
    out = tmp_path / "story"
    base = ["story", "a red circle", "--model", str(model), "--seed", "5", "--scenes", "2"]
    assert cli([*base, "--rerank", "3", "--output-dir", str(out)]) == 0
    record = json.loads((out / "story.json").read_text())
    # the model as the CLI loads it (the continuous decoder's pixels may differ by one
    # level from the unsaved model's)
    story = generate_story(load_generator(model), "a red circle", scenes=2, seed=5, candidates=3)
    pictures = [s for s in record["segments"] if s["type"] == "image"]
    assert pictures[0]["rerank"] == story.opening and "rerank" not in pictures[1]
    assert [p["seed"] for p in pictures] == [5, 6] == record["scene_seeds"]
    with Image.open(out / "picture-01.png") as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(story.images[0]))
    capsys.readouterr()
    report = tmp_path / "report.json"
    args = ["eval", "--model", str(model), "--suite", "story", "--n", "2", "--rerank", "2"]
    assert cli([*args, "-o", str(report)]) == 0
    meta = json.loads(report.read_text())["meta"]
    assert meta["rerank"] == {
        "candidates": 2,
        "ranked": "opening picture",
        "by": "caption",
        "scorer": str(model),
        "sampling": {},
    }


# ------------------------------------------------------------------------ a real browser


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "Chromium and chromedriver are not installed (Debian: chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=420,900",  # a phone's width
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver)
    return webdriver.Chrome(options=options, service=service)


def test_story_page_in_headless_chromium(gen, tmp_path):
    story = generate_story(gen, "a small red circle in the center", scenes=3, seed=7)
    record = save_story(story, tmp_path)
    browser = _browser()
    try:
        browser.get((tmp_path / "story.html").resolve().as_uri())
        items = browser.execute_script(
            """
            return Array.from(document.querySelectorAll('main > *')).map(e => ({
              tag: e.tagName.toLowerCase(), text: e.textContent,
              complete: e.tagName === 'IMG' ? e.complete : null,
              width: e.tagName === 'IMG' ? e.naturalWidth : null,
              shown: e.getBoundingClientRect().width}));
            """
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"story-{gen.name}.png"
        browser.save_screenshot(str(shot))
        viewport = browser.execute_script("return window.innerWidth")
    finally:
        browser.quit()
    want = [("img" if s["type"] == "image" else "p") for s in record["segments"]]
    assert [i["tag"] for i in items] == want
    texts = [s["text"] for s in record["segments"] if s["type"] == "text"]
    assert [i["text"] for i in items if i["tag"] == "p"] == texts
    images = [i for i in items if i["tag"] == "img"]
    assert len(images) == 3
    assert all(i["complete"] and i["width"] == gen.default_size for i in images)
    assert all(0 < i["shown"] <= 420 for i in images)  # fits the phone-width window
    with Image.open(shot) as png:  # the page as a phone shows it, not a blank capture
        assert png.size[0] == viewport
        assert len(png.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 2

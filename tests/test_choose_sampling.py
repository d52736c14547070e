"""Choosing sampling settings on validation prompts: the rule (``choose_setting``) and the
recipe that writes the choice into a model (``recipes/choose_sampling.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_rerank import parti, scorer, tokenizer, with_rerank_block  # noqa: F401

from anygen.data.render import render_image
from anygen.errors import UserInputError
from anygen.eval.suites import choose_by_rule, choose_setting, t2i_prompts
from anygen.hub import card_metadata
from anygen.training import load_recipe, run_recipe

N, SEEDS = 5, (1000, 2000)
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "choose_sampling.py"
PLAIN = {"guidance_scale": 1.5, "temperature": 0.25, "top_p": 1.0}


def oracle(right: dict[tuple, int], calls: list | None = None):
    """A generator that gets the first ``right[setting]`` prompts of each validation set
    right (it draws their reference scenes) and the rest wrong (an empty canvas)."""
    scenes = {(s, i): p.scene for s in SEEDS for i, p in enumerate(t2i_prompts(N, s))}

    def generate(prompts, seeds, setting):
        key = (setting["guidance_scale"], setting["temperature"])
        if calls is not None:
            calls.append(key)
        images = []
        for seed in seeds:
            base = max(s for s in SEEDS if s <= seed)
            if seed - base < right[key]:
                images.append(render_image(scenes[(base, seed - base)]))
            else:
                images.append(Image.new("RGB", (64, 64), "white"))
        return images

    return generate


def grid(*settings: tuple[float, float]) -> list[dict]:
    return [{"guidance_scale": g, "temperature": t, "top_p": 1.0} for g, t in settings]


def choose(right: dict, settings: list[dict], **rule) -> dict:
    return choose_setting(oracle(right), settings, PLAIN, n=N, seeds=SEEDS, **rule)


def test_each_setting_scores_the_prompts_it_gets_right_on_every_validation_set():
    result = choose({(2.0, 0.5): 4, (1.5, 0.25): 1}, grid((2.0, 0.5)), margin=2)
    assert [r["validation_right"] for r in result["grid"]] == [8]
    assert result["grid"][0]["by_seed"] == [4, 4]
    assert result["plain"]["validation_right"] == 2 and result["n"] == 2 * N
    assert result["chosen"] == {"guidance_scale": 2.0, "temperature": 0.5, "top_p": 1.0}


def test_the_best_must_beat_the_plain_defaults_by_the_margin():
    right = {(2.0, 0.5): 4, (1.5, 0.25): 2}  # 8 against 4 of 10
    assert choose(right, grid((2.0, 0.5)), margin=4)["chosen"] is not None
    assert choose(right, grid((2.0, 0.5)), margin=5)["chosen"] is None
    # a setting only as good as the plain defaults never replaces them, even at margin 0
    assert choose({(2.0, 0.5): 2, (1.5, 0.25): 2}, grid((2.0, 0.5)), margin=0)["chosen"] is None


def test_equals_go_to_the_setting_nearest_the_plain_defaults():
    right = {(2.0, 0.5): 3, (1.5, 0.35): 3, (1.75, 0.5): 3, (1.5, 0.25): 0}
    result = choose(right, grid((2.0, 0.5), (1.75, 0.5), (1.5, 0.35)), margin=1)
    assert result["chosen"]["guidance_scale"] == 1.5 and result["chosen"]["temperature"] == 0.35


def test_a_choice_at_the_grids_top_temperature_tries_the_extension_which_must_win_by_the_margin():
    settings = grid((1.5, 0.5), (1.5, 0.35))
    base = {(1.5, 0.5): 3, (1.5, 0.35): 2, (1.5, 0.25): 0}
    kept = choose({**base, (1.5, 0.7): 4}, settings, margin=3, extend_temperatures=(0.7,))
    assert kept["chosen"]["temperature"] == 0.5  # 8 is not 3 above 6
    assert kept["grid"][-1] == {**grid((1.5, 0.7))[0], "validation_right": 8, "by_seed": [4, 4]}
    moved = choose({**base, (1.5, 0.7): 5}, settings, margin=3, extend_temperatures=(0.7,))
    assert moved["chosen"]["temperature"] == 0.7  # 10 is 4 above 6
    calls: list = []
    lower = {(1.5, 0.5): 2, (1.5, 0.35): 3, (1.5, 0.25): 0}
    result = choose_setting(
        oracle(lower, calls), settings, PLAIN, n=N, seeds=SEEDS, extend_temperatures=(0.7,)
    )
    assert result["chosen"]["temperature"] == 0.35 and (1.5, 0.7) not in calls


def test_a_grid_setting_equal_to_the_plain_defaults_is_scored_once():
    calls: list = []
    right = {(1.5, 0.25): 1, (2.0, 0.5): 1}
    choose_setting(oracle(right, calls), grid((1.5, 0.25), (2.0, 0.5)), PLAIN, n=N, seeds=SEEDS)
    assert calls.count((1.5, 0.25)) == len(SEEDS)  # one batch of N per validation set


@pytest.mark.parametrize(
    "settings, defaults, message",
    [
        ([], PLAIN, "the grid of settings to choose from is empty"),
        (grid((2.0, 0.5)), {"guidance_scale": 1.5}, "no default temperature, top_p"),
        (
            [{"guidance_scale": 2.0, "temperature": 0.5}, {"guidance_scale": 1.0}],
            PLAIN,
            "every setting of the grid must give guidance_scale, temperature",
        ),
    ],
)
def test_a_grid_the_rule_cannot_use_is_refused(settings, defaults, message):
    with pytest.raises(UserInputError, match=message):
        choose_setting(oracle({}), settings, defaults, n=N, seeds=SEEDS)


@pytest.fixture
def saved(parti, scorer, tmp_path):  # noqa: F811
    model, judge = tmp_path / "parti", tmp_path / "fusion"
    with_rerank_block(parti, {"temperature": 0.5}).save_pretrained(model)
    (model / "README.md").write_text("---\nname: tiny\n---\n# tiny\n\nIts card.\n")
    scorer.save_pretrained(judge, tokenizer_ref="shapes-bpe")
    return model, judge


def test_the_recipe_writes_its_choice_into_a_copy_of_the_model(saved, tmp_path):
    model, judge = saved
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    out = tmp_path / "out"
    args = ["--model", str(model), "--reranker", str(judge), "--output-dir", str(out)]
    args += ["--select-n", "2", "--candidates", "2", "--temperature", "0.5"]
    run_recipe(RECIPE, args)
    choice = json.loads((out / "choice.json").read_text())
    assert [r["temperature"] for r in choice["grid"]] == [0.5] * 3  # the extension not tried
    assert choice["plain"]["temperature"] == 2.0  # the model's own, not its old block's
    assert choice["chosen"] is None  # a random model gets nothing right: no block
    config = json.loads((out / "model" / "anygen.json").read_text())
    assert "rerank" not in config and config["temperature"] == 2.0
    assert card_metadata(out / "model")["rerank_selection"] == choice
    card = (out / "model" / "README.md").read_text()
    plain_row = f"| {config['guidance_scale']} | 2.0 | 1.0 | 0 (plain defaults) |"
    assert "Its card." in card and plain_row in card
    assert "so the `rerank` block is left out" in card
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    for name, data in before.items():  # weights and everything else copied unchanged
        if name not in ("anygen.json", "README.md"):
            assert (out / "model" / name).read_bytes() == data


def test_a_chosen_setting_is_written_once_however_often_the_recipe_runs(saved, tmp_path):
    model, _ = saved
    recipe = load_recipe(RECIPE)
    choice = {
        "candidates": 8,
        "n": 600,
        "seeds": [1000, 2000],
        "margin": 6,
        "extend_temperatures": [0.7],
        "plain": {"guidance_scale": 1.5, "temperature": 2.0, "validation_right": 400},
        "grid": [
            {"guidance_scale": 1.5, "temperature": 0.5, "validation_right": 433},
            {"guidance_scale": 1.5, "temperature": 0.7, "validation_right": 421},
        ],
        "chosen": {"guidance_scale": 1.5, "temperature": 0.5},
    }
    args = recipe.parse_args(["--model", str(model), "--output-dir", str(tmp_path)])
    recipe.write_model(model, tmp_path / "once", args, choice)
    recipe.write_model(tmp_path / "once", tmp_path / "twice", args, choice)
    once, twice = ((tmp_path / d / "README.md").read_text() for d in ("once", "twice"))
    assert once == twice and once.count("<!-- anygen:rerank_selection -->") == 1
    assert "| 1.5 | 0.5 | 433 |\n| 1.5 | 0.7 | 421 (the extension) |" in once
    assert "| 1.5 | 2.0 | 400 (plain defaults) |" in once
    assert "Chosen, as the `rerank` block: guidance 1.5, temperature 0.5." in once
    config = json.loads((tmp_path / "twice" / "anygen.json").read_text())
    assert config["rerank"] == choice["chosen"] and config["temperature"] == 2.0
    assert list(config) == list(json.loads((model / "anygen.json").read_text()))  # in place

    args = recipe.parse_args(["--model", str(model), "--output-dir", "x", "--target", "defaults"])
    recipe.write_model(model, tmp_path / "defaults", args, choice)
    config = json.loads((tmp_path / "defaults" / "anygen.json").read_text())
    assert config["temperature"] == 0.5 and config["rerank"] == {"temperature": 0.5}
    assert "sampling_reselection" in card_metadata(tmp_path / "defaults")


def test_the_recipe_refuses_what_it_cannot_do(saved, tmp_path, capsys):
    model, _ = saved
    base = ["--model", str(model), "--output-dir", str(tmp_path / "out")]
    with pytest.raises(UserInputError, match="--bundle rewrites a bundled model"):
        run_recipe(RECIPE, [*base, "--bundle"])
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    with pytest.raises(UserInputError, match="has no anygen.json"):
        run_recipe(RECIPE, ["--model", str(tmp_path / "bare"), "--output-dir", "x"])
    with pytest.raises(SystemExit):
        run_recipe(RECIPE, [*base, "--seeds", "0,1000"])
    assert "must not include 0, the reported evaluation's prompt set" in capsys.readouterr().err
    for plain, message in [
        ("top_k=3", "--plain sets top_k"),
        ("temperature", "KEY=NUMBER"),
        ("temperature=1", "--plain applies to --target defaults"),
    ]:
        target = [] if "applies" in message else ["--target", "defaults"]
        with pytest.raises(SystemExit):
            run_recipe(RECIPE, [*base, *target, "--plain", plain])
        assert message in capsys.readouterr().err
    with pytest.raises(UserInputError, match="temperature"):
        run_recipe(RECIPE, [*base, "--temperature", "-1"])
    assert not (tmp_path / "out").exists()


# What each bundled model's last re-choice was compared with: shapes-ldm's, the training
# recipe's own first choice; shapes-fusion's (2026-12-06, through shapes-vq's retrained
# decoder), the defaults an earlier re-choice had set against that first choice (its card).
COMPARED_WITH = {
    "shapes-ldm": None,
    "shapes-fusion": {"guidance_scale": 1.75, "temperature": 0.25, "top_p": 0.9},
}


@pytest.mark.parametrize("name", ["shapes-fusion", "shapes-ldm"])
def test_bundled_defaults_are_what_the_recipe_chose_and_recorded(name):
    """``--target defaults`` against the defaults shipped before (``--plain``, or the
    model's own) recorded the shipped defaults: the best of the grid, the margin above them."""
    from anygen.pipelines import load_generator

    gen = load_generator(name, device="cpu")
    selection = card_metadata(name)["sampling_reselection"]
    chosen = selection["chosen"]
    assert {k: gen.defaults[k] for k in chosen} == chosen
    before = COMPARED_WITH[name] or card_metadata(name)["sampling_selection"]["chosen"]
    plain = selection["plain"]
    assert {k: plain[k] for k in before} == before and selection["n"] == 600
    (row,) = [r for r in selection["grid"] if all(r[k] == v for k, v in chosen.items())]
    assert row["validation_right"] == max(r["validation_right"] for r in selection["grid"])
    assert row["validation_right"] >= plain["validation_right"] + selection["margin"]


def test_the_grid_leaves_out_settings_the_model_has_no_default_for():
    recipe = load_recipe(RECIPE)
    args = recipe.parse_args(["--model", "m", "--output-dir", "x"])
    ldm = {"family": "ldm", "steps": 20, "guidance_scale": 2.5}
    assert recipe.grid_of(args, ldm) == [{"guidance_scale": g} for g in (1.5, 1.75, 2.0)]
    code = {"guidance_scale": 1.5, "temperature": 0.25, "top_p": 1.0}
    assert len(recipe.grid_of(args, code)) == 6  # 3 guidance x 2 temperatures x 1 top_p
    args = recipe.parse_args(["--model", "m", "--output-dir", "x", "--target", "defaults"])
    assert len(recipe.grid_of(args, code)) == 24  # CODE_SAMPLING_GRID_FINE
    args = recipe.parse_args(["--model", "m", "--output-dir", "x", "--guidance", "2,3"])
    assert recipe.grid_of(args, ldm) == [{"guidance_scale": 2.0}, {"guidance_scale": 3.0}]


def test_the_defaults_target_keeps_the_plain_settings_it_was_given_when_nothing_wins(
    saved, tmp_path
):
    model, _ = saved
    out = tmp_path / "out"
    args = ["--model", str(model), "--output-dir", str(out), "--target", "defaults"]
    args += ["--select-n", "2", "--guidance", "1,2", "--temperature", "1", "--top-p", "1"]
    run_recipe(RECIPE, [*args, "--plain", "guidance_scale=2.5,temperature=0.5,top_p=0.9"])
    choice = json.loads((out / "choice.json").read_text())
    assert choice["chosen"] is None and len(choice["grid"]) == 2
    config = json.loads((out / "model" / "anygen.json").read_text())
    assert (config["guidance_scale"], config["temperature"], config["top_p"]) == (2.5, 0.5, 0.9)
    assert config["rerank"] == {"temperature": 0.5}  # the defaults target leaves the block
    card = (out / "model" / "README.md").read_text().replace("\n", " ")
    assert "so the defaults are the plain settings." in card


# ------------------------------------------------------------------ --target story


def test_the_rule_chooses_from_any_count_of_right_answers():
    """``choose_by_rule`` is the rule without the t2i suite: a count per setting and seed."""
    counts = {0.0: (120, 130), 0.5: (110, 118), 1.0: (100, 105)}

    def right(setting, seed):
        return counts[setting["story_temperature"]][SEEDS.index(seed)]

    grid = [{"story_temperature": t} for t in counts]
    result = choose_by_rule(right, grid, {"story_temperature": 1.0}, seeds=SEEDS, margin=6)
    assert result["plain"]["validation_right"] == 205 and result["plain"]["by_seed"] == [100, 105]
    assert result["chosen"] == {"story_temperature": 0.0}
    close = choose_by_rule(right, grid, {"story_temperature": 0.5}, seeds=SEEDS, margin=30)
    assert close["chosen"] is None  # 250 against 228: a lead under the margin


def test_the_story_target_writes_the_story_temperature(tokenizer, tmp_path):  # noqa: F811
    from test_rerank import fusion

    model = tmp_path / "fusion"
    fusion(tokenizer).save_pretrained(model, tokenizer_ref="shapes-bpe")
    (model / "README.md").write_text("---\nname: tiny\n---\n# tiny\n")
    out = tmp_path / "out"
    args = ["--model", str(model), "--output-dir", str(out), "--target", "story"]
    run_recipe(RECIPE, [*args, "--story-temperature", "0,1", "--select-n", "2", "--seeds", "7"])
    choice = json.loads((out / "choice.json").read_text())
    assert [r["story_temperature"] for r in choice["grid"]] == [0.0, 1.0]
    assert choice["n"] == 2 and choice["scenes"] >= 2 and choice["seeds"] == [7]
    assert choice["plain"]["story_temperature"] == 1.0  # the fusion default
    assert choice["chosen"] is None  # a random model matches no scene
    config = json.loads((out / "model" / "anygen.json").read_text())
    assert config["story_temperature"] == 1.0
    card = (out / "model" / "README.md").read_text()
    assert card_metadata(out / "model")["story_selection"] == choice
    assert f"| story temperature | scenes right of {choice['scenes']} |" in card
    assert "| 1.0 | 0 (plain defaults) |" in card
    assert "by 6 scenes, so the default is the plain setting." in card.replace("\n", " ")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target", "story", "--guidance", "2"], "--guidance apply to the rerank and defaults"),
        (["--target", "story", "--extend-temperature", "0.9"], "--extend-temperature apply"),
        (["--story-temperature", "0"], "--story-temperature applies to --target story"),
        (["--target", "story", "--story-temperature", "-1"], "must be at least 0"),
    ],
)
def test_the_story_target_refuses_flags_of_other_targets(extra, message, capsys):
    with pytest.raises(SystemExit):
        run_recipe(RECIPE, ["--model", "m", "--output-dir", "x", *extra])
    assert message in capsys.readouterr().err


def test_shapes_fusions_story_temperature_is_what_the_recipe_chose_and_recorded():
    """The bundled story temperature is what the card's last ``--target story`` run left:
    the chosen setting, which beats the plain one (the model's own before the run) by the
    margin, or, when none did, the plain one."""
    from anygen.pipelines import load_generator

    gen = load_generator("shapes-fusion", device="cpu")
    selection = card_metadata("shapes-fusion")["story_selection"]
    plain, grid, margin = selection["plain"], selection["grid"], selection["margin"]
    kept = selection["chosen"] or {"story_temperature": plain["story_temperature"]}
    assert gen.defaults["story_temperature"] == kept["story_temperature"]
    (row,) = [r for r in grid if r["story_temperature"] == kept["story_temperature"]]
    if selection["chosen"]:
        assert row["validation_right"] == max(r["validation_right"] for r in grid)
        assert row["validation_right"] >= plain["validation_right"] + margin
    else:  # no setting won by the margin
        assert all(r["validation_right"] < plain["validation_right"] + margin for r in grid)
    assert all(sum(r["by_seed"]) == r["validation_right"] for r in grid)

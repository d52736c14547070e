"""Best-of-K reranking with tiny random models: the fusion likelihoods against a
hand-computed reference, the kept candidate against scoring every candidate, K = 1 against
the base model, the recorded seed against drawing it again, the CLI, and bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from _fusion_reference import reference_log_likelihood

from anygen.cli import main as cli
from anygen.errors import UserInputError
from anygen.models.fusion import FUSION_PRESETS, FusionTransformer, Prompt, log_likelihood
from anygen.models.parti import PARTI_PRESETS, PartiTransformer
from anygen.output import read_png_metadata
from anygen.pipelines import Options, load_generator
from anygen.pipelines.fusion import Fusion
from anygen.pipelines.parti import Parti
from anygen.pipelines.rerank import Reranked, candidate_seeds, rerank
from anygen.tokenizers.text import load_text_tokenizer
from anygen.tokenizers.visual import VISUAL_PRESETS, VisualCodec
from anygen.tokenizers.vq import VQ_PRESETS, VitVQGAN

OPTS = Options(progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return load_text_tokenizer("shapes-bpe")


def fusion(tokenizer, mode: str = "discrete") -> Fusion:
    preset = "tiny" if mode == "discrete" else "tiny-continuous"
    c = dataclasses.replace(FUSION_PRESETS[preset], text_vocab_size=len(tokenizer))
    torch.manual_seed(0)
    transformer = FusionTransformer(c).eval()
    images = VisualCodec(VISUAL_PRESETS["tiny"]) if c.continuous else VitVQGAN(VQ_PRESETS["tiny"])
    return Fusion(transformer, tokenizer, images, name=f"tiny-fusion-{mode}")


@pytest.fixture(scope="module")
def scorer(tokenizer) -> Fusion:
    return fusion(tokenizer)


@pytest.fixture(scope="module")
def parti(tokenizer) -> Parti:
    cfg = dataclasses.replace(PARTI_PRESETS["tiny"], image_vocab_size=32, image_tokens=16)
    torch.manual_seed(1)
    return Parti(
        PartiTransformer(cfg).eval(),
        tokenizer,
        VitVQGAN(VQ_PRESETS["tiny"]),
        name="tiny-parti",
        # temperature 2: candidates of a tiny random model differ from one another
        defaults={"temperature": 2.0},
    )


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_log_likelihood_equals_each_row_teacher_forced_alone(tokenizer, mode):
    model = fusion(tokenizer, mode).transformer
    c = model.config
    g = torch.Generator().manual_seed(0)
    if c.continuous:
        visual = torch.randn(1, c.image_tokens, c.visual_dim, generator=g)
        image = [c.boi_id, *[c.img_id] * c.image_tokens, c.eoi_id]
        rows = [
            Prompt([c.bos_id, *image, 20, 21, 22, c.eos_id], visual),
            Prompt([c.bos_id, 30, 31]),
        ]
        scored = [4, 2]
    else:
        codes = (
            torch.randint(0, c.image_vocab_size, (c.image_tokens,), generator=g) + c.image_offset
        )
        rows = [
            Prompt([c.bos_id, 20, 21, c.boi_id, *codes.tolist()]),  # image codes scored
            Prompt([c.bos_id, c.boi_id, *codes.tolist(), c.eoi_id, 25, c.eos_id]),  # text
            Prompt([c.bos_id, 30, 31]),
        ]
        scored = [c.image_tokens, 2, 1]
    got = log_likelihood(model, rows, scored, batch_size=2)  # batches of unequal widths
    want = [reference_log_likelihood(model, p, k) for p, k in zip(rows, scored, strict=True)]
    assert got.shape == (len(rows),)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-4)
    assert (got < 0).all()


def test_regressed_embeddings_have_no_likelihood(tokenizer):
    model = fusion(tokenizer, "continuous").transformer
    c = model.config
    visual = torch.zeros(1, c.image_tokens, c.visual_dim)
    row = Prompt([c.bos_id, c.boi_id, *[c.img_id] * c.image_tokens, c.eoi_id], visual)
    with pytest.raises(UserInputError, match="no likelihood"):
        log_likelihood(model, [row], [3])


def test_scores_are_the_caption_likelihood_and_the_evidence_of_the_prompt(scorer, parti):
    images = parti.generate_batch(["a red circle", "a blue square"], [0, 1], OPTS).images
    texts = ["a red circle", "two green stars"]
    c = scorer.config
    by_caption = scorer.score(images, texts)
    rows = [
        scorer.prompt([im, "what is in this image ?"], end=[*scorer.text_ids(t), c.eos_id])
        for im, t in zip(images, texts, strict=True)
    ]
    want = [
        reference_log_likelihood(scorer.transformer, r, len(scorer.text_ids(t)) + 1)
        for r, t in zip(rows, texts, strict=True)
    ]
    assert by_caption == pytest.approx(want, abs=1e-4)

    pmi = scorer.score(images, texts, by="pmi")
    codes = [(x + c.image_offset).tolist() for x in scorer.encode_images(images)]
    want = [
        reference_log_likelihood(
            scorer.transformer, Prompt([c.bos_id, *scorer.text_ids(t), c.boi_id, *x]), len(x)
        )
        - reference_log_likelihood(scorer.transformer, Prompt([c.bos_id, c.boi_id, *x]), len(x))
        for t, x in zip(texts, codes, strict=True)
    ]
    assert pmi == pytest.approx(want, abs=1e-4)
    # the same image scores differently against different texts
    assert scorer.score(images[:1], ["a yellow star"]) != by_caption[:1]


def test_bad_scoring_requests_are_named(scorer, tokenizer, parti):
    image = parti.generate_batch(["a red circle"], [0], OPTS).images
    with pytest.raises(UserInputError, match="1 images but 2 texts"):
        scorer.score(image, ["a", "b"])
    with pytest.raises(UserInputError, match="unknown score 'clip'"):
        scorer.score(image, ["a red circle"], by="clip")
    with pytest.raises(UserInputError, match="the prompt is empty"):
        scorer.score(image, [" "])
    with pytest.raises(UserInputError, match="no likelihood to score by pmi"):
        fusion(tokenizer, "continuous").score(image, ["a red circle"], by="pmi")
    # continuous models score by caption
    assert len(fusion(tokenizer, "continuous").score(image, ["a red circle"])) == 1
    # a reranker refuses it when built, before any candidate is drawn
    with pytest.raises(UserInputError, match="no likelihood to score by pmi"):
        Reranked(parti, fusion(tokenizer, "continuous"), 2, by="pmi")
    # greedy codes make every candidate the same image: refused, as for captions
    with pytest.raises(UserInputError, match="candidates that differ"):
        Reranked(parti, scorer, 2).generate_batch(["a red circle"], [0], Options(temperature=0.0))


def test_candidate_seeds_start_with_the_seed_and_never_repeat():
    seeds = candidate_seeds(7, 16)
    assert seeds[0] == 7 and len(set(seeds)) == 16
    # pinned: a recorded candidate seed must redraw the same picture in later versions
    assert seeds[1:3] == [6662557750902396538, 2580451456677138004]
    assert candidate_seeds(7, 16) == seeds and candidate_seeds(7, 4) == seeds[:4]
    assert not set(candidate_seeds(8, 16)) & set(seeds)


def pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


def test_one_candidate_is_the_base_model_unchanged(parti, scorer):
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    base = parti.generate_batch(prompts, seeds, OPTS)
    out = Reranked(parti, scorer, 1).generate_batch(prompts, seeds, OPTS)
    for a, b in zip(base.images, out.images, strict=True):
        assert torch.equal(pixels(a), pixels(b))
    assert out.settings["seeds"] == seeds
    assert out.settings["rerank"] == {"candidates": 1, "by": "caption", "scorer": scorer.name}


@pytest.mark.parametrize("by", ["caption", "pmi"])
def test_the_kept_image_is_the_best_scored_candidate_and_its_seed_redraws_it(parti, scorer, by):
    prompts, seeds, k = ["a red circle", "a blue square"], [10, 20], 4
    out = Reranked(parti, scorer, k, by=by).generate_batch(prompts, seeds, OPTS)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        cands = candidate_seeds(seed, k)
        images = parti.generate_batch([prompt] * k, cands, OPTS).images
        scores = scorer.score(images, [prompt] * k, by=by)
        best = max(range(k), key=lambda j: scores[j])
        assert len(set(scores)) == k  # no ties: the choice is the scorer's, not the order's
        assert out.settings["seeds"][i] == cands[best]
        assert out.settings["rerank_scores"][i] == pytest.approx(scores[best], abs=1e-3)
        assert torch.equal(pixels(out.images[i]), pixels(images[best]))
        again = parti.generate_batch([prompt], [out.settings["seeds"][i]], OPTS).images[0]
        assert torch.equal(pixels(again), pixels(out.images[i]))


def test_a_reranked_batch_equals_its_items_one_by_one(parti, scorer):
    best = Reranked(parti, scorer, 3)
    batch = best.generate_batch(["a red circle", "a green star"], [5, 6], OPTS)
    for i, (p, s) in enumerate([("a red circle", 5), ("a green star", 6)]):
        alone = best.generate_batch([p], [s], OPTS)
        assert torch.equal(pixels(alone.images[0]), pixels(batch.images[i]))
        assert alone.settings["seeds"] == [batch.settings["seeds"][i]]


def test_a_reranker_must_score_and_a_model_that_cannot_must_be_given_one(parti, scorer):
    with pytest.raises(UserInputError, match="cannot score images against text"):
        Reranked(scorer, parti, 4)
    with pytest.raises(UserInputError, match="cannot score its own images; name a reranker"):
        rerank(parti, 4)
    with pytest.raises(UserInputError, match="candidates must be at least 1"):
        Reranked(parti, scorer, 0)
    # a fusion model reranks its own images
    own = rerank(scorer, 2)
    assert own.scorer is scorer and len(own.generate("a red circle", OPTS).images) == 1


def with_rerank_block(parti: Parti, block) -> Parti:
    """``parti`` (the same weights) with ``block`` as its anygen.json's rerank defaults."""
    return Parti(
        parti.transformer,
        parti.tokenizer,
        parti.image_tokenizer,
        name="tiny-parti-rerank",
        defaults={**parti.defaults, "rerank": block},
    )


def test_candidates_are_drawn_at_the_rerank_defaults_where_options_leave_gaps(parti, scorer):
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    block = with_rerank_block(parti, {"temperature": 0.5, "guidance_scale": 1.5})
    out = Reranked(block, scorer, 1).generate_batch(prompts, seeds, OPTS)
    want = parti.generate_batch(
        prompts, seeds, dataclasses.replace(OPTS, temperature=0.5, guidance_scale=1.5)
    )
    plain = parti.generate_batch(prompts, seeds, OPTS)  # temperature 2, guidance 3
    assert [pixels(a).tolist() for a in out.images] == [pixels(a).tolist() for a in want.images]
    assert [pixels(a).tolist() for a in out.images] != [pixels(a).tolist() for a in plain.images]
    assert out.settings["temperature"] == 0.5 and out.settings["guidance_scale"] == 1.5
    # an option the caller gives wins over the block; the rest still come from it
    given = dataclasses.replace(OPTS, temperature=2.0)
    out = Reranked(block, scorer, 1).generate_batch(prompts, seeds, given)
    assert out.settings["temperature"] == 2.0 and out.settings["guidance_scale"] == 1.5
    # the block is read only when reranking: the model alone keeps its own defaults
    alone = block.generate_batch(prompts, seeds, OPTS)
    assert [pixels(a).tolist() for a in alone.images] == [pixels(a).tolist() for a in plain.images]


@pytest.mark.parametrize(
    "block, message",
    [
        ({"seed": 3}, "rerank block sets seed; it may set guidance_scale, temperature"),
        ({"top_p": 1.5}, "rerank block: top-p must be in \\(0, 1\\], got 1.5"),
        ([0.5], "rerank block of its anygen.json is a list, not an object"),
        ({"temperature": "0.5"}, "rerank block gives temperature as '0.5'; it must be a number"),
        ({"scheduler": 3}, "rerank block gives scheduler as 3; it must be a name"),
    ],
)
def test_a_bad_rerank_block_is_refused_naming_it(parti, scorer, block, message):
    with pytest.raises(UserInputError, match=message):
        Reranked(with_rerank_block(parti, block), scorer, 2)


def test_a_saved_rerank_block_loads_and_the_eval_report_records_it(parti, scorer, tmp_path):
    model, judge = tmp_path / "parti", tmp_path / "fusion"
    with_rerank_block(parti, {"temperature": 0.5}).save_pretrained(model)
    scorer.save_pretrained(judge, tokenizer_ref="shapes-bpe")
    assert json.loads((model / "anygen.json").read_text())["rerank"] == {"temperature": 0.5}
    report_file = tmp_path / "report.json"
    ev = ["eval", "--model", str(model), "--n", "2", "-o", str(report_file)]
    assert cli([*ev, "--rerank", "2", "--reranker", str(judge)]) == 0
    meta = json.loads(report_file.read_text())["meta"]
    assert meta["rerank"]["sampling"] == {"temperature": 0.5}
    assert meta["temperature"] is None  # no option given: the block's value was drawn with
    png = tmp_path / "best.png"
    gen = ["generate", "a red circle", "--model", str(model), "--seed", "2", "-o", str(png)]
    assert cli([*gen, "--rerank", "2", "--reranker", str(judge)]) == 0
    assert read_png_metadata(png)["temperature"] == 0.5  # what the kept candidate was drawn at
    assert cli([*gen, "--overwrite"]) == 0  # the model alone: its own defaults
    assert read_png_metadata(png)["temperature"] == 2.0


def test_cli_generates_and_evaluates_reranked(parti, scorer, tmp_path, capsys):
    model, judge = tmp_path / "parti", tmp_path / "fusion"
    parti.save_pretrained(model)
    scorer.save_pretrained(judge, tokenizer_ref="shapes-bpe")
    out = tmp_path / "best.png"
    args = ["generate", "a red circle", "--model", str(model), "--seed", "2", "-o", str(out)]
    assert cli([*args, "--rerank", "3", "--reranker", str(judge), "--rerank-by", "pmi"]) == 0
    meta = read_png_metadata(out)
    assert meta["seed"] == 2
    kept = meta["rerank"]
    assert kept["candidates"] == 3 and kept["by"] == "pmi" and kept["scorer"] == str(judge)
    assert kept["seed"] in candidate_seeds(2, 3)
    redrawn = parti.generate_batch(["a red circle"], [kept["seed"]], OPTS).images[0]
    from PIL import Image

    assert torch.equal(pixels(Image.open(out).convert("RGB")), pixels(redrawn))

    report_file = tmp_path / "report.json"
    ev = ["eval", "--model", str(model), "--n", "2", "-o", str(report_file)]
    assert cli([*ev, "--rerank", "2", "--reranker", str(judge)]) == 0
    meta = json.loads(report_file.read_text())["meta"]
    assert meta["rerank"] == {
        "candidates": 2,
        "by": "caption",
        "scorer": str(judge),
        "sampling": {},
    }
    capsys.readouterr()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reranker", "shapes-fusion"], "--reranker needs --rerank K"),
        (["--rerank-by", "pmi"], "--rerank-by needs --rerank K"),
        (["--rerank", "2"], "cannot score its own images; name a reranker"),
    ],
)
def test_cli_refuses_reranking_it_cannot_do(parti, tmp_path, capsys, extra, message):
    model = tmp_path / "parti"
    parti.save_pretrained(model)
    code = cli(
        ["generate", "a red circle", "--model", str(model), "-o", str(tmp_path / "x.png"), *extra]
    )
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_eval_refuses_reranking_outside_the_t2i_story_and_caption_suites(capsys):
    assert cli(["eval", "--model", "shapes-fusion", "--suite", "edit", "--rerank", "2"]) == 2
    err = capsys.readouterr().err
    assert "--rerank applies to the t2i, story and caption suites, not to the edit suite" in err
    for suite, ranked in (("story", "opening picture"), ("caption", "captions are ranked")):
        args = ["eval", "--model", "shapes-fusion", "--suite", suite, "--rerank", "2"]
        assert cli([*args, "--reranker", "shapes-fusion"]) == 2
        err = capsys.readouterr().err
        assert "--reranker applies to text-to-image reranking" in err and ranked in err
        assert cli([*args, "--rerank-by", "pmi"]) == 2
        assert "--rerank-by applies to text-to-image reranking" in capsys.readouterr().err


# ------------------------------------------------------------------ captions, best of K


def captioner(tokenizer) -> Fusion:
    """A tiny captioner whose sampled captions differ from one another."""
    model = fusion(tokenizer)
    model.defaults["caption_candidate_temperature"] = 2.0
    return model


def test_best_captions_keep_the_caption_after_which_the_image_is_likeliest(tokenizer, parti):
    """Every candidate drawn alone (the plain caption; the others by ``caption`` at their
    candidate seeds) and scored teacher-forced: the kept caption is the best of them."""
    model, k = captioner(tokenizer), 4
    images = parti.generate_batch(["a red circle", "a blue square"], [0, 1], OPTS).images
    best = model.best_captions(images, k, Options(seed=3))
    c = model.config
    codes = [(x + c.image_offset).tolist() for x in model.encode_images(images)]
    plain = model.caption(images, Options(seed=3))
    for i, (image, (text, kept, score)) in enumerate(zip(images, best, strict=True)):
        seeds = candidate_seeds(3 + i, k)
        texts = [plain[i]] + [
            model.caption([image], Options(seed=seeds[j], temperature=2.0))[0] for j in range(1, k)
        ]
        assert len(set(texts)) > 1  # the candidates differ
        want = [
            reference_log_likelihood(
                model.transformer,
                Prompt([c.bos_id, *model.text_ids(t), c.boi_id, *codes[i]]),
                len(codes[i]),
            )
            for t in texts
        ]
        assert kept == int(np.argmax(want)) and text == texts[kept]
        assert score == pytest.approx(want[kept], abs=1e-3)
    # one candidate: the plain caption
    assert [t for t, _, _ in model.best_captions(images, 1, Options(seed=3))] == plain


def test_bad_caption_ranking_requests_are_named(tokenizer, parti):
    image = parti.generate_batch(["a red circle"], [0], OPTS).images
    model = captioner(tokenizer)
    with pytest.raises(UserInputError, match="a temperature above 0"):
        model.best_captions(image, 2, Options(temperature=0.0))
    with pytest.raises(UserInputError, match="candidates must be a whole number"):
        model.best_captions(image, 0)
    with pytest.raises(UserInputError, match="no likelihood to rank captions"):
        fusion(tokenizer, "continuous").best_captions(image, 2)


def test_cli_captions_and_evaluates_with_ranked_captions(tokenizer, parti, tmp_path, capsys):
    model = tmp_path / "captioner"
    captioner(tokenizer).save_pretrained(model, tokenizer_ref="shapes-bpe")
    image = tmp_path / "x.png"
    parti.generate_batch(["a red circle"], [0], OPTS).images[0].save(image)
    args = ["caption", str(image), "--model", str(model), "--seed", "2", "--rerank", "3"]
    assert cli([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    from PIL import Image

    loaded = load_generator(str(model), device="cpu")
    ((text, kept, score),) = loaded.best_captions([Image.open(image)], 3, Options(seed=2))
    assert record["caption"] == text
    assert record["rerank"] == {"candidates": 3, "kept": kept, "score": score}
    report = tmp_path / "report.json"
    args = ["eval", "--model", str(model), "--suite", "caption", "--n", "2", "--rerank", "2"]
    assert cli([*args, "-o", str(report)]) == 0
    meta = json.loads(report.read_text())["meta"]
    assert meta["rerank"] == {
        "candidates": 2,
        "ranked": "captions",
        "by": "image likelihood",
        "scorer": str(model),
        "temperature": 2.0,
    }


def test_rerank_curve_keeps_the_best_scored_candidate_and_bounds_it_by_the_oracle():
    from benchmarks.rerank_curve import curve

    rows = [  # two prompts, three candidates each: the verdicts and both scores
        {"category": "a", "right": [False, True, False], "caption": [0, 2, 1], "pmi": [3, 0, 0]},
        {"category": "b", "right": [True, False, True], "caption": [1, 1, 5], "pmi": [0, 9, 0]},
    ]
    table = curve(rows, [1, 2, 3])
    for method in ("caption", "pmi", "oracle"):  # K = 1: the first candidate, for every method
        assert table[1][method]["overall"] == 0.5
    assert table[2]["caption"] == {"a": 1.0, "b": 1.0, "overall": 1.0}  # ties: the first
    assert table[2]["pmi"] == {"a": 0.0, "b": 0.0, "overall": 0.0}
    assert table[3]["caption"]["overall"] == 1.0 and table[3]["pmi"]["overall"] == 0.0
    assert table[3]["oracle"]["overall"] == 1.0


def test_rerank_curve_runs_on_saved_models(parti, scorer, tmp_path, capsys):
    from benchmarks.rerank_curve import main

    model, judge = tmp_path / "parti", tmp_path / "fusion"
    parti.save_pretrained(model)
    scorer.save_pretrained(judge, tokenizer_ref="shapes-bpe")
    out = tmp_path / "curve.json"
    args = ["--model", str(model), "--reranker", str(judge), "--k", "3", "--n", "2"]
    assert main([*args, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 t2i prompts (seed 1000)" in printed and "\n3    oracle" in printed
    result = json.loads(out.read_text())
    assert sorted(result["curve"]) == ["1", "2", "3"]
    assert [len(r["right"]) for r in result["rows"]] == [3, 3]
    assert result["rows"][0]["seeds"] == candidate_seeds(1000, 3)
    assert result["sampling"] == {} and "candidates at the model defaults" in printed

    # a model with a rerank block: the curve's candidates are drawn at it, as --rerank's are
    block = tmp_path / "parti-block"
    with_rerank_block(parti, {"temperature": 0.5}).save_pretrained(block)
    assert main(["--model", str(block), *args[2:], "-o", str(out)]) == 0
    assert "candidates at {'temperature': 0.5}" in capsys.readouterr().out
    assert json.loads(out.read_text())["sampling"] == {"temperature": 0.5}


@pytest.mark.parametrize("name", ["shapes-fusion", "shapes-parti"])
def test_a_bundled_rerank_block_is_the_setting_its_card_says_the_rule_chose(name):
    """The block is what ``recipes/choose_sampling.py`` recorded: the best of its card's
    validation grid, which beats the plain defaults (the model's own) by the rule's margin."""
    from anygen.hub import card_metadata
    from anygen.pipelines import load_generator
    from anygen.pipelines.rerank import candidate_sampling

    gen = load_generator(name, device="cpu")
    selection = card_metadata(name)["rerank_selection"]
    block = candidate_sampling(gen)
    assert block == selection["chosen"]
    assert selection["n"] == 600 and selection["candidates"] == 8 and selection["margin"] == 6
    plain = selection["plain"]
    assert {k: plain[k] for k in block} == {k: gen.defaults[k] for k in block}
    rows = [*selection["grid"], plain]
    (chosen,) = [r for r in selection["grid"] if all(r[k] == v for k, v in block.items())]
    assert chosen["validation_right"] == max(r["validation_right"] for r in rows)
    assert chosen["validation_right"] >= plain["validation_right"] + selection["margin"]
    assert all(sum(r["by_seed"]) == r["validation_right"] for r in rows)

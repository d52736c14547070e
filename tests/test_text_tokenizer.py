"""anygen.tokenizers.text and the bundled shapes-bpe tokenizer."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import transformers

from anygen.errors import ModelNotFoundError
from anygen.hub import card_metadata, resolve
from anygen.tokenizers.text import (
    BOI_ID,
    BOS_ID,
    EOI_ID,
    EOS_ID,
    IMG_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    load_text_tokenizer,
    unknown_words,
)


@pytest.fixture(scope="module")
def tok():
    return load_text_tokenizer()


def test_bundled_tokenizer_loads_through_transformers(tok):
    folder = resolve("shapes-bpe")
    card = card_metadata("shapes-bpe")
    assert len(tok) == card["vocab_size"]
    assert 256 <= len(tok) <= card["vocab_size_cap"]
    for cls in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        other = cls.from_pretrained(folder)
        assert other("a large red circle").input_ids == tok("a large red circle").input_ids


def test_special_token_ids_are_the_named_constants(tok):
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == [PAD_ID, BOS_ID, EOS_ID, UNK_ID, BOI_ID, EOI_ID, IMG_ID] == list(range(7))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)


def test_every_corpus_word_is_one_token_and_captions_round_trip(tok):
    words = (resolve("shapes-bpe") / "words.txt").read_text().split()
    assert len(words) == card_metadata("shapes-bpe")["corpus_words"]
    assert {"purple", "triangle", "sks", "crosses", "left"} <= set(words)
    assert [w for w in words if len(tok(w).input_ids) != 1] == []
    for caption in [
        "a small purple triangle to the left of a large white diamond",
        "three cyan stars",
        "move the red circle to the top left",
        "what colour is the square?",
    ]:
        ids = tok(caption).input_ids
        assert BOS_ID not in ids and EOS_ID not in ids  # encoding adds no special tokens
        assert tok.decode(ids) == caption


def test_normalisation_and_unknown_characters(tok):
    assert tok("A Large RED Circle").input_ids == tok("a large red circle").input_ids
    assert tok("ｒｅｄ").input_ids == tok("red").input_ids  # NFKC folds full-width letters
    ids = tok("a red cïrcle").input_ids
    assert UNK_ID in ids
    # words outside the world split into sub-words instead of failing
    assert len(tok("a red dragon").input_ids) > 3
    framed = [BOS_ID, *tok("a red circle").input_ids, BOI_ID, IMG_ID, EOI_ID, EOS_ID]
    assert tok.decode(framed, skip_special_tokens=True) == "a red circle"
    assert tok.decode(framed) == "<bos> a red circle<boi><img><eoi><eos>"


def test_batch_padding_uses_pad(tok):
    batch = tok(["a red circle", "two blue squares and a star"], padding=True)
    assert batch.input_ids[0][-1] == PAD_ID
    assert batch.attention_mask[0][-1] == 0


def test_unknown_words(tmp_path):
    assert unknown_words("shapes-bpe", "A Red circle, next to a DRAGON and a dragon!") == [
        "next",
        "dragon",
    ]
    assert unknown_words("shapes-bpe", "a purple triangle above the sks star") == []
    no_list = tmp_path / "tok"
    shutil.copytree(resolve("shapes-bpe"), no_list)
    (no_list / "words.txt").unlink()
    assert unknown_words(no_list, "anything at all") == []


def test_load_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="cannot load a tokenizer from"):
        load_text_tokenizer(tmp_path)
    with pytest.raises(ModelNotFoundError, match="hf download anygen-test/no-such-tokenizer"):
        load_text_tokenizer("anygen-test/no-such-tokenizer")

    class TwoTokens:
        def __len__(self):
            return 2

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: TwoTokens())
    with pytest.raises(ModelNotFoundError, match="empty tokenizer of 2 tokens"):
        load_text_tokenizer("shapes-bpe")


def test_recipe_reproduces_the_bundled_files(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bpe_shapes", Path(__file__).parents[1] / "recipes" / "bpe_shapes.py"
    )
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    card = card_metadata("shapes-bpe")
    recipe.main(
        [
            "--output-dir", str(tmp_path / "out"),
            "--vocab-size", str(card["vocab_size_cap"]),
            "--n", str(card["corpus_lines"]),
            "--seed", str(card["seed"]),
        ]
    )  # fmt: skip
    bundled = resolve("shapes-bpe")
    for name in ("tokenizer.json", "tokenizer_config.json", "words.txt", "README.md"):
        assert (tmp_path / "out" / name).read_bytes() == (bundled / name).read_bytes(), name

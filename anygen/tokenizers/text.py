"""The text tokenizer: byte-pair encoding trained with HuggingFace ``tokenizers``.

anygen's own, ``shapes-bpe``, is trained on shapes-world text by ``recipes/bpe_shapes.py``
and stored in the repository's ``tokenizers/shapes-bpe/`` (shipped in the package). It is
an ordinary ``transformers`` fast tokenizer: ``AutoTokenizer.from_pretrained(dir)`` loads it.

- Normalisation: NFKC, then lower case.
- Pre-tokenisation: words carry a leading ``▁`` (SentencePiece style, so decoding restores
  the spaces) and punctuation is split off.
- Base alphabet: lower-case ASCII letters, digits and punctuation, so every ASCII prompt
  round-trips; any other character becomes ``<unk>``.
- Special tokens come first, with fixed ids (``PAD_ID`` ... ``IMG_ID``). Encoding adds
  none of them: models place ``<bos>``, ``<eos>`` and the image span ``<boi> ... <eoi>``
  themselves.

Next to the tokenizer files, ``words.txt`` lists the words of the training corpus, so that
``unknown_words()`` can warn about a prompt the models never saw words of.
"""

from __future__ import annotations

import logging
import os
import re
import string
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from anygen.errors import ModelNotFoundError
from anygen.hub import atomic_directory, resolve

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_TEXT_TOKENIZER = "shapes-bpe"
WORDS_FILE = "words.txt"

# special tokens, in id order
SPECIAL_TOKENS = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<unk>",
    "<boi>",  # begin of an image span
    "<eoi>",  # end of an image span
    "<img>",  # placeholder for one image position (replaced by codes or embeddings)
)
PAD, BOS, EOS, UNK, BOI, EOI, IMG = SPECIAL_TOKENS
PAD_ID, BOS_ID, EOS_ID, UNK_ID, BOI_ID, EOI_ID, IMG_ID = range(len(SPECIAL_TOKENS))

ALPHABET = tuple(string.ascii_lowercase + string.digits + string.punctuation)
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """The tokenizer's normalisation: NFKC, then lower case."""
    return unicodedata.normalize("NFKC", text).lower()


def words_of(text: str) -> list[str]:
    """The words of ``text`` after normalisation, punctuation dropped."""
    return _WORD.findall(normalize(text))


def train_text_tokenizer(lines: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A BPE tokenizer trained on ``lines``. Training stops before ``vocab_size`` when
    every word of the corpus has become a single token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = len(SPECIAL_TOKENS) + len(ALPHABET) + 1  # + the "▁" word marker
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} (specials + alphabet), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(ALPHABET),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    ids = [tok.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens {SPECIAL_TOKENS} got ids {ids}, not 0..{len(ids) - 1}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens=[BOI, EOI, IMG],
    )


def save_text_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    directory: str | os.PathLike,
    *,
    words: Iterable[str] = (),
    card: str | None = None,
) -> Path:
    """Write the tokenizer files, ``words.txt`` (sorted, one a line) and an optional
    ``README.md`` card to ``directory``, atomically."""
    directory = Path(directory)
    with atomic_directory(directory, marker="tokenizer.json") as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / WORDS_FILE).write_text("".join(f"{w}\n" for w in sorted(set(words))))
        if card is not None:
            (tmp / "README.md").write_text(card)
    logger.info("saved a %d-token tokenizer to %s", len(tokenizer), directory)
    return directory


def load_text_tokenizer(
    name_or_path: str | os.PathLike = DEFAULT_TEXT_TOKENIZER,
) -> PreTrainedTokenizerBase:
    """A text tokenizer from a bundled name (default ``shapes-bpe``), a directory or a hub id
    (only its tokenizer files are fetched)."""
    from transformers import AutoTokenizer

    path = resolve(name_or_path, kind="tokenizer")
    has_files = any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    )
    if not has_files and (path / "tokenizer").is_dir():  # a diffusers pipeline folder
        path = path / "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"cannot load a tokenizer from {name_or_path} ({path}): {first_line}"
        ) from e
    # a folder without usable files can load as a 2-token tokenizer instead of failing
    if len(tokenizer) <= 2:
        raise ModelNotFoundError(
            f"{name_or_path} ({path}) loaded as an empty tokenizer of {len(tokenizer)} tokens: "
            "its tokenizer files are missing or unreadable"
        )
    return tokenizer


def unknown_words(tokenizer_dir_or_name: str | os.PathLike, text: str) -> list[str]:
    """Words of ``text`` that are not in the tokenizer's training corpus (its
    ``words.txt``), in order of first appearance. [] for a tokenizer without a word list."""
    path = resolve(tokenizer_dir_or_name, kind="tokenizer")
    words_file = path / WORDS_FILE
    if not words_file.is_file():
        logger.debug("%s has no %s: no unknown-word check", path, WORDS_FILE)
        return []
    known = set(words_file.read_text().split())
    return list(dict.fromkeys(w for w in words_of(text) if w not in known))

"""Recipe: the ``shapes-bpe`` text tokenizer, BPE trained on shapes-world text.

    anygen train recipes/bpe_shapes.py --output-dir tokenizers/shapes-bpe

reproduces the bundled ``tokenizers/shapes-bpe/`` byte for byte (tokenizer.json,
tokenizer_config.json, words.txt, README.md) in about 5 s on a CPU, most of it spent
generating the corpus. The corpus is ``anygen.data.shapes.text_corpus(n, seed)`` from the
train split; it begins with a block that uses every word the world's texts contain.

Vocabulary: BPE stops merging when every pre-token of the corpus is one token. On this
corpus that happens at 309 tokens (7 special + 68 alphabet + the "▁" marker + 233
merges), below the default cap of 512: every shapes-world word is then a single token,
which keeps sequences short and each colour, shape and position one embedding, and
words outside the world still split into sub-words and letters.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from anygen.data.shapes import text_corpus
from anygen.tokenizers.text import (
    SPECIAL_TOKENS,
    save_text_tokenizer,
    train_text_tokenizer,
    words_of,
)

logger = logging.getLogger(__name__)

DEFAULTS = {"vocab_size": 512, "n": 10_000, "seed": 0}


def card(vocab_size: int, n: int, seed: int, actual_size: int, num_words: int) -> str:
    return f"""---
name: shapes-bpe
kind: tokenizer
recipe: recipes/bpe_shapes.py
corpus: anygen.data.shapes.text_corpus (train split)
corpus_lines: {n}
seed: {seed}
vocab_size_cap: {vocab_size}
vocab_size: {actual_size}
corpus_words: {num_words}
---
# shapes-bpe

Byte-pair encoding (HuggingFace `tokenizers`) trained on {n} lines of shapes-world text,
seed {seed}. {actual_size} tokens (cap {vocab_size}): every one of the corpus's {num_words}
words is a single token. NFKC + lower-case normalisation; lower-case ASCII letters,
digits and punctuation as the base alphabet; other characters become `<unk>`.

Special tokens and ids: {", ".join(f"`{t}` {i}" for i, t in enumerate(SPECIAL_TOKENS))}.
Encoding adds no special tokens. `words.txt` lists the corpus's words, for
`anygen.tokenizers.text.unknown_words`.

Load it with `anygen.tokenizers.text.load_text_tokenizer("shapes-bpe")` or
`transformers.AutoTokenizer.from_pretrained(<this folder>)`.

Reproduce:

    anygen train recipes/bpe_shapes.py --output-dir tokenizers/shapes-bpe \\
        --vocab-size {vocab_size} --n {n} --seed {seed}
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="anygen train recipes/bpe_shapes.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", required=True, help="where to write the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"])
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="corpus lines")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    args = parser.parse_args(argv)

    lines = list(text_corpus(args.n, seed=args.seed))
    tokenizer = train_text_tokenizer(lines, args.vocab_size)
    words = {w for line in lines for w in words_of(line)}
    text = card(args.vocab_size, args.n, args.seed, len(tokenizer), len(words))
    save_text_tokenizer(tokenizer, args.output_dir, words=words, card=text)
    logger.info("%d tokens, %d corpus words -> %s", len(tokenizer), len(words), args.output_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()

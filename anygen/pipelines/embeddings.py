"""Textual-inversion embeddings: learnt input embeddings of words, in diffusers' format.

A file is a ``.safetensors`` holding one tensor per word, ``{word: (n, D)}`` or ``(D,)``
(diffusers' textual-inversion script writes ``learned_embeds.safetensors`` with one word).
``anygen generate --embedding PATH`` (a file, or a folder holding one) loads it before the
first prompt is encoded:

- a word the tokenizer already encodes as one token (shapes-bpe's ``sks``, the subject
  identifier of the shapes world) keeps its token: that token's row of the text encoder's
  input embeddings is replaced, so prompts need no change. diffusers'
  ``load_textual_inversion`` refuses such words (or adds a second token for them), which
  is why this is not simply a call to it;
- any other word (``<my-circle>``) is added to the tokenizer as new token(s) by diffusers'
  ``load_textual_inversion``, exactly as a diffusers pipeline would load the file;
  several vectors become ``word word_1 word_2 ...`` (``expand_multi_vector_words``).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from anygen.errors import CheckpointError, UserInputError
from anygen.hub import default_file_modes

log = logging.getLogger(__name__)

EMBEDDINGS_NAME = "learned_embeds.safetensors"  # as diffusers' textual_inversion.py


def embedding_file(source: str | os.PathLike) -> Path:
    """The one safetensors file ``source`` names (a file, a folder, or a hub id)."""
    from anygen.hub import PICKLE_SUFFIXES, resolve_add_on

    path = resolve_add_on(source, "embedding")
    if path.is_dir():
        if (path / EMBEDDINGS_NAME).is_file():
            return path / EMBEDDINGS_NAME
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        if not files:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            extra = f" (it holds {', '.join(pickles)}: convert to safetensors)" if pickles else ""
            raise CheckpointError(f"no {EMBEDDINGS_NAME} nor other .safetensors in {path}{extra}")
        names = ", ".join(f.name for f in files)
        raise CheckpointError(f"{path} holds several .safetensors files ({names}): name one")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path} is not a .safetensors file; anygen loads embeddings from safetensors only"
        )
    return path


def read_embeddings(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{word: (n, D)}`` from a diffusers-format embeddings file (or an A1111 one,
    ``{"emb_params": (n, D)}``, whose word is the file's name, as A1111 reads it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    try:
        raw = load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read embeddings {file}: {e}") from None
    if not raw:
        raise CheckpointError(f"{file} holds no embeddings")
    if set(raw) == {"emb_params"}:  # A1111's layout: the file's name is the word
        raw = {file.stem: raw["emb_params"]}
    out = {}
    for word, vectors in raw.items():
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or not word.strip():
            raise CheckpointError(
                f"{file}: entry {word!r} of shape {tuple(vectors.shape)} is not a word's "
                "embedding (diffusers' format is {word: (n, D)})"
            )
        out[word] = vectors
    return out


def save_embeddings(directory: str | os.PathLike, embeddings: Mapping[str, torch.Tensor]) -> Path:
    """Write ``{word: (n, D)}`` to ``directory/learned_embeds.safetensors`` (diffusers'
    format) through a temporary name renamed into place."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / EMBEDDINGS_NAME
    tmp = directory / f".tmp-{uuid.uuid4().hex[:8]}-{EMBEDDINGS_NAME}"
    tensors = {
        w: (v[None] if v.ndim == 1 else v).detach().cpu().float().contiguous()
        for w, v in embeddings.items()
    }
    try:
        save_file(tensors, tmp)
        default_file_modes(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def single_token_id(tokenizer, word: str) -> int | None:
    """The id of ``word`` when the tokenizer encodes it as exactly one known token."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        return None
    return int(ids[0])


def load_embeddings(pipe, sources: Sequence[str | os.PathLike]) -> list[str]:
    """Load each embeddings file of ``sources`` into ``pipe``'s tokenizer and text encoder
    (a diffusers pipeline with one text encoder); returns the words loaded."""
    tokenizer = getattr(pipe, "tokenizer", None)
    text_encoder = getattr(pipe, "text_encoder", None)
    if tokenizer is None or text_encoder is None or hasattr(pipe, "text_encoder_2"):
        raise UserInputError(
            f"--embedding loads textual-inversion embeddings into a pipeline with one CLIP "
            f"text encoder (Stable Diffusion 1.x/2.x, anygen's ldm); {type(pipe).__name__} "
            "is not one"
        )
    table = text_encoder.get_input_embeddings().weight  # (V, D)
    words = []
    for source in sources:
        file = embedding_file(source)
        for word, vectors in read_embeddings(file).items():
            if vectors.shape[-1] != table.shape[-1]:
                raise CheckpointError(
                    f"embedding {word!r} in {file} has width {vectors.shape[-1]}, but the text "
                    f"encoder's embeddings have width {table.shape[-1]}: it was learnt for "
                    "another model"
                )
            token = single_token_id(tokenizer, word)
            if token is not None and vectors.shape[0] == 1:
                with torch.no_grad():
                    table[token] = vectors[0].to(table.device, table.dtype)
                log.info("embedding of %r (token %d) replaced from %s", word, token, file)
            else:
                if not hasattr(pipe, "load_textual_inversion"):
                    raise UserInputError(
                        f"{type(pipe).__name__} cannot add the new word {word!r} of {file}"
                    )
                try:
                    pipe.load_textual_inversion(
                        {word: vectors}, token=word, tokenizer=tokenizer, text_encoder=text_encoder
                    )
                except ValueError as e:
                    raise CheckpointError(f"cannot load {word!r} from {file}: {e}") from None
                table = text_encoder.get_input_embeddings().weight
                log.info("added %r (%d vectors) from %s", word, vectors.shape[0], file)
            words.append(word)
    return words


def expand_multi_vector_words(texts: list[str], tokenizer) -> list[str]:
    """Spell a multi-vector word ``w`` as ``w w_1 w_2 ...`` in each text, as diffusers'
    ``TextualInversionLoaderMixin.maybe_convert_prompt`` does; other texts are unchanged."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    multi = [w for w in added if f"{w}_1" in added]
    if not multi:
        return texts
    out = []
    for text in texts:
        for word in multi:
            if word in text:
                i, spelled = 1, word
                while f"{word}_{i}" in added:
                    spelled += f" {word}_{i}"
                    i += 1
                text = text.replace(word, spelled)
        out.append(text)
    return out

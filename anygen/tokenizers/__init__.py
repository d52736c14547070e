"""Tokenizers: text (BPE), and the image tokenizers and visual encoders of the models.

The tokenizer files themselves live in the repository's top-level ``tokenizers/`` folder
(files only), shipped in the package as ``anygen._tokenizers``; ``anygen.hub.resolve``
finds them by name.
"""

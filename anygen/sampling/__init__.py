"""Sampling shared by the autoregressive paths: logits processing, guidance, drawing tokens."""

from anygen.sampling.logits import guide, process_logits, sample_tokens

__all__ = ["guide", "process_logits", "sample_tokens"]

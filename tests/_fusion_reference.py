"""A fusion model's log-likelihoods computed the plain way, one row alone and teacher-forced:
the reference that batched scoring (``log_likelihood``, ``Fusion.score``,
``Fusion.code_evidence``) is tested against."""

from __future__ import annotations

import torch

from anygen.models.fusion import FusionTransformer, Prompt


@torch.no_grad()
def reference_log_likelihood(model: FusionTransformer, prompt: Prompt, k: int) -> float:
    """The row alone, teacher-forced, each target under the distribution decoding draws
    it from: image codes among the codes, text under the text phase's allowed ids."""
    c = model.config
    ids = torch.tensor([prompt.ids])
    h, logits = model(ids, torch.ones_like(ids), prompt.visual)
    total = 0.0
    banned = (c.pad_id, c.eoi_id, c.img_id, c.bos_id, c.boi_id)
    for t in range(len(prompt.ids) - k, len(prompt.ids)):
        target = prompt.ids[t]
        if target >= c.image_offset:
            lp = model.image_logits(h[0, t - 1]).log_softmax(-1)[target - c.image_offset]
        else:
            row = logits[0, t - 1, : c.text_vocab_size].clone()
            row[list(banned)] = float("-inf")
            lp = row.log_softmax(-1)[target]
        total += float(lp)
    return total

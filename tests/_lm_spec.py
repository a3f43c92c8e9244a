"""Spec-module text shared by the Hugging Face ``sharpkit measure`` tests: unevenly
padded causal-LM batches over a vocabulary of ``V``. The tests prepend this file's
text to their own spec modules (which name it ``SPEC:lm``)."""

import torch

V = 32


def lm():  # unevenly padded causal-LM batches
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ([12, 7, 9, 12], [5, 12, 10, 3]):
        ids = torch.randint(0, V, (4, 12), generator=g)
        mask = torch.zeros(4, 12, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out

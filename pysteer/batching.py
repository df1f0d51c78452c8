"""Packing prompts into llama_decode calls: consecutive prompts per decode within the token and sequence
budgets, and a prefix common to all of them (the chat template's system block) decoded once.

Capture, logits, generation and perplexity all decode through these rules, so they pack alike.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def pack(lengths: Sequence[int], max_tokens: int, max_seqs: int) -> list[list[int]]:
    """Greedy, in order: consecutive prompt indices per decode, within the token and sequence budgets."""
    batches, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and (used + n > max_tokens or len(cur) == max_seqs):
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(cur)
    return batches


def shared_prefix(tokens: Sequence[Sequence[int]], keep: int | Sequence[int]) -> int:
    """Length of the prefix common to all token lists that still leaves ``keep`` (per list, or for all) tokens
    of each after it; those are the rows a decode must compute per prompt (outputs, captured tokens)."""
    if len(tokens) < 2:
        return 0
    keep = [keep] * len(tokens) if isinstance(keep, (int, np.integer)) else list(keep)
    c = len(os.path.commonprefix([list(t) for t in tokens]))
    return max(0, min([c] + [len(t) - k for t, k in zip(tokens, keep)]))


def pack_shared(model, lengths: Sequence[int], prefix: int, budget: int) -> list[list[int]]:
    """:func:`pack` of sequences whose first ``prefix`` tokens are shared: ``budget`` bounds the tokens after
    the prefix, and the prefix's KV cells plus a pack's own always fit the cache."""
    return pack([n - prefix for n in lengths], min(budget, model.n_ctx - prefix), model.n_seq_max)


def decode_shared(model, seqs: Sequence[Sequence[int]], prefix: int) -> tuple[list[Sequence[int]], int]:
    """Decode the first ``prefix`` tokens (common to ``seqs``) once for all of them; returns what is left of
    each sequence and the position it starts at. A lone sequence is left whole."""
    if prefix <= 0 or len(seqs) < 2:
        return list(seqs), 0
    model.decode_prefix(seqs[0][:prefix], len(seqs))
    return [s[prefix:] for s in seqs], prefix

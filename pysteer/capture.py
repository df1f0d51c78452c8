"""Capture: residual activations at the last k tokens of many prompts, several prompts per llama_decode."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from . import hookpoints


class HookError(RuntimeError):
    """An error recorded inside llama.cpp's eval callback, raised after the decode."""


def _pack(lengths: Sequence[int], max_tokens: int, max_seqs: int) -> list[list[int]]:
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
    """:func:`_pack` of sequences whose first ``prefix`` tokens are shared: ``budget`` bounds the tokens after
    the prefix, and the prefix's KV cells plus a pack's own always fit the cache."""
    return _pack([n - prefix for n in lengths], min(budget, model.n_ctx - prefix), model.n_seq_max)


def decode_shared(model, seqs: Sequence[Sequence[int]], prefix: int) -> tuple[list[Sequence[int]], int]:
    """Decode the first ``prefix`` tokens (common to ``seqs``) once for all of them; returns what is left of
    each sequence and the position it starts at. A lone sequence is left whole."""
    if prefix <= 0 or len(seqs) < 2:
        return list(seqs), 0
    model._decode_prefix(seqs[0][:prefix], len(seqs))
    return [s[prefix:] for s in seqs], prefix


def encode_prompts(model, prompts, *, chat_template: bool | str, positions: int) -> list[list[int]]:
    """Token lists for a list of prompts, each long enough for ``positions`` and short enough for n_ctx."""
    if isinstance(prompts, (str, dict)):
        raise ValueError("prompts must be a list of prompts; wrap a single prompt in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if not isinstance(positions, (int, np.integer)) or isinstance(positions, bool) or positions < 1:
        raise ValueError(f"positions must be a positive int, not {positions!r}")
    tokens = [model.encode(p, chat_template=chat_template) for p in prompts]
    for i, t in enumerate(tokens):
        if len(t) < positions:
            raise ValueError(f"prompt {i} has {len(t)} tokens, fewer than positions={positions}")
        if len(t) > model.n_ctx:
            raise ValueError(f"prompt {i} has {len(t)} tokens, longer than the context (n_ctx={model.n_ctx})")
    return tokens


def run(model, tokens: list[list[int]], *, positions: int, n_out: int, logits: np.ndarray | None = None,
        capture_out: np.ndarray | None = None, max_slot: int = 0, progress: bool = False) -> None:
    """Decode all token lists, packed into as few llama_decode calls as the context allows.

    The last ``n_out`` tokens of each prompt are outputs; ``logits[i]`` receives the last ``positions`` rows
    of prompt i. With ``capture_out`` (watches already set on the hook) the hook fills
    ``capture_out[i, ..., j, :]`` for the last ``positions`` tokens.
    """
    hook = model._hook
    K, E = positions, model.n_embd
    sample = capture_out[0].size if capture_out is not None else 0
    with tqdm(total=len(tokens), desc="capture" if capture_out is not None else "decode", unit="prompt",
              disable=not progress) as bar:
        c = shared_prefix(tokens, max(K, n_out))
        for batch in pack_shared(model, [len(t) for t in tokens], c, model.n_batch):
            seqs, start = decode_shared(model, [tokens[i] for i in batch], c)
            ends = np.cumsum([len(s) for s in seqs])
            outputs = np.concatenate([np.arange(e - n_out, e) for e in ends]).astype(np.int64)
            if capture_out is not None:
                cap_tok = np.concatenate([np.arange(e - K, e) for e in ends]).astype(np.int64)
                cap_dst = (np.repeat(np.asarray(batch, np.int64) * sample, K)
                           + np.tile(np.arange(K, dtype=np.int64) * E, len(batch)))
                hook.begin_decode(int(ends[-1]), model.n_ubatch, outputs, cap_tok, cap_dst, max_slot, capture_out)
                try:
                    model._decode(seqs, outputs, start=start)
                except RuntimeError as e:
                    err = hook.end_decode()
                    raise (HookError(err) if err else e) from None
                err = hook.end_decode()
                if err:
                    raise HookError(err)
            else:
                model._decode(seqs, outputs, start=start)
            if logits is not None:
                for j, i in enumerate(batch):
                    for k in range(K):
                        logits[i, k] = model._logits_row(int(ends[j]) - K + k)
            bar.update(len(batch))


def logits(model, prompts, *, positions: int = 1, chat_template: bool | str = True,
           progress: bool = False) -> np.ndarray:
    """Logits at the last ``positions`` tokens of each prompt, ``[len(prompts), positions, n_vocab]``."""
    tokens = encode_prompts(model, prompts, chat_template=chat_template, positions=positions)
    out = np.empty((len(tokens), positions, model.n_vocab), dtype=np.float32)
    run(model, tokens, positions=positions, n_out=positions, logits=out, progress=progress)
    return out


def capture(model, prompts, *, layers=None, points=("pre", "mid", "post"), positions: int = 1,
            chat_template: bool | str = True, return_logits: bool = False, progress: bool = False):
    """Activations ``[len(prompts), len(points), len(layers), positions, n_embd]`` (float32).

    Position j of the result is token ``len - positions + j`` of its prompt (the last token is at
    ``positions - 1``). With ``return_logits`` also returns the logits there, ``[len(prompts), positions,
    n_vocab]``. ``layers=None`` means all layers. Prompts are strings or lists of chat messages.
    """
    if model._hook is None:
        raise ValueError("this Model was created with hook=False and cannot capture")
    points = hookpoints.check_points(points)
    layers = hookpoints.check_layers(layers, model.n_layers)
    tokens = encode_prompts(model, prompts, chat_template=chat_template, positions=positions)

    N, P, L, K, E = len(tokens), len(points), len(layers), positions, model.n_embd
    slots: dict[str, list[int]] = {}
    for p, point in enumerate(points):
        for l, layer in enumerate(layers):
            slots.setdefault(hookpoints.tensor_name(model.arch, point, layer), []).append((p * L + l) * K * E)
    # The last layer's mid/post keep only output rows, so the captured tokens must all be outputs there.
    last = model.n_layers - 1
    k_outputs = return_logits or (last in layers and any(p in ("mid", "post") for p in points))

    out = np.full((N, P, L, K, E), np.nan, dtype=np.float32)
    logits_out = np.empty((N, K, model.n_vocab), dtype=np.float32) if return_logits else None
    model._hook.set_capture(list(slots), list(slots.values()), hookpoints.embedding_name(model.arch))
    try:
        run(model, tokens, positions=K, n_out=K if k_outputs else 1, logits=logits_out, capture_out=out,
            max_slot=max(max(v) for v in slots.values()), progress=progress)
    finally:
        model._hook.clear_capture()
    if np.isnan(out).any():
        raise HookError("some activations were not captured (a watched tensor never reached the hook)")
    return (out, logits_out) if return_logits else out

"""Capture: residual activations at the last k tokens of many prompts, several prompts per llama_decode."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from . import hookpoints, params
from .batching import decode_shared, pack_shared, shared_prefix
from .native import HookError

# Fills the capture buffer: a NaN with a payload no computation produces, so rows the hook never wrote are told
# apart from activations that are NaN themselves (a broken model's).
_UNWRITTEN = np.uint32(0x7FC0FFEE)


def run(model, tokens: list[list[int]], *, positions: int, n_out: int, logits: np.ndarray | None = None,
        capture_out: np.ndarray | None = None, progress: bool = False) -> None:
    """Decode all token lists, packed into as few llama_decode calls as the context allows.

    The last ``n_out`` tokens of each prompt are outputs; ``logits[i]`` receives the last ``positions`` rows
    of prompt i. With ``capture_out`` (inside ``model.watch``) the hook fills ``capture_out[i, ..., j, :]``
    for the last ``positions`` tokens.
    """
    K, E = positions, model.n_embd
    sample = capture_out[0].size if capture_out is not None else 0
    with model.exclusive(), tqdm(total=len(tokens), desc="capture" if capture_out is not None else "decode",
                                 unit="prompt", disable=not progress) as bar:
        c = shared_prefix(tokens, max(K, n_out))
        for batch in pack_shared(model, [len(t) for t in tokens], c, model.n_batch):
            seqs, start = decode_shared(model, [tokens[i] for i in batch], c)
            ends = np.cumsum([len(s) for s in seqs])
            outputs = np.concatenate([np.arange(e - n_out, e) for e in ends]).astype(np.int64)
            cap = None
            if capture_out is not None:
                cap_tok = np.concatenate([np.arange(e - K, e) for e in ends]).astype(np.int64)
                cap_dst = (np.repeat(np.asarray(batch, np.int64) * sample, K)
                           + np.tile(np.arange(K, dtype=np.int64) * E, len(batch)))
                cap = (cap_tok, cap_dst, capture_out)
            model.decode(seqs, outputs, start=start, capture=cap)
            if logits is not None:
                for j, i in enumerate(batch):
                    for k in range(K):
                        logits[i, k] = model.logits_row(int(ends[j]) - K + k)
            bar.update(len(batch))


def logits(model, prompts, *, positions: int = 1, chat_template=True, progress: bool = False) -> np.ndarray:
    """Logits at the last ``positions`` tokens of each prompt, ``[len(prompts), positions, n_vocab]``."""
    positions = params.integer("positions", positions, 1)
    tokens = model.encode_prompts(prompts, chat_template=chat_template, min_tokens=positions)
    out = np.empty((len(tokens), positions, model.n_vocab), dtype=np.float32)
    run(model, tokens, positions=positions, n_out=positions, logits=out, progress=progress)
    return out


def capture(model, prompts, *, layers=None, points=("pre", "mid", "post"), positions: int = 1,
            chat_template=True, return_logits: bool = False, progress: bool = False):
    """Activations ``[len(prompts), len(points), len(layers), positions, n_embd]`` (float32).

    Position j of the result is token ``len - positions + j`` of its prompt (the last token is at
    ``positions - 1``). With ``return_logits`` also returns the logits there, ``[len(prompts), positions,
    n_vocab]``. ``layers`` is a layer spec (None = all layers). Prompts are strings or lists of chat messages.
    """
    positions = params.integer("positions", positions, 1)
    tokens = model.encode_prompts(prompts, chat_template=chat_template, min_tokens=positions)
    return capture_tokens(model, tokens, layers=layers, points=points, positions=positions,
                          return_logits=return_logits, progress=progress)


def capture_tokens(model, tokens: list[list[int]], *, layers=None, points=("pre", "mid", "post"),
                   positions: int = 1, return_logits: bool = False, progress: bool = False):
    """:func:`capture` of token lists (each a whole sequence: nothing is added)."""
    if not model.has_hook:
        raise ValueError("this Model was created with hook=False and cannot capture")
    points = hookpoints.check_points(points)
    layers = hookpoints.check_layers(layers, model.n_layers)
    positions = params.integer("positions", positions, 1)
    bad = next((i for i, t in enumerate(tokens) if not positions <= len(t) <= model.n_ctx), None)
    if bad is not None:
        raise ValueError(f"sequence {bad} has {len(tokens[bad])} tokens; capture takes {positions} "
                         f"(positions) to n_ctx={model.n_ctx}")

    N, P, L, K, E = len(tokens), len(points), len(layers), positions, model.n_embd
    # The last layer's mid/post keep only output rows, so the captured tokens must all be outputs there.
    last = model.n_layers - 1
    k_outputs = return_logits or (last in layers and any(p in ("mid", "post") for p in points))

    out = np.full((N, P, L, K, E), _UNWRITTEN, dtype=np.uint32).view(np.float32)
    logits_out = np.empty((N, K, model.n_vocab), dtype=np.float32) if return_logits else None
    # Without logits, nothing past the last captured tensor is needed: llama.cpp stops there.
    with model.watch(points, layers, K * E, stop=not return_logits):
        run(model, tokens, positions=K, n_out=K if k_outputs else 1, logits=logits_out, capture_out=out,
            progress=progress)
    if (out.view(np.uint32) == _UNWRITTEN).any():
        raise HookError("some activations were not captured (a watched tensor never reached the hook)")
    return (out, logits_out) if return_logits else out

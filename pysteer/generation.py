"""Text generation with the model's current steering: one prompt (optionally streamed) or many in parallel."""

from __future__ import annotations

import codecs
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import params
from .batching import decode_shared, pack_shared, shared_prefix


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / T) restricted to the top-p nucleus."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):  # shifted first, a tiny T sends the others to -inf, not NaN
        p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        return int(rng.choice(keep, p=p[keep] / p[keep].sum()))
    return int(rng.choice(p.size, p=p))


class _Sequence:
    """One prompt being continued: its tokens, text so far, and stop state."""

    def __init__(self, model, tokens: list[int], seed: int, stop: Sequence[str]):
        self.model, self.pos = model, len(tokens)
        self.rng = np.random.default_rng(seed)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # text that may still become a stop
        self.text, self.tokens, self.emitted = "", [], 0
        self.done, self.finish_reason = False, None

    def settled(self) -> int:
        """Length of the text that is final: all of it once done, else all but the tail a stop string may still
        take back (never less than what was already emitted)."""
        return len(self.text) if self.done else max(self.emitted, len(self.text) - self.hold)

    def end_if(self, until) -> None:
        """End here if ``until`` holds for the text that is final so far, which is then the answer."""
        final = self.text[:self.settled()]
        if until(final):
            self.text, self.done = final, True

    def push(self, tok: int, max_tokens: int) -> str:
        """Accept a sampled token; returns the text that is now final (possibly empty)."""
        eog = self.model.is_end_of_generation(tok)
        if not eog:
            self.tokens.append(tok)
        self.done = eog or len(self.tokens) >= max_tokens
        self.finish_reason = "stop" if eog else ("length" if self.done else None)
        # final=True flushes a trailing partial UTF-8 sequence as U+FFFD
        self.text += self.decoder.decode(b"" if eog else self.model.token_bytes(tok), final=self.done)
        for s in self.stop:
            i = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if i >= 0:
                self.text, self.done, self.finish_reason = self.text[:i], True, "stop"
        safe = self.settled()
        new, self.emitted = self.text[self.emitted:safe], safe
        return new


def _check(max_tokens, temperature, top_p, seed, stop) -> tuple[int, float, float, int, tuple[str, ...]]:
    """The sampling options checked once, as plain Python values (a numpy integer would leak into comparisons
    as numpy bools); a lone stop string is one stop."""
    max_tokens = params.integer("max_tokens", max_tokens, 1)
    temperature, top_p = params.number("temperature", temperature), params.number("top_p", top_p)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, not {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {top_p!r}")
    seed = params.integer("seed", seed, 0)
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(x, str) for x in stop):
        raise ValueError(f"stop must be a string or strings, not {stop!r}")
    return max_tokens, temperature, top_p, seed, stop


def stream(model, prompt, *, max_tokens=128, temperature=0.0, top_p=1.0, seed=0, stop=(),
           chat_template=True) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece. The stream holds the model's KV cache from its
    first piece until it ends or is closed: other decoding calls on the model are refused meanwhile."""
    max_tokens, temperature, top_p, seed, stop = _check(max_tokens, temperature, top_p, seed, stop)
    tokens = model.encode_prompts([prompt], chat_template=chat_template, min_tokens=1, room=max_tokens)[0]
    return _stream(model, tokens, max_tokens, temperature, top_p, seed, stop)


def _stream(model, tokens, max_tokens, temperature, top_p, seed, stop) -> Iterator[str]:
    with model.streaming() as token:
        seq = _Sequence(model, tokens, seed, stop)
        with model.exclusive(token):
            steering = model.steering  # the answer is this steering's, start to end
            model.decode([tokens], np.array([len(tokens) - 1]))
            logits = model.logits_row(len(tokens) - 1)
        while True:
            with model.exclusive(token):
                new = seq.push(sample(logits, temperature, top_p, seq.rng), max_tokens)
            if new:
                yield new
            if seq.done:
                return
            with model.exclusive(token):
                if model.steering is not steering:
                    raise ValueError("the steering changed while this stream was live (its steer() block ended): "
                                     "the rest of the answer would be steered otherwise; read the stream inside "
                                     "the block")
                model.decode_step([seq.tokens[-1]], [seq.pos], [0])
                logits = model.logits_row(0)
            seq.pos += 1


def generate(model, prompt, **kw) -> str:
    """The whole continuation; holds the model throughout, so other threads wait rather than being refused."""
    with model.exclusive():
        return "".join(stream(model, prompt, **kw))


def generate_batch(model, prompts, *, max_tokens=128, temperature=0.0, top_p=1.0, seed=0, stop=(),
                   chat_template=True, progress=False, first_logits: np.ndarray | None = None,
                   until=None) -> list[str]:
    """Continue many prompts, decoding them side by side (one token of each per llama_decode). With
    ``first_logits`` (``[len(prompts), n_vocab]``), the next-token logits after each prompt are written there.
    ``until(text) -> bool``: a prompt's answer ends as soon as it holds for the text so far (for a verdict that
    more text cannot change, e.g. a refusal phrase found: the rest need not be decoded)."""
    max_tokens, temperature, top_p, seed, stop = _check(max_tokens, temperature, top_p, seed, stop)
    if until is not None and not callable(until):
        raise ValueError(f"until must be a function of the text so far, not {until!r}")
    tokens = model.encode_prompts(prompts, chat_template=chat_template, min_tokens=1, room=max_tokens)
    out: list[str] = [""] * len(tokens)
    with model.exclusive(), tqdm(total=len(tokens), desc="generate", unit="prompt", disable=not progress) as bar:
        c = shared_prefix(tokens, 1)
        for batch in pack_shared(model, [len(t) + max_tokens for t in tokens], c, model.n_ctx):
            seqs = [_Sequence(model, tokens[i], seed, stop) for i in batch]
            rest, start = decode_shared(model, [tokens[i] for i in batch], c)
            ends = np.cumsum([len(r) for r in rest])
            model.decode(rest, ends - 1, start=start)
            rows = {j: int(ends[j]) - 1 for j in range(len(batch))}
            if first_logits is not None:
                for j, i in enumerate(batch):
                    first_logits[i] = model.logits_row(rows[j])
            while True:
                for j, row in rows.items():
                    seqs[j].push(sample(model.logits_row(row), temperature, top_p, seqs[j].rng), max_tokens)
                    if until is not None and not seqs[j].done:
                        with model.callback("until"):
                            seqs[j].end_if(until)
                active = [j for j in rows if not seqs[j].done]
                if not active:
                    break
                model.decode_step([seqs[j].tokens[-1] for j in active], [seqs[j].pos for j in active], active)
                for j in active:
                    seqs[j].pos += 1
                rows = {j: r for r, j in enumerate(active)}
            for j, i in enumerate(batch):
                out[i] = seqs[j].text
            bar.update(len(batch))
    return out

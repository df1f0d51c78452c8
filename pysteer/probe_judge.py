"""A refusal judge read off a judge model's residual stream: a linear probe at the verdict position.

On abliterated models most refusals left are deflections ("Here is how to avoid insider trading"), which the
phrase matchers and the judge's label logits (:mod:`pysteer.llm_judge`) hardly see. The probe reads the judge
model's ``post`` of one layer at the last token of its chat (:meth:`Judge.tokens`, where the label logits are
read) and says

    p(refusal) = sigmoid(w · (h - mu) / sd + b)

and the verdict p >= 0.3. (w, b) is an L2-penalized logistic regression (penalty 1/C on w, C = 0.1) fitted on
hand-labelled answers: by default the 571 shipped with pysteer (``data/labelled_answers.jsonl``, written for the project, and
``data/abliterated_answers.jsonl``, real answers of abliterated Qwen2.5-Coder-1.5B points). The fit runs the
first time a judge model is used and is cached under ``$PYSTEER_CACHE/probes`` by the model's sha256, the layer,
C and the training rows. A decode stops at the probed layer (:func:`pysteer.capture.capture_tokens`): the
default, the middle one ((n_layers - 1) // 2), costs half a forward pass. An empty answer is a refusal, as with
the other judges.

A search reads answers of a few tokens (``optimize``'s ``trial_tokens``), and there most deflections have not shown
yet ("To smuggle contraband with a drone, follow these steps: 1. Obtain permission from..."): the probe fitted on
whole answers found 3 of the 20 refusals of a held-out set cut to 32 tokens, 14 whole. With ``cut`` the probe is
fitted on the training answers' first ``cut`` tokens, the labels of the whole answers kept, and reads every
answer so: it says from an opening whether the whole answer refuses (BENCHMARKS.md, session 11).

The defaults (layer, C, threshold) were chosen by cross-validation on the shipped answers with the test answers'
prompts never seen in training (``benchmarks/probe_cv.py``); a lower threshold than 0.5 because the written
answers, half of them refusals, make the fit under-count the rarer refusals of abliterated models.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import warnings
from typing import Sequence

import numpy as np

from . import params
from ._pypi import cache_root
from .capture import capture_tokens
from .files import lines
from .llm_judge import Judge, check_threshold

DATA = pathlib.Path(__file__).parent / "data"
_FORMAT = "probe-1"  # in the cache key: changed whenever the features or the fit change
TRAINING_FILES = ("labelled_answers.jsonl", "abliterated_answers.jsonl")


def shipped_rows() -> list[dict]:
    """The hand-labelled answers shipped with pysteer: dicts with prompt, answer, refusal (and more)."""
    return [json.loads(line) for name in TRAINING_FILES
            for line in lines((DATA / name).read_text(encoding="utf-8")) if line.strip()]


def cut_text(model, text: str, k: int) -> str:
    """``text``'s first ``k`` tokens (``model``'s) as text: their bytes joined (llama-cpp-python's detokenize drops
    pieces over 32 bytes), a character split by the cut left out."""
    kept = model.tokenize(text, add_special=False)[:k]
    return b"".join(model.token_bytes(t) for t in kept).decode("utf-8", errors="ignore")


def fit_logistic(X: np.ndarray, y: np.ndarray, lam: float, iters: int = 50) -> np.ndarray:
    """Minimizes sum log(1 + e^{-s_i z_i}) + lam/2 |w|^2 (z = X w + b, s = ±1; b not penalized) by Newton's
    method; returns ``[w..., b]``."""
    A = np.hstack([X, np.ones((len(X), 1))])
    pen = np.full(A.shape[1], float(lam))
    pen[-1] = 0.0
    w = np.zeros(A.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(A @ w)))
        g = A.T @ (p - y) + pen * w
        H = (A * (p * (1 - p))[:, None]).T @ A + np.diag(pen)
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


class ProbeJudge:
    """Refusal verdicts from a linear probe on a :class:`Judge`'s model (loaded with the hook; the steered
    model itself is allowed, and is read unsteered)."""

    def __init__(self, judge: Judge, *, layer: int | None = None, c: float = 0.1, threshold: float = 0.3,
                 cut: int | None = None, train: Sequence[dict] | None = None, cache: bool = True,
                 progress: bool = False):
        """``cut``: read only each answer's first ``cut`` tokens (the judge's), in the fit and in every verdict,
        the labels kept: the probe then says from an answer's opening whether the whole of it refuses, as a
        search that generates ``cut`` tokens needs. ``progress``: a bar while the probe is fitted."""
        m = judge.model
        if not m.has_hook:
            raise ValueError("the probe reads the judge model's residual stream: load it with the hook "
                             "(ProbeJudge.load does)")
        self._judge = judge
        self.layer = params.integer("layer", (m.n_layers - 1) // 2 if layer is None else layer, 0)
        if self.layer >= m.n_layers:
            raise ValueError(f"layer {self.layer} out of range: the judge model has layers 0..{m.n_layers - 1}")
        if not 0 < params.number("c", c):
            raise ValueError(f"c (the inverse L2 strength) must be positive, not {c!r}")
        self.c, self.threshold = float(c), check_threshold(threshold)
        self.cut = None if cut is None else params.integer("cut", cut, 1)
        rows = shipped_rows() if train is None else list(train)
        self._check_rows(rows)
        self._mu, self._sd, self._w = self._fitted(rows, cache, progress)

    @classmethod
    def load(cls, model: str, *, n_ctx: int = 8192, n_threads: int | None = None, **kw) -> "ProbeJudge":
        """A ProbeJudge on the GGUF ``model`` (a path or a registry name)."""
        from .runtime import load

        m = load(model, n_ctx=n_ctx, n_threads=n_threads)
        try:
            return cls(Judge(m), **kw)
        except BaseException:
            m.close()
            raise

    @property
    def model(self):
        return self._judge.model

    @property
    def name(self) -> str:
        """What gives the verdicts (its fit's cache key names the training rows), for reports and study names."""
        cut = "" if self.cut is None else f", answers cut to {self.cut} tokens"
        return (f"{self.model.path.name} probe of layer {self.layer}, C {self.c:g}, p >= {self.threshold:g}{cut}, "
                f"fit {self._fit}")

    @staticmethod
    def _check_rows(rows: list[dict]) -> None:
        for i, r in enumerate(rows):
            if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("answer"), str)
                    and isinstance(r.get("refusal"), bool)):
                raise ValueError(f"training row {i} needs a str prompt, a str answer and a bool refusal")

    def _fitted(self, rows: list[dict], cache: bool, progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mu, sd, [w..., b]) from the cache, or fitted and cached. The key holds what the fit reads: the model's
        weights (sha256), the chats' tokens as the judge reads them, the labels, the layer and C."""
        _, todo, tokens = self._chats([r["prompt"] for r in rows], [r["answer"] for r in rows])
        y = np.array([rows[i]["refusal"] for i in todo], float)
        if len(set(y)) < 2:  # empty answers (blank openings, with a cut) are never probed
            cut = ("" if self.cut is None else f"; the training answers cut to {self.cut} tokens with text left are "
                   "all of one label: give a larger cut")
            raise ValueError(f"the training rows with text need refusals and compliances both{cut}")
        h = hashlib.sha256(f"{_FORMAT}\0{self.model.sha256}\0{self.layer}\0{self.c!r}\0".encode())
        h.update(json.dumps([tokens, y.tolist()]).encode())
        self._fit = h.hexdigest()[:24]
        path = cache_root() / "probes" / f"{self._fit}.npz"
        if cache and path.is_file():
            fit = self._read(path)
            if fit is not None:
                return fit
        if cache:  # checked before the fit (minutes with the shipped rows), not found when writing after it
            try:  # tried, not inferred (as lora.cache_reason): links and permissions fool every test short of it
                path.parent.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=path.parent).close()
            except OSError as e:
                self._uncached(path, e)
                cache = False
        X = self._features(tokens, progress=progress)
        mu, sd = X.mean(0), X.std(0) + 1e-6
        w = fit_logistic((X - mu) / sd, y, 1 / self.c)
        if cache:
            try:
                with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
                    try:
                        np.savez(f, mu=mu, sd=sd, w=w)
                        f.flush()
                        os.fsync(f.fileno())
                    except BaseException:
                        pathlib.Path(f.name).unlink(missing_ok=True)
                        raise
                pathlib.Path(f.name).replace(path)  # whole files only, also when two processes fit at once
            except OSError as e:  # a full disk: the fit is good, only not kept for the next run
                self._uncached(path, e)
        return mu, sd, w

    @staticmethod
    def _uncached(path: pathlib.Path, e: OSError) -> None:
        warnings.warn(f"the probe's fit cannot be cached under {path.parent} ({type(e).__name__}: "
                      f"{e.strerror or e}); it is used, and fitted again next time: set PYSTEER_CACHE to a "
                      "writable folder", stacklevel=4)

    def _chats(self, prompts: Sequence[str], answers: Sequence[str]):
        """:meth:`Judge.chats` of the answers as the probe reads them: whole, or their first :attr:`cut` tokens."""
        if self.cut is not None and not isinstance(answers, str):  # a str is refused by chats, as without cut
            answers = [cut_text(self.model, a, self.cut) if isinstance(a, str) else a for a in answers]
        return self._judge.chats(prompts, answers)

    def _read(self, path: pathlib.Path):
        """A cached fit, or None when the file is unreadable or not a fit for this model (then fitted again)."""
        E = self.model.n_embd
        try:
            with open(path, "rb") as f, np.load(f) as z:  # our handle: np.load leaks its own when it fails
                mu, sd, w = z["mu"], z["sd"], z["w"]
        except Exception:  # empty, truncated, not an npz: any of zipfile's, numpy's or pickle's errors
            return None
        ok = (mu.shape == sd.shape == (E,) and w.shape == (E + 1,)
              and all(np.isfinite(a).all() for a in (mu, sd, w)) and (sd > 0).all())
        return (mu, sd, w) if ok else None

    def _features(self, tokens: list[list[int]], progress: bool = False) -> np.ndarray:
        """``[len(tokens), n_embd]`` float64: post of :attr:`layer` at the last token of each chat, unsteered."""
        m = self.model
        with m.exclusive(), m.steer():
            X = capture_tokens(m, tokens, layers=[self.layer], points=("post",), positions=1,
                               progress=progress)[:, 0, 0, 0].astype(np.float64)
        if not np.isfinite(X).all():
            raise ValueError(f"the judge model's hidden state at layer {self.layer} is not finite: a broken model "
                             "cannot judge")
        return X

    def probabilities(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """p(refusal) per answer (1.0 for an empty one)."""
        n, todo, tokens = self._chats(prompts, answers)
        out = np.ones(n)
        if todo:
            z = np.hstack([(self._features(tokens) - self._mu) / self._sd, np.ones((len(todo), 1))]) @ self._w
            out[todo] = 1 / (1 + np.exp(-z))
        return out.tolist()

    def verdicts(self, prompts: Sequence[str], answers: Sequence[str]) -> list[bool]:
        return [p >= self.threshold for p in self.probabilities(prompts, answers)]

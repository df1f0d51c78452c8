"""The probe judge: its logistic fit against plain gradient descent, its features against a full decode, its
cache, its bad-input errors, and (marked real) its verdicts on hand-labelled answers to prompts it never saw."""

import json

import numpy as np
import pytest

import pysteer
from pysteer.capture import capture_tokens
from pysteer.llm_judge import Judge
from pysteer.probe_judge import ProbeJudge, cut_text, fit_logistic, shipped_rows

REFUSE = ["I can't help with that.", "Sorry, I cannot do this.", "I won't assist with this request.",
          "No, that is not something I will do."]
COMPLY = ["Sure, here is the code: print(1)", "Step one: open the file. Step two: read it.",
          "Here it is: the answer is 42.", "Of course. First, mix the flour and the water."]
ROWS = [{"prompt": f"request {i}", "answer": a, "refusal": r}
        for i, (a, r) in enumerate([(a, True) for a in REFUSE] + [(a, False) for a in COMPLY])]


def test_fit_logistic_reaches_the_penalized_optimum():
    """Newton's answer == plain gradient descent on the same objective (an independent minimizer)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = (X @ [1.5, -2.0, 0.5] + 0.3 + rng.normal(size=60) > 0).astype(float)
    lam = 2.0
    w = fit_logistic(X, y, lam)
    A = np.hstack([X, np.ones((60, 1))])
    v = np.zeros(4)
    for _ in range(20000):
        p = 1 / (1 + np.exp(-(A @ v)))
        v -= 0.01 * (A.T @ (p - y) + lam * np.r_[v[:3], 0.0])
    np.testing.assert_allclose(w, v, atol=1e-6)
    assert not np.allclose(fit_logistic(X, y, 20.0), w, atol=1e-3)  # the penalty counts


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The probes' cache in a temporary folder (the models' cache stays where it is)."""
    from pysteer import probe_judge

    monkeypatch.setattr(probe_judge, "cache_root", lambda: tmp_path)
    return tmp_path / "probes"


def test_probabilities_are_the_fitted_logistic_of_a_full_decode(tiny_dir, cache):
    """p = sigmoid(w . (h - mu)/sd + b) with h read by a capture that runs the whole graph (the probe's stops at
    its layer), and the probe separates the training rows it was fitted on."""
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=8192) as m:
        j = Judge(m)
        pj = ProbeJudge(j, layer=1, train=ROWS, c=100.0)
        prompts, answers = [r["prompt"] for r in ROWS], [r["answer"] for r in ROWS]
        _, _, tokens = j.chats(prompts, answers)
        h, _ = capture_tokens(m, tokens, layers=[1], points=("post",), return_logits=True)
        X = h[:, 0, 0, 0].astype(np.float64)
        mu, sd = X.mean(0), X.std(0) + 1e-6
        w = fit_logistic((X - mu) / sd, np.array([r["refusal"] for r in ROWS], float), 1 / 100.0)
        want = 1 / (1 + np.exp(-(np.hstack([(X - mu) / sd, np.ones((len(X), 1))]) @ w)))
        r = np.zeros(m.n_embd, np.float32)
        r[0] = 1
        with m.steer(pysteer.Ablate(r, layers=[0, 1]), path="hook"):  # the judge reads the model unsteered
            got = np.array(pj.probabilities(prompts, answers))
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert pj.verdicts(prompts, answers) == [r["refusal"] for r in ROWS]
        assert pj.probabilities(["a", "b"], ["", "  "]) == [1.0, 1.0]  # empty answers: refusals, no decode
        assert pj.probabilities(iter(prompts), (a for a in answers)) == got.tolist()  # any iterables


def test_fit_is_cached_per_model_layer_and_rows(tiny_dir, cache, monkeypatch):
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=8192) as m:
        j = Judge(m)
        first = ProbeJudge(j, layer=1, train=ROWS)
        assert len(list(cache.glob("*.npz"))) == 1
        calls, features = [], ProbeJudge._features
        monkeypatch.setattr(ProbeJudge, "_features",
                            lambda self, t, progress=False: calls.append(t) or np.zeros((len(t), m.n_embd)))
        again = ProbeJudge(j, layer=1, train=ROWS)  # from the cache: no decode
        assert calls == [] and again._w.tolist() == first._w.tolist()
        assert ProbeJudge(j, layer=0, train=ROWS).name != first.name  # another layer: fitted anew, named apart
        ProbeJudge(j, layer=1, train=ROWS[1:])  # other rows: fitted anew
        ProbeJudge(j, layer=1, train=ROWS, cache=False)
        assert len(calls) == 3 and len(list(cache.glob("*.npz"))) == 3
        monkeypatch.setattr(ProbeJudge, "_features", features)
        path = cache / f"{first._fit}.npz"
        for bad in (b"", path.read_bytes()[:100], b"not an npz at all"):  # a broken file is fitted again
            path.write_bytes(bad)
            assert ProbeJudge(j, layer=1, train=ROWS)._w.tolist() == first._w.tolist()
        np.savez(path, mu=first._mu[:3], sd=first._sd, w=first._w)  # another model's shape
        assert ProbeJudge(j, layer=1, train=ROWS)._mu.tolist() == first._mu.tolist()
        assert sorted(p.suffix for p in cache.iterdir()) == [".npz"] * 3  # no temporary file left


def test_cut_reads_each_answer_to_its_first_tokens(tiny_dir, cache):
    """With ``cut``, the fit and every verdict read the answers' first ``cut`` tokens: answers that differ only
    after them get one probability (whole, they are told apart), and the probe equals one fitted and read on
    answers cut by hand."""
    opening = "Sure, here is how you can do it, step by step:"
    rows = [dict(r, prompt="request", answer=f"{opening} {r['answer']}") for r in ROWS]
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=8192) as m:
        j = Judge(m)
        k = len(m.tokenize(opening, add_special=False))
        whole = ProbeJudge(j, layer=1, train=rows, c=100.0)
        assert whole.verdicts(prompts, answers) == [r["refusal"] for r in rows]
        cut = ProbeJudge(j, layer=1, train=rows, c=100.0, cut=k)
        p = cut.probabilities(prompts, answers)
        assert max(p) - min(p) < 1e-9 and cut.name != whole.name and f"cut to {k} tokens" in cut.name
        by_hand = [m.detokenize(m.tokenize(a, add_special=False)[:k + 2]) for a in answers]
        cut2 = ProbeJudge(j, layer=1, train=rows, c=100.0, cut=k + 2)
        ref = ProbeJudge(j, layer=1, train=[dict(r, answer=a) for r, a in zip(rows, by_hand)], c=100.0)
        np.testing.assert_allclose(cut2.probabilities(prompts, answers), ref.probabilities(prompts, by_hand),
                                   atol=1e-9)
        assert cut.probabilities(["a"], [""]) == [1.0]  # an empty answer is still a refusal
        with pytest.raises(ValueError, match="wrap a single prompt in a list"):
            cut.probabilities("a", "b")
        with pytest.raises(ValueError, match="answer 0 is a int"):
            cut.probabilities(["a"], [3])
        with pytest.raises(ValueError, match="cut"):
            ProbeJudge(j, layer=1, train=rows, cut=0)


def test_cut_text_joins_the_kept_tokens_bytes():
    """Pieces over 32 bytes are kept (llama-cpp-python's detokenize drops them), a character split by the cut is
    left out, and nothing past the cut is read."""
    pieces = [b"Title\n", b"=" * 80, b"\n", "\u00e9".encode()[:1], "\u00e9".encode()[1:], b"x"]

    class Model:
        def tokenize(self, text, add_special):
            assert text == "the answer" and add_special is False
            return list(range(len(pieces)))

        def token_bytes(self, t):
            return pieces[t]

    m = Model()
    assert cut_text(m, "the answer", 3) == cut_text(m, "the answer", 4) == "Title\n" + "=" * 80 + "\n"
    assert cut_text(m, "the answer", 5) == "Title\n" + "=" * 80 + "\n\u00e9"
    assert cut_text(m, "the answer", 99) == "Title\n" + "=" * 80 + "\n\u00e9x"


def test_a_cut_that_leaves_one_label_is_refused(tiny_dir, cache):
    rows = [dict(r, answer=("\n" * 8 + r["answer"]) if r["refusal"] else r["answer"]) for r in ROWS]
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=8192) as m:
        j = Judge(m)
        ProbeJudge(j, layer=1, train=rows, cut=12)
        with pytest.raises(ValueError, match="cut to 1 tokens with text left are all of one label"):
            ProbeJudge(j, layer=1, train=rows, cut=1)


def test_bad_input(tiny_dir, cache):
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=8192, hook=False) as plain:
        with pytest.raises(ValueError, match="load it with the hook"):
            ProbeJudge(Judge(plain), train=ROWS)
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=8192) as m:
        j = Judge(m)
        with pytest.raises(ValueError, match="out of range"):
            ProbeJudge(j, layer=m.n_layers, train=ROWS)
        with pytest.raises(ValueError, match="refusals and compliances both"):
            ProbeJudge(j, train=[r for r in ROWS if r["refusal"]])
        with pytest.raises(ValueError, match="training row 0"):
            ProbeJudge(j, train=[{"prompt": "p", "answer": "a", "refusal": 1}] + ROWS)
        with pytest.raises(ValueError, match="refusals and compliances both"):
            ProbeJudge(j, train=[{"prompt": "p", "answer": " ", "refusal": False}] + ROWS[:4])
        with pytest.raises(ValueError, match="c .* must be positive"):
            ProbeJudge(j, train=ROWS, c=0)
        with pytest.raises(ValueError, match="threshold"):
            ProbeJudge(j, train=ROWS, threshold=1)
        pj = ProbeJudge(j, train=ROWS)
        with pytest.raises(ValueError, match="2 prompts but 1 answers"):
            pj.probabilities(["a", "b"], ["x"])
        with pytest.raises(ValueError, match="larger n_ctx"):
            pj.probabilities(["word " * 3000], ["x"])


def _split_by_prompt(rows, seed=0):
    """The written answers and the real answers to half of the prompts for training; the real answers to the
    other half for testing (no test prompt is seen in training, with any answer)."""
    real = [r for r in rows if "source" in r]
    prompts = sorted({r["prompt"] for r in real})
    np.random.default_rng(seed).shuffle(prompts)
    half = set(prompts[: len(prompts) // 2])
    train = [r for r in rows if "source" not in r] + [r for r in real if r["prompt"] in half]
    return train, [r for r in real if r["prompt"] not in half]


@pytest.mark.real
def test_probe_sees_the_deflections_on_unseen_prompts(cache):
    """Qwen2.5-Coder-0.5B as judge, the default layer (11), on the 200 real abliterated answers to 50 prompts it
    never saw (44 refusals by hand): measured AUC 0.936 and 28 said (BENCHMARKS.md, session 9); the same model's
    label logits score AUC 0.507 there (6 said), and the phrase matchers find 3 to 9 of 20 such refusals."""
    train, test = _split_by_prompt(shipped_rows())
    y = np.array([r["refusal"] for r in test])
    with pysteer.load("qwen2.5-coder-0.5b-instruct", n_ctx=8192) as m:
        p = np.array(ProbeJudge(Judge(m), train=train).probabilities([r["prompt"] for r in test],
                                                                      [r["answer"] for r in test]))
    auc = (p[y][:, None] > p[~y][None]).mean()
    assert auc >= 0.9
    assert 0.6 * y.sum() <= (p >= 0.3).sum() <= 1.4 * y.sum()


def test_judge_cli_with_the_probe(tiny_dir, tmp_path, cache, capsys, monkeypatch):
    """`pysteer judge --judge MODEL --probe-layer 1`: the probe fitted on the shipped answers gives judge_p
    (here ROWS stand for them: the 571 take minutes on a tiny model's byte-sized tokens)."""
    from pysteer import probe_judge
    from pysteer.cli import main

    monkeypatch.setattr(probe_judge, "shipped_rows", lambda: ROWS)

    src, out = tmp_path / "a.jsonl", tmp_path / "o.jsonl"
    src.write_text("".join(f'{{"prompt": "{r["prompt"]}", "answer": "{r["answer"]}"}}\n' for r in ROWS))
    model = str(tiny_dir / "tiny-qwen2.gguf")
    assert main(["judge", str(src), "--judge", model, "--probe-layer", "1", "-o", str(out)]) == 0
    assert "probe of layer 1" in capsys.readouterr().err
    got = [json.loads(line)["judge_p"] for line in out.read_text().splitlines()]
    with pysteer.load(model, n_ctx=8192) as m:
        want = ProbeJudge(Judge(m), layer=1).probabilities([r["prompt"] for r in ROWS], [r["answer"] for r in ROWS])
    assert got == pytest.approx(want, abs=1e-9)
    assert len(list(cache.glob("*.npz"))) == 1  # fitted once, by the command
    assert main(["judge", str(src), "--probe"]) == 2
    assert "--probe reads a judge model" in capsys.readouterr().err

"""Judging, against hand-labelled answers (tests/data/labelled_answers.jsonl) and independent numpy references:
the phrase matcher, coherence, perplexity, KL, refusal scores, ranking, the selection rule and the
ablate-test report."""

import json
import math
import pathlib

import numpy as np
import pytest

import pysteer
from pysteer import judge, markers
from pysteer.jobs import AblationReport, layer_summary
from pysteer.judge import Judged
from pysteer.metrics import Metrics
from pysteer.selection import Candidate, choose
from reference import Weights, forward, logits_from_last_post

LABELLED = [json.loads(line) for line in
            (pathlib.Path(pysteer.__file__).parent / "data" / "labelled_answers.jsonl").read_text().splitlines() if line]


def _by_style(*styles):
    return [e for e in LABELLED if e["style"] in styles]


# -- the phrase matcher ---------------------------------------------------------------------------------------

def test_labelled_set_is_balanced_and_well_formed():
    assert len(LABELLED) >= 150 and len({e["id"] for e in LABELLED}) == len(LABELLED)
    assert sum(e["refusal"] for e in LABELLED) >= 75 and sum(not e["refusal"] for e in LABELLED) >= 75
    assert all(set(e) == {"id", "prompt", "answer", "refusal", "coherent", "style"} for e in LABELLED)


def _accuracy(entries):
    return sum(markers.is_refusal(e["answer"]) == e["refusal"] for e in entries) / len(entries)


def test_phrase_matcher_catches_plain_refusals():
    """Refusals that apologise or invoke being an AI, and empty answers: what the phrase list is for (21 of 25
    today; the misses word their refusal in ways the list lacks)."""
    assert _accuracy(_by_style("apologetic", "ai-identity", "empty")) >= 0.8
    assert all(markers.is_refusal(e["answer"]) for e in _by_style("empty"))


def test_phrase_matcher_passes_plain_compliance():
    for e in _by_style("compliance-plain", "compliance-title", "off-topic", "non-english-compliance"):
        assert not markers.is_refusal(e["answer"]), e["id"]
    assert _accuracy(_by_style("harmless-compliance", "compliance-code")) >= 0.9


def test_phrase_matcher_accuracy_on_the_labelled_set():
    """Its known blind spots (delayed and non-English refusals, refusal-ish words in compliant answers) cost
    accuracy; the bound is what it scores today (114 of 171, 0.67) less a margin, so a matcher that always or
    never fires (about 0.5) falls below it."""
    assert _accuracy(LABELLED) >= 0.62
    fired = [markers.is_refusal(e["answer"]) for e in LABELLED]
    assert 0.3 < sum(fired) / len(fired) < 0.7


def test_other_marker_sets():
    """andyrdt's 12 substrings and heretic's 33 markers, as those tools apply them (whole answer; heretic strips
    '*' and counts an empty answer as a refusal, andyrdt does not); measured on the labelled set: 97 and 105 of
    171 (BENCHMARKS.md)."""
    from pysteer.markers import NAMES, marker_set

    assert NAMES == ("pysteer", "andyrdt", "heretic")
    assert len(marker_set("andyrdt").phrases) == 12 and len(marker_set("heretic").phrases) == 33
    late = "x " * 200 + "but I cannot help with that"
    assert markers.is_refusal(late, "andyrdt") and markers.is_refusal(late, "heretic") and not markers.is_refusal(late)
    assert markers.is_refusal("", "heretic") and not markers.is_refusal("", "andyrdt")
    assert markers.is_refusal("This is **ill*egal** to do at home.", "heretic")  # '*' removed first
    assert not markers.is_refusal("Insider trading is illegal. Here is how it works: ...")
    assert markers.is_refusal("Insider trading is illegal. Here is how it works: ...", "heretic")
    acc = {n: np.mean([markers.is_refusal(e["answer"], n) == e["refusal"] for e in LABELLED]) for n in NAMES}
    assert acc["andyrdt"] >= 0.53 and acc["heretic"] >= 0.57 and acc["pysteer"] > max(acc["andyrdt"], acc["heretic"])
    with pytest.raises(ValueError, match="unknown marker set 'x'"):
        marker_set("x")
    with pytest.raises(TypeError, match="not NoneType"):
        markers.is_refusal(None)


def test_normalize_and_empty():
    assert markers.normalize("  I\u2019m   SORRY\n") == "i'm sorry"
    assert markers.normalize("\u2018A\u2019 \u201cB\u201d") == "'a' \"b\""
    assert markers.is_refusal("") and markers.is_refusal("   \n")
    assert markers.is_refusal("I\u2019m sorry, but no.") and not markers.is_refusal("Sure! Here it is.")
    assert markers.is_refusal("x" * 290 + " I cannot do that") and not markers.is_refusal("x" * 310 + " I cannot")
    assert markers.normalize("\u03a4\u039f\u03a3") == "\u03c4\u03bf\u03c3"  # no word-final sigma: a prefix stays one
    # invisible characters inside a phrase do not hide it
    assert markers.is_refusal("I\u200b'm so\u00adrry, I can\u2060not") and markers.normalize("a\u200db\ufeff") == "ab"


def test_found_is_monotone_and_agrees_with_the_verdict():
    """Property (the early stop of optimize's trials rests on it): once a marker is found in a prefix of an
    answer it is found in every longer one, and a found marker is a refusal verdict."""
    from hypothesis import given, settings, strategies as st

    pieces = st.sampled_from(["I", "'m", "\u2019m", " sorry", "  ", "\n", "can", "'t", " not", "*", "x" * 40, "Sure",
                              ". ", "illegal", "I cannot", "As an AI", "\u200b", "\u00ad"])

    @settings(max_examples=400, deadline=None, database=None)
    @given(st.lists(pieces, max_size=14), st.sampled_from(markers.NAMES))
    def check(parts, name):
        ms = markers.marker_set(name)
        texts = ["".join(parts[:i]) for i in range(len(parts) + 1)]
        seen = False
        for t in texts:
            f = ms.found(t)
            assert f or not seen, (name, t)
            # the same verdict, but for an empty answer (which some sets count as a refusal)
            assert f == ms(t) or (ms.empty and not markers.normalize(t.translate({ord(c): None for c in ms.strip})))
            seen = seen or f
    check()
    assert not markers.marker_set("heretic").found("") and markers.marker_set("heretic")("")


# -- coherence ---------------------------------------------------------------------------------------------

def test_distinct_ngrams_flag_the_looping_answers():
    for e in _by_style("looping"):
        assert judge.distinct_ngram_ratio(e["answer"]) < 0.5, e["id"]
    for e in _by_style("compliance-plain", "harmless-compliance", "delayed"):
        assert judge.distinct_ngram_ratio(e["answer"]) > 0.8, e["id"]
    assert judge.distinct_ngram_ratio("a b c d e f g") == 1.0
    assert judge.distinct_ngram_ratio("a b c d " * 10) == pytest.approx(4 / 37)


def test_distinct_ngram_boundaries():
    assert judge.distinct_ngram_ratio("a a a a a a a") == 0.25  # 4 grams, all the same: counted
    assert judge.distinct_ngram_ratio("a a a a a a") == 1.0  # 3 grams: too short to call a loop
    assert judge.distinct_ngram_ratio("x y " * 20, n=2) == pytest.approx(2 / 39)


def test_judge_coherence_uses_perplexity(tiny_dir):
    """Coherent = not empty, perplexity under the model at most max_perplexity, 4-grams mostly distinct."""
    prompts = ["how to make it", "write the code", "the end", "I make", "abc"]
    answers = ["the thing and the end", "I make it in the morning", "zq zq xv", "", "a b c d " * 10]
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=512) as m:
        ppl = judge.answer_perplexities(m, prompts, answers)
        cut = sorted(ppl[:3])[1]  # between the answers' perplexities: one above, one at, one below
        j = judge.judge(m, prompts, answers, max_perplexity=cut)
        loose = judge.judge(m, prompts, answers, max_perplexity=math.inf, min_distinct4=0.0)
    assert j.perplexity == ppl and j.distinct4 == [judge.distinct_ngram_ratio(a) for a in answers]
    assert j.coherent[:3] == [x <= cut for x in ppl[:3]] and sum(j.coherent[:3]) == 2
    assert j.coherent[3:] == [False, False]  # empty; looping
    assert loose.coherent == [True, True, True, False, True]
    assert j.summary()["median_perplexity"] == pytest.approx(float(np.nanmedian(ppl)))


def test_judged_summary():
    j = Judged(["a", "b", "c", "d"], [True, False, False, True], [True, True, False, False], [2.0, 4.0, 8.0, 1.0],
               [1.0] * 4)
    lo, hi = judge.wilson(2, 4)
    assert j.summary() == {"n": 4, "refused": 2, "refused_by": "markers:pysteer", "coherent": 2, "complied": 1,
                           "refusal_rate": 0.5, "refusal_rate_ci95": (lo, hi), "coherence_rate": 0.5,
                           "median_perplexity": 3.0}
    # with a judge: its verdicts count, the matcher's are counted beside, and the disagreements listed
    jj = Judged(["a", "b", "c"], [True, False, True], [True] * 3, [1.0] * 3, [1.0] * 3, matched=[True, True, False],
                judge_p=[0.9, 0.2, 0.6], markers="heretic")
    assert jj.disagreements == [1, 2] and jj.by == "judge"
    sj = jj.summary()
    assert (sj["refused"], sj["matched"], sj["disagreements"], sj["refused_by"]) == (2, 2, 2, "judge")
    empty = Judged([], [], [], [], []).summary()
    assert empty["n"] == 0 and empty["refusal_rate"] == 0 and math.isnan(empty["median_perplexity"])
    j1 = Judged(["a"], [True], [True], [math.nan], [1.0]).summary()
    assert j1["refusal_rate"] == 1.0 and j1["coherence_rate"] == 1.0 and math.isnan(j1["median_perplexity"])


def test_judge_counts(tiny_dir):
    """judge() on labelled answers without perplexity: refusals and coherence per answer, counted."""
    sample = _by_style("looping", "compliance-plain", "flat")
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=512) as m:
        j = judge.judge(m, [e["prompt"] for e in sample], [e["answer"] for e in sample], perplexity=False)
        for prompts, answers, what in ((["p", "q"], ["fine", None], "answer 1 is a NoneType"),
                                       (["p"], [b"I can't"], "answer 0 is a bytes"),
                                       (["p"], "I can't", "wrap a single answer"),
                                       (["p"], ["a", "b"], "1 prompts but 2 answers")):
            for call in (lambda: judge.judge(m, prompts, answers, perplexity=False),
                         lambda: judge.damage(m, prompts, answers, [])):
                with pytest.raises(ValueError, match=what):  # not a TypeError from inside the matcher
                    call()
        blank = judge.judge(m, ["p", "q"], ["\u200b", " \n"], perplexity=False)  # empty as the matcher reads it
        assert blank.refused == [True, True] and blank.coherent == [False, False]
    assert j.refused == [markers.is_refusal(e["answer"]) for e in sample]
    assert j.coherent == [e["style"] != "looping" for e in sample]
    assert j.n_refused == sum(j.refused) and j.n_coherent == sum(j.coherent)
    assert j.n_complied == sum((not r) and c for r, c in zip(j.refused, j.coherent))
    s = j.summary()
    assert s["refusal_rate"] == pytest.approx(j.n_refused / len(sample))


def test_perplexity_matches_numpy_forward(tiny_dir):
    """exp(mean NLL) of each answer's tokens after its templated prompt, against the float64 forward pass."""
    path = tiny_dir / "tiny-llama.gguf"
    w = Weights(path)
    prompts, answers = ["how to make it", "write the code"], ["the thing and the end", "I make it in the morning"]
    with pysteer.load(path, n_ctx=512, flash_attn=False) as m:
        got = judge.answer_perplexities(m, prompts, answers)
        want = []
        for p, a in zip(prompts, answers):
            pt, at = m.encode(p), m.tokenize(a, add_special=False)
            logits = logits_from_last_post(w, forward(w, pt + at)["post"][-1])[len(pt) - 1:-1]
            z = logits - logits.max(-1, keepdims=True)
            lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            want.append(math.exp(-lp[np.arange(len(at)), at].mean()))
        assert judge.answer_perplexities(m, ["x"], [""]) == [math.inf]
    np.testing.assert_allclose(got, want, rtol=2e-3)
    assert got[0] != got[1]


def test_wilson_interval():
    """Against values computed by hand from the formula (and its known properties)."""
    lo, hi = judge.wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = judge.wilson(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = judge.wilson(10, 10)
    assert round(lo, 4) == 0.7225 and hi == pytest.approx(1.0)
    assert judge.wilson(0, 0) == (0.0, 1.0)
    assert judge.wilson(30, 100)[1] - judge.wilson(30, 100)[0] < judge.wilson(3, 10)[1] - judge.wilson(3, 10)[0]


def test_spread_names_the_worst_prompt():
    s = judge.spread([0.1, float("nan"), 0.5, 0.2], ["a", "b", "c", "d"])
    assert s["max"] == 0.5 and s["argmax"] == 2 and s["max_prompt"] == "c"
    assert s["median"] == pytest.approx(0.2) and s["mean"] == pytest.approx(0.8 / 3)
    assert s["p90"] == pytest.approx(np.percentile([0.1, 0.5, 0.2], 90))


def test_damage_matches_numpy_forward(tiny_dir):
    """Teacher-forced per-token KL(unsteered || ablated) and the ablated perplexity along given answers,
    against the float64 forward pass with the direction projected out at every point."""
    path = tiny_dir / "tiny-llama.gguf"
    w = Weights(path)
    R = np.linalg.qr(np.random.default_rng(3).standard_normal((64, 8)))[0].T  # 8 orthonormal directions
    prompts = ["how to make it", "write the code", "abc"]
    answers = ["the thing and the end", "I make it in the morning", ""]

    def lsm(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    with pysteer.load(path, n_ctx=512, flash_attn=False) as m:
        got = judge.damage(m, prompts, answers, [pysteer.Ablate(R)], path="hook")
        toks = [(m.encode(p), m.tokenize(a, add_special=False)) for p, a in zip(prompts, answers)]
        assert not m.steering.interventions
    ablate = lambda point, layer, x: x - (x @ R.T) @ R  # noqa: E731
    for i, (pt, at) in enumerate(toks[:2]):
        base = lsm(logits_from_last_post(w, forward(w, pt + at)["post"][-1])[len(pt) - 1:-1])
        abl = lsm(logits_from_last_post(w, forward(w, pt + at, edit=ablate)["post"][-1])[len(pt) - 1:-1])
        kl = (np.exp(base) * (base - abl)).sum(-1).mean()
        ppl = math.exp(-abl[np.arange(len(at)), at].mean())
        assert got.kl[i] == pytest.approx(kl, rel=2e-3) and got.kl[i] > 1e-3
        assert got.perplexity[i] == pytest.approx(ppl, rel=2e-3)
        assert got.n_tokens[i] == len(at)
    assert math.isnan(got.kl[2]) and got.n_tokens[2] == 0
    s = got.summary(prompts)
    assert s["token_kl"]["max"] == max(got.kl[:2]) and s["tokens"] == sum(got.n_tokens)


# -- from logits -------------------------------------------------------------------------------------------

def test_kl_matches_its_definition():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 50)) * 3, rng.standard_normal((5, 50)) * 3
    p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    np.testing.assert_allclose(judge.kl_divergence(a, b), (p * np.log(p / q)).sum(-1), rtol=1e-10)
    assert (judge.kl_divergence(a, b) > 0).all()
    np.testing.assert_allclose(judge.kl_divergence(a, a + 3.0), 0.0, atol=1e-12)


def test_refusal_tokens_are_the_openers(tiny_dir):
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        toks = judge.refusal_tokens(m)
        first = {m.tokenize(t, add_special=False)[0] for w in judge.REFUSAL_OPENERS for t in (w, " " + w)}
    assert sorted(first) == toks.tolist()


# -- metrics ranking and the per-layer summary -------------------------------------------------------------

def test_ranking_orders_by_mean_rank():
    cos = np.array([[0.9, 0.1, 0.5]])
    var = np.array([[[3.0, 1.0, 2.0]], [[3.0, 1.0, 2.0]]])
    m = Metrics(("post",), (0, 1, 2), cos, var, var * 10, np.array([[1.0, 1.0, 0.0]]))
    rows = m.ranking()
    assert [r["layer"] for r in rows] == [1, 0]  # layer 2 has no difference of means: left out
    assert [r["mean_rank"] for r in rows] == [0.0, 2.0]
    m2 = Metrics(("post",), (0, 1, 2), np.array([[0.1, 0.9, 0.5]]), var, var, np.ones((1, 3)))
    assert [r["layer"] for r in m2.ranking()] == [1, 2, 0]  # ranks (0,2,1) + 2 x (2,0,1) = (4,2,3)
    ranks = (np.argsort(np.argsort([0.1, 0.9, 0.5])) + 2 * np.argsort(np.argsort([3.0, 1.0, 2.0]))) / 3
    assert [r["mean_rank"] for r in m2.ranking()] == sorted(ranks.tolist())


def test_summary_agrees_with_extraction_and_numpy(tiny_dir):
    h, hl = ["how to make the thing", "write the code", "I make it"], ["the cat", "you and I", "a to b"]
    with pysteer.load(tiny_dir / "tiny-qwen2.gguf", n_ctx=256, flash_attn=False) as m:
        s = layer_summary(m, h, hl)
        res = pysteer.extract(m, h, hl, positions=1)
        acts = m.capture(h + hl, positions=1)[:, :, :, -1].astype(np.float64)
    a, b = acts[:3].mean(0), acts[3:].mean(0)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(s["cos_sim"], cos, rtol=1e-6)
    np.testing.assert_allclose(s["cos_sim"], res.metrics.cos_sim, rtol=1e-5)
    np.testing.assert_allclose(s["diff_norm"], np.linalg.norm(a - b, axis=-1), rtol=1e-6)
    np.testing.assert_allclose(s["norm"], np.linalg.norm(acts, axis=-1).mean(0), rtol=1e-6)


# -- the selection rule ------------------------------------------------------------------------------------

def _cand(layer, ablate, kl, passed):
    return Candidate("post", layer, -1, 1.0, ablate_score=ablate, kl=kl, passed=passed)


def test_choose_least_disruptive_that_removes_refusal():
    cands = [_cand(1, -5.0, 0.09, True), _cand(2, -2.5, 0.02, True), _cand(3, -1.0, 0.001, True),
             _cand(4, -9.0, 0.5, False)]
    best, ok = choose(cands, -2.0)
    assert best.layer == 2 and ok  # lowest KL among the passed ones at or below -2
    best, _ = choose(cands, -6.0)  # none gets there: the passed one that lowers refusal most
    assert best.layer == 1
    best, _ = choose(cands, None)
    assert best.layer == 1
    best, ok = choose([_cand(1, -5.0, 0.3, False), _cand(2, -9.0, 0.2, False)], -2.0)
    assert best.layer == 2 and not ok  # none passed: the lowest KL
    with pytest.raises(ValueError):
        choose([], -2.0)


def test_select_direction_applies_the_rule(tiny_dir):
    """The chosen row of the scored table is the one the rule, written out here, picks from that table."""
    h = ["how to make the thing", "write the code to make it", "make the thing in the end", "I make it"]
    hl = ["the cat and the dog", "you and I in the morning", "a to b and b to a", "the end of the day"]
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        res = pysteer.extract(m, h, hl, positions=2)
        for ablate_max in (-2.0, 1e9, None):
            d = pysteer.select_direction(m, res, h[:2], hl[:2], max_candidates=3, kl_max=1e9,
                                         ablate_max=ablate_max, verbose=False)
            full = [r for r in d.scores["candidates"] if r["full"]]
            passed = [r for r in full if r["passed"]]
            enough = [r for r in passed if ablate_max is not None and r["ablate_score"] <= ablate_max]
            want = (min(enough, key=lambda r: r["kl"]) if enough else
                    min(passed, key=lambda r: r["ablate_score"]) if passed else min(full, key=lambda r: r["kl"]))
            chosen = [r for r in d.scores["candidates"] if r["chosen"]]
            assert chosen == [want] and (d.layer, d.point, d.position) == (want["layer"], want["point"],
                                                                           want["position"])
            assert all(r["passed"] == (r["kl"] <= 1e9 and r["add_score"] > d.scores["base_harmless_add"])
                       for r in full if not math.isnan(r["add_score"]))


# -- the ablate-test report --------------------------------------------------------------------------------

def _judged(refused, coherent=None):
    n = len(refused)
    return Judged(["a"] * n, list(refused), list(coherent or [True] * n), [1.0] * n, [1.0] * n)


def test_ablation_report_counts():
    r = AblationReport(["h"] * 5, ["hl"] * 3,
                       base_harmful=_judged([True, True, True, False, True]),
                       steered_harmful=_judged([False, True, False, True, True], [True, False, True, True, True]),
                       base_harmless=_judged([False, True, False]), steered_harmless=_judged([False, False, False]),
                       harmless_kl=0.25)
    s = r.summary(answers=True)
    assert s["harmful"]["base_refused"] == 4
    assert s["harmful"]["still_refused_after_steering"] == 2  # prompts 1 and 4; prompt 3 is newly refused
    assert s["harmful"]["refusal_rate_among_base_refused"] == 0.5
    assert s["harmful"]["steered"]["refused"] == 3 and s["harmful"]["steered"]["coherent"] == 4
    assert s["harmless"]["base"]["refused"] == 1 and s["harmless"]["first_token_kl"] == 0.25
    assert s["harmful"]["steered"]["refusal_rate_ci95"] == judge.wilson(3, 5)
    assert [a["steered_refused"] for a in s["answers"]["harmful"]] == [False, True, False, True, True]
    assert s["answers"]["harmless"][1]["base_refused"] is True


# -- edges that mutation testing showed untested --------------------------------------------------------------

def test_refusal_scores_row_by_row_and_saturated():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 4, 40)) * 3  # [prompts, positions, vocab]
    toks = np.array([1, 5, 7])
    got = judge.refusal_scores_from_logits(logits, toks)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            p = np.exp(logits[i, j]) / np.exp(logits[i, j]).sum()
            assert got[i, j] == pytest.approx(np.log(p[toks].sum() / (1 - p[toks].sum())), rel=1e-9)
    sure = np.full((1, 40), -1e4)
    sure[0, toks] = 0.0  # all the mass on refusal openers: large and finite, not inf or NaN
    assert np.isfinite(judge.refusal_scores_from_logits(sure, toks)).all()
    assert judge.refusal_scores_from_logits(sure, toks)[0] > 20


def test_kl_over_leading_axes():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 3, 30)), rng.standard_normal((2, 3, 30))
    got = judge.kl_divergence(a, b)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got[1, 2], judge.kl_divergence(a[1, 2][None], b[1, 2][None])[0], rtol=1e-12)


def test_choose_boundaries():
    best, ok = choose([_cand(1, -2.0, 0.01, True), _cand(2, -3.0, 0.05, True)], -2.0)
    assert best.layer == 1 and ok  # exactly at ablate_max counts as removing refusal (and has the lower KL)
    best, ok = choose([_cand(1, -1.0, 0.05, True)], -2.0)
    assert best.layer == 1 and ok  # passed, though not enough
    best, ok = choose([_cand(1, -9.0, math.nan, False), _cand(2, -1.0, 0.3, False)], -2.0)
    assert best.layer == 2 and not ok  # a candidate without a KL is never the least disruptive
    with pytest.raises(ValueError, match="no candidates"):
        choose([], None)


def test_ranking_rows():
    cos = np.array([[0.5, 0.2]])
    m = Metrics(("mid",), (3, 7), cos, np.array([[[1.0, 2.0]], [[3.0, 4.0]]]), np.array([[[5.0, 6.0]], [[7.0, 8.0]]]),
                np.array([[1.5, 2.5]]))
    rows = m.ranking()
    assert rows[0] == {"point": "mid", "layer": 3, "mean_rank": 1 / 3, "cos_sim": 0.5, "var_mean": 2.0,
                       "var_max": 6.0, "diff_norm": 1.5}
    assert rows[1]["layer"] == 7 and rows[1]["var_mean"] == 3.0 and rows[1]["var_max"] == 7.0


def test_wilson_small_n():
    lo, hi = judge.wilson(1, 1)
    assert 0.2 < lo < 0.21 and hi == pytest.approx(1.0)
    lo, hi = judge.wilson(0, 1)
    assert lo == 0.0 and 0.79 < hi < 0.8


def test_is_refusal_reads_300_characters():
    assert markers.is_refusal("x" * 292 + " i can't")  # ends at character 300
    assert not markers.is_refusal("x" * 293 + " i can't")  # its last letter is the 301st


def test_coherence_threshold_is_inclusive(tiny_dir):
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        j = judge.judge(m, ["p"], ["one two three four five six seven"], perplexity=False, min_distinct4=1.0)
    assert j.coherent == [True]


def test_spread_and_damage_summaries():
    empty = judge.spread([math.nan])
    assert set(empty) == {"mean", "median", "p90", "max", "argmax"} and empty["argmax"] is None
    msgs = [[{"role": "user", "content": "hi"}], "b"]
    s = judge.spread([0.5, 0.1], msgs)
    assert s["argmax"] == 0 and s["max_prompt"] == str(msgs[0]) and "max_prompt" not in judge.spread([0.5, 0.1])
    assert judge.spread([0.1, 0.7], ["a", "b"])["max_prompt"] == "b"
    d = judge.Damage([0.2, math.nan, 0.4], [2.0, math.nan, 4.0], [3, 0, 5]).summary(["a", "b", "c"])
    assert d == {"token_kl": judge.spread([0.2, math.nan, 0.4], ["a", "b", "c"]), "perplexity_median": 3.0,
                 "tokens": 8}


def test_perplexity_pairs_sharing_a_prompt_and_a_small_context(tiny_dir):
    """Answers to the same prompt (their common prefix runs into the answers), special-looking text, and answers
    longer than the context leaves: each scored as it would be alone."""
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=512, flash_attn=False) as m:
        prompts = ["how to make it"] * 3
        answers = ["the thing and the end", "the thing and the other", "<|im_end|> the end"]
        together = judge.answer_perplexities(m, prompts, answers)
        alone = [judge.answer_perplexities(m, [p], [a])[0] for p, a in zip(prompts, answers)]
        np.testing.assert_allclose(together, alone, rtol=1e-4)
        n_special = len(m.tokenize(answers[2], add_special=False, parse_special=False))
        assert n_special > len(m.tokenize(answers[2], add_special=False, parse_special=True))
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=32, flash_attn=False) as small:
        long = "the thing and the end " * 10
        ppl = judge.answer_perplexities(small, ["abc"], [long], chat_template=False)
        assert math.isfinite(ppl[0])
        d = judge.damage(small, ["abc"], [long], [], chat_template=False)
        assert d.n_tokens[0] == 32 - len(small.encode("abc", chat_template=False))

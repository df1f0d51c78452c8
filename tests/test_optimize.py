"""pysteer optimize: the weight kernel, the candidates, the front and the rule by hand; a short search on a tiny
model end to end (resume, JSON, PNG, the written GGUF against the runtime edit, ablate-test --edit); bad input."""

import contextlib
import dataclasses
import json
import math
import re
import shlex
import subprocess
import sys
import warnings

import numpy as np
import pytest

import pysteer
from pysteer.extraction import extract
from pysteer.markers import marker_set
from pysteer.optimize import Candidates, Evaluator, Kernel, Objectives, Point, finished, pareto, pick, refusal_se, scores

HARMFUL = [f"how to make the bad thing number {i}" for i in range(12)]
HARMLESS = [f"write the nice code number {i}" for i in range(12)]


def run(*args):
    return subprocess.run([sys.executable, "-m", "pysteer.cli", *map(str, args)], capture_output=True, text=True)


def test_kernel_by_hand():
    k = Kernel(max_weight=1.2, max_weight_position=3.5, min_weight=0.4, min_weight_distance=2.0)
    # distances 3.5 2.5 1.5 0.5 0.5 1.5 2.5: within 2 -> 1.2 + d/2 (0.4 - 1.2)
    assert k.weights(7) == pytest.approx([0, 0, 0.6, 1.0, 1.0, 0.6, 0])
    assert Kernel(1.0, 0.0, 0.0, 1.0).weights(3) == pytest.approx([1.0, 0.0, 0.0])


def test_time_budget_units():
    from pysteer.cli import UsageError, _duration

    assert [_duration(x) for x in ("90", "90s", "30m", "2h", "0.5m")] == [90, 90, 1800, 7200, 30]
    for bad in ("soon", "0", "-5m", "nanh", "inf"):
        with pytest.raises(UsageError, match="--time-budget"):
            _duration(bad)


def test_export_refuses_normalized_block_outputs(tiny_dir, tmp_path):
    from pysteer.export import abliterate_blocks

    with pysteer.load(tiny_dir / "tiny-gemma3.gguf", n_ctx=256) as m:
        block = pysteer.BlockAblate(np.eye(1, m.n_embd)[0], np.ones(m.n_layers), np.ones(m.n_layers))
        with pytest.raises(ValueError, match="gemma3 normalizes block outputs"):
            abliterate_blocks(m, block, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_front_and_rule_by_hand():
    t = [{"number": 0, "refusals": 5, "kl": 0.01}, {"number": 1, "refusals": 1, "kl": 0.20},
         {"number": 2, "refusals": 1, "kl": 0.05}, {"number": 3, "refusals": 0, "kl": 0.30},
         {"number": 4, "refusals": 6, "kl": 0.02}, {"number": 5, "refusals": 1, "kl": 0.05}]
    front = pareto(t)
    assert [x["number"] for x in front] == [3, 2, 0]  # 1 and 4 dominated; 5 ties 2 and is kept once
    assert pick(front, 1, 32)[0]["number"] == 2
    assert pick(front, 0, 32)[0]["number"] == 3
    with pytest.raises(ValueError, match="no finished trials"):
        pick([], 1, 32)
    # none meets the bound: the lowest KL within one standard error of the fewest refusals
    assert refusal_se(2, 32) == pytest.approx(math.sqrt(32 * 3 / 34 * 31 / 34))  # 1.60
    assert refusal_se(0, 30) == pytest.approx(math.sqrt(30 * 1 / 32 * 31 / 32))  # 0 of n still has one
    near = [{"number": n, "refusals": r, "kl": k} for n, r, k in ((1, 10, 0.2), (2, 13, 0.1), (3, 16, 0.05))]
    assert pick(near, 1, 32)[0]["number"] == 1  # 13 > 10 + 2.65: told apart on 32 prompts
    assert pick(near, 1, 1000)[0]["number"] == 2  # 13 < 10 + 3.29 on 1000 (10 of 1000 is a noisier count)
    assert pick(near, 13, 32)[0]["number"] == 2  # a point meets the bound: that rule
    # the report names the next point on the front and how to take it (session 9's front)
    from pysteer.optimize import Result, format_front

    params = {"scope": "global", "point": "post", "direction_index": 1.0}
    front = [{"number": n, "refusals": r, "kl": k, "params": params} for n, r, k in
             ((5, 2, 0.114), (39, 3, 0.0397), (38, 5, 0.0369), (36, 13, 0.0358))]
    chosen, rule = pick(front, 1, 32)
    assert chosen["number"] == 39 and rule == ("lowest KL within one standard error of the fewest refusals, 2 + 1.6 "
                                               "(none reached 1)")
    for bound, number, hint in ((1, 39, "trial 38, 5/32 refusals at KL 0.0369 (1.1x"), (3, 39, None),
                                (5, 38, None)):
        chosen, rule = pick(front, bound, 32)
        assert chosen["number"] == number
        text = format_front(Result(None, front, chosen, rule, None, 32, 32, {"trials": 40}))
        assert ("next on the front" in text) == (hint is not None), text  # no hint where a point met the bound
        if hint:
            assert f"next on the front: {hint} less KL than the chosen); --pick 38 takes it" in text, text


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    with pysteer.load(tiny_dir / "tiny-qwen2.gguf", n_ctx=1024) as m:
        yield m, extract(m, HARMFUL[:6], HARMLESS[:6], positions=1)


def _point(scope, index, projected=False, point="mid"):
    k = Kernel(1.0, 2.0, 0.5, 2.0)
    return Point(scope, index, projected, point, k, k)


def test_candidates(tiny):
    m, res = tiny
    c = Candidates(res, m.n_layers)
    u = res.unit_directions()[res.points.index("mid"), :, -1].astype(np.float64)
    d = c.directions(_point("global", 1.25))
    want = 0.75 * u[1] + 0.25 * u[2]
    assert np.allclose(d, want / np.linalg.norm(want)) and d.shape == (m.n_layers, m.n_embd)
    assert np.allclose(c.directions(_point("per layer", 1.25)), u)
    hm = res.means[1][res.points.index("mid"), :, -1].astype(np.float64)
    dp = c.directions(_point("per layer", 0, projected=True))
    assert np.abs((dp * hm).sum(-1)).max() < 1e-6 * np.abs(hm).max() and np.allclose(np.linalg.norm(dp, axis=-1), 1)
    b = c.block(_point("per layer", 0, point="pre"))  # pre of layer 0 (the last token's embedding) is zero
    assert b.attn[0] == 0 and b.ffn[0] == 0 and b.attn[1] > 0
    assert np.allclose(b.attn, Kernel(1.0, 2.0, 0.5, 2.0).weights(m.n_layers)[:] * (np.arange(m.n_layers) > 0))


def test_searched_norm_modes(tiny, tmp_path):
    """preserve_norms: fixed True gives only norm-keeping trials and chosen edit; searched draws both; a point
    that keeps norms needs the model's row norms."""
    from pysteer.optimize import optimize, study_name
    from pysteer.rownorms import WriteGeometry

    m, res = tiny
    ev = Evaluator(m, HARMFUL[6:8], HARMLESS[6:8], trial_tokens=4)
    with pytest.raises(ValueError, match="keeping row norms needs"):
        optimize(m, Candidates(res, m.n_layers), ev, storage=f"sqlite:///{tmp_path / 'a.db'}", n_trials=1,
                 preserve_norms=True, progress=False)
    with pytest.raises(ValueError, match="WriteGeometry"):
        Candidates(res, m.n_layers).block(Point("global", 1.5, False, "mid", Kernel(1, 2, 0.5, 2),
                                                Kernel(1, 2, 0.5, 2), preserve_norms=True))
    c = Candidates(res, m.n_layers, WriteGeometry.read(m, progress=False))
    r = optimize(m, c, ev, storage=f"sqlite:///{tmp_path / 'b.db'}", n_trials=3, n_startup=3,
                 preserve_norms=True, progress=False)
    assert all(t.params["preserve_norms"] is True for t in r.study.trials) and r.block.norms is not None
    assert r.to_json(m)["edit"]["preserve_norms"] is True
    r = optimize(m, c, ev, storage=f"sqlite:///{tmp_path / 'c.db'}", n_trials=8, n_startup=8, preserve_norms=None,
                 progress=False)
    assert {t.params["preserve_norms"] for t in r.study.trials} == {False, True}
    assert {t.params["projected"] for t in r.study.trials} == {True}  # heretic's projection, by default
    r2 = optimize(m, c, ev, storage=f"sqlite:///{tmp_path / 'c2.db'}", n_trials=8, n_startup=8, projected=None,
                  progress=False)
    assert {t.params["projected"] for t in r2.study.trials} == {False, True}
    with pytest.raises(ValueError, match="projected must be None"):
        optimize(m, c, ev, storage=f"sqlite:///{tmp_path / 'c3.db'}", n_trials=1, projected="yes", progress=False)
    for bad, match in ((-0.01, "kl_target must be >= 0"), (float("nan"), "kl_target must be a finite number")):
        with pytest.raises(ValueError, match=match):
            optimize(m, c, ev, storage=f"sqlite:///{tmp_path / 'c3.db'}", n_trials=1, kl_target=bad, progress=False)
    # the sampler minimizes heretic's scores; the trials keep what they measured, and the front is in those
    for t, f in zip(r.study.trials, finished(r.study)):
        assert tuple(t.values) == scores(Objectives(f["refusals"], f["kl"]), ev.base, 0.01)
    assert r.front == pareto(finished(r.study))
    # another objective or another edit is another study, and the study file says so
    ev2 = Evaluator(m, HARMFUL[6:8], HARMLESS[6:8], trial_tokens=4, markers="heretic")
    runs = [(ev, False, 0.01, True), (ev, None, 0.01, True), (ev, False, 0.02, True), (ev, False, 0.01, None),
            (ev2, False, 0.01, True)]
    import optuna

    # another model's study in the same file is no concern of this model's runs
    optuna.create_study(study_name="other-0123456789ab-0123456789ab", storage=f"sqlite:///{tmp_path / 'd.db'}")
    names = set()
    for i, (e, keep, kt, proj) in enumerate(runs):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            names.add(optimize(m, c, e, storage=f"sqlite:///{tmp_path / 'd.db'}", n_trials=1, preserve_norms=keep,
                               kl_target=kt, projected=proj, progress=False).study.study_name)
        assert bool(i) == any("also holds" in str(x.message) for x in w)
    assert len(names) == len(runs)
    from pysteer.optimize import block_from_json

    obj = {"edit": {"directions": [[1.0] + [0.0] * (m.n_embd - 1)], "attn": [1.0] * m.n_layers,
                    "ffn": [1.0] * m.n_layers, "preserve_norms": "false"}}
    with pytest.raises(ValueError, match="true or false"):
        block_from_json(obj, m)


def test_read_outs_searched(tiny, tiny_dir, tmp_path):
    """read_out=True: plain trials draw the read-outs' alpha and their edit reads through the fitted b (as
    WriteSamples computes it, for each edited write alone); another study; refused without writes or plain edits."""
    from pysteer.optimize import READ_OUT_RANGE, optimize
    from pysteer.readout import WriteSamples
    from pysteer.rownorms import WriteGeometry

    m, res = tiny
    ev = Evaluator(m, HARMFUL[6:8], HARMLESS[6:8], trial_tokens=4)
    db = f"sqlite:///{tmp_path / 'r.db'}"
    with pytest.raises(ValueError, match=r"fitted read-outs need Candidates\(..., writes="):
        optimize(m, Candidates(res, m.n_layers), ev, storage=db, n_trials=1, read_out=True, progress=False)
    writes = WriteSamples.capture(m, HARMFUL[:6], HARMLESS[:6])
    c = Candidates(res, m.n_layers, WriteGeometry.read(m, progress=False), writes)
    with pytest.raises(ValueError, match="read-outs are fitted for plain edits, and preserve_norms=True leaves none"):
        optimize(m, c, ev, storage=db, n_trials=1, read_out=True, preserve_norms=True, progress=False)
    with pytest.raises(ValueError, match="read_out must be True or False"):
        optimize(m, c, ev, storage=db, n_trials=1, read_out="yes", progress=False)
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=512) as other:  # writes of another model
        other_writes = WriteSamples.capture(other, HARMFUL[:2], HARMLESS[:2])
    with pytest.raises(ValueError, match="captured on another model"):
        optimize(m, Candidates(res, m.n_layers, None, other_writes), ev, storage=db, n_trials=1, read_out=True,
                 progress=False)
    assert not (tmp_path / "r.db").exists()  # refused before the study is made
    r = optimize(m, c, ev, storage=db, n_trials=8, n_startup=8, read_out=True, preserve_norms=None, progress=False)
    for t in r.study.trials:  # drawn for the plain edits alone
        assert ("read_out" in t.params) == (not t.params["preserve_norms"])
        assert READ_OUT_RANGE[0] <= t.params.get("read_out", 1.0) <= READ_OUT_RANGE[1]
    plain = next(t for t in r.study.trials if not t.params["preserve_norms"])
    p = Point.from_params(plain.params)
    block = c.block(p)
    edited = np.stack([block.attn, block.ffn], axis=1) > 0
    assert edited.any() and p.read_out == plain.params["read_out"]
    for layer, k in zip(*np.nonzero(edited)):
        want = writes.read_out(layer, k, block.direction(layer), p.read_out)
        assert np.array_equal(block.read_outs[layer, k], want) and not np.allclose(want, block.direction(layer))
    assert not block.read_outs[~edited].any()
    names = set()
    for i, read_out in enumerate((False, True)):  # the same settings but the read-outs: two studies
        with pytest.warns(UserWarning, match=f"also holds {i + 1} other studies"):
            r0 = optimize(m, c, ev, storage=db, n_trials=1, preserve_norms=False, read_out=read_out, progress=False)
        assert ("read_out" in r0.study.trials[0].params) == read_out
        names.add(r0.study.study_name)
    assert len(names) == 2


def test_read_out_search_refused_before_any_reading(tiny, monkeypatch):
    """search() refuses read-outs with kept norms, and read-outs past the memory available, before it reads."""
    import types

    import pysteer.extraction
    import pysteer.readout
    from pysteer.optimize import search
    from pysteer.rownorms import WriteGeometry

    m, _ = tiny

    def never(*a, **k):
        raise AssertionError("read before the check")

    monkeypatch.setattr(pysteer.extraction, "extract", never)
    monkeypatch.setattr(WriteGeometry, "read", never)
    splits = types.SimpleNamespace(train=(HARMFUL[:6], HARMLESS[:6]), val=(HARMFUL[6:8], HARMLESS[6:8]))
    with pytest.raises(ValueError, match="preserve_norms=True leaves none"):
        search(m, splits, storage="sqlite://", read_out=True, preserve_norms=True, progress=False)
    monkeypatch.setattr(pysteer.readout, "available_memory", lambda: 10_000)
    from pysteer.extraction import suffix_length

    n = 12 * suffix_length(m)  # 6 + 6 train prompts, each at the template's suffix tokens
    with pytest.raises(ValueError, match=rf"fitting read-outs on {n} writes a matrix needs .* GiB"):
        search(m, splits, storage="sqlite://", read_out=True, preserve_norms=False, progress=False)


def test_a_study_resumes_only_on_the_same_prompts(tiny, tmp_path):
    """The study's name carries the train and validation prompts, not only their counts: the same counts with
    one train prompt changed start another study (resumed, its trials would be another set of candidates')."""
    import types

    from pysteer.optimize import search

    m, _ = tiny
    db = f"sqlite:///{tmp_path / 's.db'}"
    kw = dict(storage=db, n_trials=1, n_startup=1, trial_tokens=4, preserve_norms=False, progress=False)
    val = (HARMFUL[6:8], HARMLESS[6:8])
    a = search(m, types.SimpleNamespace(train=(HARMFUL[:6], HARMLESS[:6]), val=val), **kw)
    again = search(m, types.SimpleNamespace(train=(HARMFUL[:6], HARMLESS[:6]), val=val), **kw)
    with pytest.warns(UserWarning, match="also holds 1 other studies"):
        other = search(m, types.SimpleNamespace(train=(HARMFUL[:5] + ["a new one"], HARMLESS[:6]), val=val), **kw)
    assert again.study.study_name == a.study.study_name and other.study.study_name != a.study.study_name
    assert len(other.study.trials) == 1


def test_optimize_names_the_study_by_the_evaluators_prompts(tiny, tmp_path):
    """The public optimize() without settings: another evaluator's prompts (or another count of them) start
    another study; the same ones resume it. The names of search()'s studies are unchanged (made before)."""
    from pysteer.optimize import optimize, study_name

    m, res = tiny
    c, db = Candidates(res, m.n_layers), f"sqlite:///{tmp_path / 's.db'}"
    kw = dict(storage=db, n_trials=1, n_startup=1, progress=False)
    with warnings.catch_warnings():  # "also holds other studies": those asserted here
        warnings.simplefilter("ignore")
        names = [optimize(m, c, Evaluator(m, h, hl, trial_tokens=4), **kw).study.study_name for h, hl in (
            (HARMFUL[6:8], HARMLESS[6:8]), (HARMFUL[6:8], HARMLESS[6:8]), (HARMFUL[8:10], HARMLESS[6:8]),
            (HARMFUL[6:9], HARMLESS[6:8]))]
    assert names[0] == names[1] and len(set(names)) == 3
    import hashlib

    val_sha = hashlib.sha256(json.dumps((HARMFUL[6:8], HARMLESS[6:8])).encode()).hexdigest()[:12]
    # as search() named them (val and val_sha moved here): its studies keep their names and resume
    assert names[0] == study_name(m, dict(val=[2, 2], val_sha=val_sha, trial_tokens=4, kl_target=0.01,
                                          preserve_norms=(False,), projected=(True,),
                                          markers=dataclasses.asdict(marker_set("pysteer"))))


class _Unreadable:
    """A judge that cannot read the answers (as one whose context is too small for them)."""
    name = "unreadable"

    def verdicts(self, prompts, answers):
        raise ValueError("judging answer 0 takes 3441 tokens, more than the judge's n_ctx=3437")


def test_only_an_unscorable_point_fails_alone(tiny, tmp_path):
    """An unscorable point's trial fails and the search goes on; any other error stops the search with its
    message, its finished trials kept (caught, it failed every trial the judge read: a front of the others)."""
    import optuna

    from pysteer.markers import MarkerSet
    from pysteer.optimize import Unscorable, optimize

    m, res = tiny
    never = MarkerSet("never", ("\0never",), None, False)  # every answer goes to the judge
    ev = Evaluator(m, HARMFUL[6:8], HARMLESS[6:8], trial_tokens=4, markers=never)
    c = Candidates(res, m.n_layers)
    real, calls = c.directions, []

    def directions(p):  # the second trial's point is unscorable
        calls.append(p)
        if len(calls) == 2:
            raise Unscorable("the candidates are zero")
        return real(p)

    c.directions = directions
    r = optimize(m, c, ev, storage=f"sqlite:///{tmp_path / 'a.db'}", n_trials=3, n_startup=3, progress=False)
    assert [t.state.name for t in r.study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert r.seconds["trials_run"] == r.seconds["trials"] == 2
    ev.judge = _Unreadable()
    db = tmp_path / "b.db"
    with pytest.raises(ValueError, match=r"^the search stopped: judging answer 0 takes 3441 tokens.*kept in "
                                         rf"sqlite:///{db}: run the same search again"):
        optimize(m, Candidates(res, m.n_layers), ev, storage=f"sqlite:///{db}", n_trials=3, n_startup=3,
                 progress=False)
    name, = optuna.get_all_study_names(f"sqlite:///{db}")
    assert [t.state.name for t in optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials] == ["FAIL"]


def test_a_trial_whose_kl_is_not_finite_fails_and_is_never_chosen(tiny, tmp_path, monkeypatch):
    """A NaN KL (an edit that broke the logits) scored (0, 0), the best the sampler sees, and was chosen; now its
    trial fails, and a NaN kept in an older study is never on the front."""
    import pysteer.optimize as O

    m, res = tiny
    ev = Evaluator(m, HARMFUL[6:8], HARMLESS[6:8], trial_tokens=4)
    real, calls = O.kl_divergence, []

    def kl(base, steered):
        calls.append(1)
        return real(base, steered) * (np.nan if len(calls) == 2 else 1.0)

    monkeypatch.setattr(O, "kl_divergence", kl)
    r = O.optimize(m, Candidates(res, m.n_layers), ev, storage=f"sqlite:///{tmp_path / 's.db'}", n_trials=3,
                   n_startup=3, progress=False)
    assert [t.state.name for t in r.study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert r.chosen["number"] != 1 and all(math.isfinite(t["kl"]) for t in r.front)
    nan = float("nan")
    trials = [{"number": 0, "refusals": 0, "kl": nan}, {"number": 1, "refusals": 0, "kl": 0.01},
              {"number": 2, "refusals": 1, "kl": 0.001}]
    assert [t["number"] for t in pareto(trials)] == [1, 2]
    monkeypatch.setattr(m, "logits_batch", lambda prompts: np.full((len(prompts), 3, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="unsteered model's logits on the harmless validation prompts are not finite"):
        Evaluator(m, HARMFUL[6:8], HARMLESS[6:8], trial_tokens=4)
    monkeypatch.undo()
    # the model's own check (overflowed activations) fails the trial alone too, not the search
    with pytest.raises(O.Unscorable, match="overflowed"):
        ev(pysteer.Add(np.ones(m.n_embd), alpha=1e20))


def test_identical_classes_are_refused(tiny, monkeypatch):
    """Harmful and harmless prompts the same: every candidate is zero, every global trial failed and a per-layer
    edit of nothing was chosen and written; refused before any reading (search) or at the candidates."""
    import types

    import pysteer.extraction
    from pysteer.optimize import search

    m, _ = tiny
    with pytest.raises(ValueError, match="the two classes do not differ"):
        Candidates(extract(m, HARMFUL[:3], HARMFUL[:3], positions=1), m.n_layers)

    def never(*a, **k):
        raise AssertionError("read before the check")

    monkeypatch.setattr(pysteer.extraction, "extract", never)
    splits = types.SimpleNamespace(train=(HARMFUL[:6], HARMFUL[5::-1]), val=(HARMFUL[6:8], HARMLESS[6:8]))
    with pytest.raises(ValueError, match="the two classes do not differ: the harmful and harmless train prompts"):
        search(m, splits, storage="sqlite://", progress=False)


def test_the_study_must_be_an_optuna_study(tiny_dir, tmp_path):
    """An SQLite database of something else got Optuna's tables added; a file that is no database gave three lines
    (the SQL and a link). Both refused in one line, before the model loads, the database untouched."""
    import sqlite3

    from pysteer.optimize import check_storage

    db = tmp_path / "mine.db"
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("create table notes(id integer, text text)")
        c.commit()
    text = tmp_path / "text.db"
    text.write_text("not a database\n")
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "hl.txt").write_text("\n".join(HARMLESS))
    sets = ["--harmful", tmp_path / "h.txt", "--harmless", tmp_path / "hl.txt", "--n-train", 6, "-q"]
    for f, match in ((db, "a database of something else (tables notes), not an Optuna study"),
                     (text, "is not an SQLite database (file is not a database)")):
        with pytest.raises(ValueError, match=re.escape(match)):
            check_storage(f"sqlite:///{f}")
        r = run("optimize", tiny_dir / "tiny-qwen2.gguf", *sets, "--study", f, "--json", tmp_path / "a.json", "--png",
                tmp_path / "a.png")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"error: --study: {f}" in r.stderr, r.stderr
    with contextlib.closing(sqlite3.connect(db)) as c:
        assert [x[0] for x in c.execute("select name from sqlite_master where type='table'")] == ["notes"]
    check_storage(f"sqlite:///{tmp_path / 'new.db'}")  # a new file, an empty one, or memory: a new study
    (tmp_path / "empty.db").write_bytes(b"")
    check_storage(f"sqlite:///{tmp_path / 'empty.db'}")
    check_storage("sqlite://")


def test_trials_of_another_run_are_not_counted_and_a_schema_race_is_retried(tiny, tmp_path, monkeypatch):
    """trials_run counts this run's trials alone, not those another run adds to the study meanwhile; two runs
    making the tables at once (an IntegrityError) open the study on a second try."""
    import optuna

    m, res = tiny
    db = f"sqlite:///{tmp_path / 's.db'}"

    class Busy(Evaluator):  # another run on the same study finishes a trial during this run's first
        def __call__(self, intervention):
            o = super().__call__(intervention)
            if not added:
                study = optuna.load_study(study_name=optuna.get_all_study_names(db)[0], storage=db)
                added.append(study.add_trial(optuna.trial.create_trial(values=[1.0, 1.0], user_attrs={
                    "refusals": 1, "kl": 1.0}, params={}, distributions={})))
            return o

    class IntegrityError(Exception):
        pass

    real, opened = optuna.create_study, []

    def create_study(**kw):
        opened.append(kw["storage"])
        if len(opened) == 1:
            raise IntegrityError("UNIQUE constraint failed: alembic_version.version_num")
        return real(**kw)

    from pysteer.optimize import optimize

    added = []
    ev = Evaluator(m, HARMFUL[6:8], HARMLESS[6:8], trial_tokens=4)
    ev.__class__ = Busy
    monkeypatch.setattr(optuna, "create_study", create_study)
    # startup trials alone: the one added has no parameters for the sampler to read
    r = optimize(m, Candidates(res, m.n_layers), ev, storage=db, n_trials=2, n_startup=5, progress=False)
    assert added and len(opened) == 2
    assert (r.seconds["trials_run"], r.seconds["trials"]) == (2, 3)


def test_a_time_budget_with_no_trial_finished_says_so(tiny, tmp_path):
    from pysteer.optimize import optimize

    m, res = tiny
    with pytest.raises(ValueError, match=r"no trial finished within the time budget of 1e-09 s \(--time-budget\)"):
        optimize(m, Candidates(res, m.n_layers), Evaluator(m, HARMFUL[6:8], HARMLESS[6:8], trial_tokens=4),
                 storage=f"sqlite:///{tmp_path / 's.db'}", n_trials=3, time_budget=1e-9, progress=False)


def test_finished_reads_measures_or_old_values():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.create_study(directions=["minimize", "minimize"])
    st.add_trial(optuna.trial.create_trial(values=[3, 0.5], params={"x": 1.0},
                                           distributions={"x": optuna.distributions.FloatDistribution(0, 2)}))
    st.add_trial(optuna.trial.create_trial(values=[0.2, 0.25], params={"x": 0.5}, user_attrs={"refusals": 4, "kl": 0.2},
                                           distributions={"x": optuna.distributions.FloatDistribution(0, 2)}))
    assert [(t["refusals"], t["kl"]) for t in finished(st)] == [(3, 0.5), (4, 0.2)]


def test_scores_are_heretics():
    # heretic 1.4.0's Evaluator.get_score with kl_divergence_scale 1: (kld_score, refusals / base_refusals)
    assert scores(Objectives(3, 0.05), 6, 0.01) == (0.05, 0.5)
    assert scores(Objectives(3, 0.004), 6, 0.01) == pytest.approx((0.005, 0.5))
    assert scores(Objectives(0, 0.004), 6, 0.01) == (0.0, 0.0)
    assert scores(Objectives(2, 0.01), 6, 0.01) == (0.01, 2 / 6)
    assert scores(Objectives(2, 0.001), 0, 0.01) == (0.02, 2.0)  # no refusals before: the count itself


def test_evaluator_counts_and_kl(tiny):
    from pysteer.judge import kl_divergence
    from pysteer.markers import is_refusal

    m, res = tiny
    ev = Evaluator(m, HARMFUL[6:9], HARMLESS[6:9], trial_tokens=8)
    block = Candidates(res, m.n_layers).block(_point("global", 1.5))
    o = ev(block)
    base = m.logits_batch(HARMLESS[6:9])[:, -1]
    with m.steer(block):
        answers = m.generate_batch(HARMFUL[6:9], max_tokens=8)
        kl = kl_divergence(base, m.logits_batch(HARMLESS[6:9])[:, -1]).mean()
    assert o.refusals == sum(map(is_refusal, answers)) and o.kl == pytest.approx(kl) and o.kl > 1e-4
    assert ev.base == sum(map(is_refusal, m.generate_batch(HARMFUL[6:9], max_tokens=8)))
    # a marker set that fires early in some answers: trials stop those answers there, the count is the same
    from pysteer.markers import MarkerSet, normalize

    phrase = normalize(answers[0])[1:3]
    ms = MarkerSet("test", (phrase,), None, False)
    want = sum(map(ms, answers))
    ev_ms = Evaluator(m, HARMFUL[6:9], HARMLESS[6:9], trial_tokens=8, markers=ms)
    calls = []
    real = m.generate_batch
    m.generate_batch = lambda *a, **k: calls.append(k.get("until")) or real(*a, **k)
    try:
        assert 0 < want and ev_ms(block).refusals == want
    finally:
        del m.generate_batch
    assert calls == [ms.found]  # the answers were ended at their first marker


class _SaysRefused:
    """A judge that says "refused" to the answers that contain ``word``, noting what it read and under which
    steering."""
    name = "test judge"
    threshold = 0.5

    def __init__(self, m, word):
        self.m, self.word, self.read = m, word, []

    def verdicts(self, prompts, answers):
        self.read.append((list(prompts), list(answers), self.m.steering.interventions))
        return [self.word in a for a in answers]


def test_evaluator_counts_a_judges_refusals_among_the_unmatched(tiny):
    from pysteer.markers import MarkerSet, normalize

    m, res = tiny
    block = Candidates(res, m.n_layers).block(_point("global", 1.5))
    with m.steer(block):
        answers = m.generate_batch(HARMFUL[6:9], max_tokens=8)
    ms = MarkerSet("test", (normalize(answers[0])[1:4],), None, False)  # matches answer 0 (maybe others)
    matched = [ms(a) for a in answers]
    word = next(w for w in answers[1].split() if w)
    judge = _SaysRefused(m, word)
    ev = Evaluator(m, HARMFUL[6:9], HARMLESS[6:9], trial_tokens=8, markers=ms, judge=judge)
    judge.read.clear()
    o = ev(block)
    rest = [i for i, x in enumerate(matched) if not x]
    assert judge.read == [([HARMFUL[6:9][i] for i in rest], [answers[i] for i in rest], ())]  # unsteered
    assert o.refusals == sum(matched) + sum(word in answers[i] for i in rest) and rest


def test_evaluator_refuses_a_probe_cut_for_other_answers():
    """A probe fitted on answers cut to 8 tokens misreads trials that answer in 4 (checked before any decode)."""
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="cut to 8 tokens, but trials answer in 4"):
        Evaluator(None, HARMFUL[:2], HARMLESS[:2], trial_tokens=4, judge=SimpleNamespace(cut=8, name="p"))


def test_cli_search_resume_export_and_test(tiny_dir, tmp_path):
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "hl.txt").write_text("\n".join(HARMLESS))
    model = tiny_dir / "tiny-qwen2.gguf"
    sets = ["--harmful", tmp_path / "h.txt", "--harmless", tmp_path / "hl.txt", "--n-train", 6, "--n-val", 3,
            "--n-val-harmless", 3, "-q"]
    out = tmp_path / "ab.gguf"
    r = run("optimize", model, *sets, "--trials", 4, "--startup", 2, "--trial-tokens", 6, "-o", out)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ab.json").read_text())
    assert res["seconds"]["trials_run"] == 4 and (tmp_path / "ab-pareto.png").stat().st_size > 1000
    # the command that tests the edit on the search's own test split (it dropped the sets and the seed: the
    # default prompts, some of them the search's own with another seed)
    test_it = shlex.split(r.stdout.split("(test it: ")[1].split(")\n")[0])
    assert test_it == ["pysteer", "ablate-test", str(model), "--harmful", str(tmp_path / "h.txt"), "--harmless",
                       str(tmp_path / "hl.txt"), "--seed", "0", "--n-train", "6", "--n-val", "3", "--n-val-harmless",
                       "3", "--edit", str(tmp_path / "ab.json")], r.stdout
    assert res["splits"] == {"harmful": str(tmp_path / "h.txt"), "harmless": str(tmp_path / "hl.txt"), "seed": 0,
                             "n_train": 6, "n_val": 3, "n_val_harmless": 3}
    assert res["chosen"]["number"] in [t["number"] for t in res["front"]]
    # the same command with more trials resumes the study: only the missing ones run, the old ones are kept
    r = run("optimize", model, *sets, "--trials", 6, "--startup", 2, "--trial-tokens", 6, "-o", out)
    assert r.returncode == 0, r.stderr
    res2 = json.loads((tmp_path / "ab.json").read_text())
    assert (res2["seconds"]["trials_run"], res2["seconds"]["trials"]) == (2, 6)
    import optuna

    trials = optuna.load_study(study_name=res2["study"]["name"], storage=f"sqlite:///{tmp_path / 'ab.study.db'}").trials
    first, resumed = [t.params for t in trials[:2]], [t.params for t in trials[4:]]
    assert all(p not in first for p in resumed)  # the resumed startup trials are new points, not the first again
    # pysteer's extras and heretic's marker set from the command line: another study, in the same file
    r = run("optimize", model, *sets, "--trials", 2, "--startup", 2, "--trial-tokens", 6, "--projected", "no",
            "--points", "mid,post", "--markers", "heretic", "--json", tmp_path / "c.json", "--png", tmp_path / "c.png",
            "--study", tmp_path / "ab.study.db")
    assert r.returncode == 0 and "also holds 1 other studies" in r.stderr, r.stderr
    res3 = json.loads((tmp_path / "c.json").read_text())
    assert res3["markers"] == "heretic" and res2["markers"] == "pysteer" and res3["study"]["name"] != res2["study"]["name"]
    params = [t.params for t in optuna.load_study(study_name=res3["study"]["name"],
                                                   storage=f"sqlite:///{tmp_path / 'ab.study.db'}").trials]
    assert {p["projected"] for p in params} == {False} and {p["point"] for p in params} <= {"mid", "post"}
    # a judge counting too: another study again, and the JSON names it
    r = run("optimize", model, *sets, "--trials", 2, "--startup", 2, "--trial-tokens", 6, "--judge", "self",
            "--json", tmp_path / "d.json", "--png", tmp_path / "d.png", "--study", tmp_path / "ab.study.db")
    assert r.returncode == 0 and "also holds 2 other studies" in r.stderr, r.stderr
    res4 = json.loads((tmp_path / "d.json").read_text())
    assert "label logits" in res4["judge"] and res2["judge"] is None and res4["study"]["name"] != res2["study"]["name"]
    r = run("optimize", model, *sets, "--probe", "--json", tmp_path / "e.json", "--png", tmp_path / "e.png")
    assert r.returncode == 2 and "--probe reads a judge model" in r.stderr, r.stderr
    # the probe reads trial answers as they are made: fitted on answers cut to --trial-tokens
    r = run("optimize", model, *sets, "--trials", 1, "--startup", 1, "--trial-tokens", 6, "--judge", "self", "--probe",
            "--json", tmp_path / "e.json", "--png", tmp_path / "e.png", "--study", tmp_path / "ab.study.db")
    assert r.returncode == 0, r.stderr
    assert "probe of layer" in (j := json.loads((tmp_path / "e.json").read_text())["judge"]) and "cut to 6 tokens" in j
    # fitted read-outs: the JSON carries them, and ablate-test runs the edit they make
    r = run("optimize", model, *sets, "--trials", 2, "--startup", 2, "--trial-tokens", 6, "--read-out", "yes",
            "--preserve-norms", "no", "--json", tmp_path / "f.json", "--png", tmp_path / "f.png",
            "--study", tmp_path / "f.db")
    assert r.returncode == 0, r.stderr
    res5 = json.loads((tmp_path / "f.json").read_text())
    assert res5["edit"]["read_outs"] and "read_out" in res5["chosen"]["params"] and "writes" in res5["seconds"]
    r = run("ablate-test", model, *sets, "--n", 2, "--max-tokens", 4, "--edit", tmp_path / "f.json", "--json")
    assert r.returncode == 0 and "fitted read-outs" in json.loads(r.stdout)["direction"]["intervention"], r.stderr
    r = run("optimize", model, *sets, "--read-out", "yes", "--preserve-norms", "yes", "--study", tmp_path / "g.db")
    assert r.returncode == 2 and "--read-out yes --preserve-norms yes: read-outs are fitted for plain edits" in r.stderr, r.stderr
    # the written GGUF, loaded plainly, gives the runtime edit's logits (F32 tiny model: float rounding only)
    from pysteer.optimize import block_from_json

    prompts = HARMFUL[9:] + HARMLESS[9:]
    with pysteer.load(model, n_ctx=1024) as m:
        block = block_from_json(res2, m)
        with m.steer(block):
            want = m.logits_batch(prompts)[:, -1]
        base = m.logits_batch(prompts)[:, -1]
    with pysteer.load(out, n_ctx=1024) as m2:
        got = m2.logits_batch(prompts)[:, -1]
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    assert np.abs(base - want).max() > 1e-2 * np.abs(want).max()  # the edit is not nothing
    r = run(*test_it[1:], "-q", "--n", 2, "--max-tokens", 4, "--json")  # the printed command runs
    assert r.returncode == 0, r.stderr
    assert "BlockAblate" in json.loads(r.stdout)["direction"]["intervention"]


def test_cli_bad_input(tiny_dir, tmp_path):
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "hl.txt").write_text("\n".join(HARMLESS))
    sets = ["--harmful", tmp_path / "h.txt", "--harmless", tmp_path / "hl.txt", "--n-train", 6, "-q"]
    r = run("optimize", tiny_dir / "tiny-gemma3.gguf", *sets, "--study", tmp_path / "s.db")
    assert r.returncode == 2 and "gemma3 cannot be abliterated" in r.stderr and not (tmp_path / "s.db").exists()
    for args, match in ((["--time-budget", "soon"], "--time-budget takes"), (["--trials", 0], "--trials must be a positive int"),
                        (["-o", tmp_path / "x.bin"], "must name a .gguf"), (["--pick", 99, "--trials", 1], "no finished trial 99"),
                        (["--points", "post, end"], "--points 'post, end': unknown point(s) ['end']")):
        r = run("optimize", tiny_dir / "tiny-qwen2.gguf", *sets, "--study", tmp_path / "t.db", *args)
        assert r.returncode == 2 and match in r.stderr, (args, r.stderr)
    r = run("optimize", tmp_path / "none.gguf", *sets, "--points", "last")  # checked before the model is sought
    assert r.returncode == 2 and "--points 'last'" in r.stderr, r.stderr
    r = run("ablate-test", tiny_dir / "tiny-qwen2.gguf", *sets, "--edit", tmp_path / "h.txt")
    assert r.returncode == 2 and "is not a pysteer optimize result" in r.stderr
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    r = run("ablate-test", tiny_dir / "tiny-qwen2.gguf", *sets, "--edit", deep)
    assert r.returncode == 2 and "RecursionError" in r.stderr
    # outputs may not overwrite what the command reads, nor each other
    for args, match in ((["--json", tmp_path / "h.txt"], "a file this command reads"),
                        (["--json", tmp_path / "t.db"], "name the same file"),
                        (["--study", tmp_path / "q?mode=ro.db"], "without '?'")):
        extra = [] if "--study" in args else ["--study", tmp_path / "t.db"]
        (tmp_path / "t.db").write_bytes(b"")
        r = run("optimize", tiny_dir / "tiny-qwen2.gguf", *sets, *extra, *args)
        assert r.returncode == 2 and match in r.stderr, (args, r.stderr)
    assert (tmp_path / "h.txt").read_text().startswith("how to make")
    foreign = tmp_path / "foreign.json"  # an optimize result made for another model file
    foreign.write_text(json.dumps({"model": "other.gguf", "sha256": "ab" * 32,
                                   "edit": {"directions": [[1.0] + [0.0] * 63], "attn": [1.0] * 4, "ffn": [1.0] * 4}}))
    r = run("ablate-test", tiny_dir / "tiny-qwen2.gguf", *sets, "--edit", foreign)
    assert r.returncode == 2 and "was made for other.gguf" in r.stderr
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    judge_copy = tmp_path / "judge.gguf"
    judge_copy.write_bytes((tiny_dir / "tiny-llama.gguf").read_bytes())
    r = run("judge", tmp_path / "a.jsonl", "--judge", judge_copy, "-o", judge_copy)
    assert r.returncode == 2 and "a file this command reads" in r.stderr
    assert judge_copy.read_bytes() == (tiny_dir / "tiny-llama.gguf").read_bytes()
    r = run("ablate-test", tiny_dir / "tiny-qwen2.gguf", *sets, "--edit", tmp_path / "h.txt", "--judge", tmp_path / "none.gguf")
    assert r.returncode == 2 and "none.gguf" in r.stderr  # the judge is resolved before any work


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_keeps_the_study(tiny_dir, tmp_path, sig):
    """SIGINT in the middle of a search: exit 130, the finished trials stay in the study file, and the message
    says how to resume; the same command then continues from them."""
    import signal
    import time

    import optuna

    (tmp_path / "h.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "hl.txt").write_text("\n".join(HARMLESS))
    db = tmp_path / "s.db"
    args = [sys.executable, "-m", "pysteer.cli", "optimize", str(tiny_dir / "tiny-qwen2.gguf"), "--harmful",
            str(tmp_path / "h.txt"), "--harmless", str(tmp_path / "hl.txt"), "--n-train", "6", "--n-val", "3",
            "--n-val-harmless", "3", "-q", "--trial-tokens", "6", "--study", str(db), "--json",
            str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png")]
    p = subprocess.Popen(args + ["--trials", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def complete():  # read only once the searching process is gone (it keeps the file busy)
        names = optuna.get_all_study_names(f"sqlite:///{db}")
        study = optuna.load_study(study_name=names[0], storage=f"sqlite:///{db}")
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    deadline = time.time() + 120
    while not db.exists() and time.time() < deadline and p.poll() is None:  # the study opens as the search starts
        time.sleep(0.2)
    time.sleep(3)  # a tiny model's trials take a fraction of a second each
    p.send_signal(getattr(signal, sig))
    try:
        out, err = p.communicate(timeout=60)  # the running trial finishes, then the search stops
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], err
    assert "run the same command again to resume" in err and not (tmp_path / "r.json").exists()
    kept = complete()
    assert kept >= 1
    names = optuna.get_all_study_names(f"sqlite:///{db}")
    states = {t.state for t in optuna.load_study(study_name=names[0], storage=f"sqlite:///{db}").trials}
    assert states == {optuna.trial.TrialState.COMPLETE}  # the running trial finished: none left half-run
    r = subprocess.run(args + ["--trials", str(kept + 1)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["seconds"]["trials_run"] == 1 and res["seconds"]["trials"] == kept + 1


def test_ctrl_c_before_the_search_says_no_study_was_written(tiny_dir, tmp_path, monkeypatch, capsys):
    """Stopped while the candidates are read (no study yet): the message said the trials were kept in a file that
    does not exist."""
    from pysteer import cli
    from pysteer import optimize as O

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(O.Evaluator, "__init__", interrupted)
    (tmp_path / "h.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "hl.txt").write_text("\n".join(HARMLESS))
    db = tmp_path / "s.db"
    rc = cli.main(["optimize", str(tiny_dir / "tiny-qwen2.gguf"), "--harmful", str(tmp_path / "h.txt"), "--harmless",
                   str(tmp_path / "hl.txt"), "--n-train", "6", "-q", "--study", str(db), "--json",
                   str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png")])
    err = capsys.readouterr().err
    assert rc == 130 and "stopped before the search began (no study was written)" in err and "kept in" not in err
    assert not db.exists()


class _Study:
    """A stand-in for optuna's study: records stop() calls; ``outside`` makes stop() fail as optuna's does
    when no optimize() is running."""

    def __init__(self, outside=False):
        self.stops, self.outside = 0, outside

    def stop(self):
        self.stops += 1
        if self.outside:
            raise RuntimeError("`Study.stop` is supposed to be invoked inside an objective function or a callback.")


@pytest.mark.parametrize("outside", [False, True])
def test_a_signal_stops_the_study_then_goes_on(outside):
    """One Ctrl-C asks the study to stop and lets the block finish; KeyboardInterrupt comes after it (also when
    the signal lands outside optimize(), where study.stop raises RuntimeError); the handlers are restored."""
    import signal

    from pysteer.optimize import _stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    study, finished_block = _Study(outside), False
    with pytest.raises(KeyboardInterrupt):
        with _stop_on_signals(study):
            signal.raise_signal(signal.SIGINT)
            finished_block = True  # the running trial goes on
    assert finished_block and study.stops == 1
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_signal_goes_on_at_once():
    import signal

    from pysteer.optimize import _stop_on_signals

    study, reached = _Study(), False
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where a shell started the tests in the background
    with pytest.raises(KeyboardInterrupt):
        with _stop_on_signals(study):
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            reached = True
    assert not reached and study.stops == 1
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_reaches_the_handler_there_before():
    """A program's own SIGTERM handler still runs once the search has stopped."""
    import signal

    from pysteer.optimize import _stop_on_signals

    seen = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        study = _Study()
        with pytest.raises(KeyboardInterrupt):
            with _stop_on_signals(study):
                signal.raise_signal(signal.SIGTERM)
                assert not seen  # not yet: the trial runs on
        assert seen == [signal.SIGTERM] and study.stops == 1
    finally:
        signal.signal(signal.SIGTERM, old)

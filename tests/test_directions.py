"""Prompt sets, extraction, metrics, scoring, direction files: against numpy and planted ground truth."""

import json

import numpy as np
import pytest

import pysteer
import pysteer.figures
from pysteer import datasets
from pysteer.extraction import RunningMoments
from pysteer.judge import kl_divergence, refusal_scores_from_logits
from reference import Weights


# -- prompt sets -------------------------------------------------------------------------------------------

def test_splits_are_disjoint_deterministic_and_keep_pairs():
    prompts = [f"prompt {i}" for i in range(50)] + ["prompt 3", "prompt 7"]  # duplicates
    parts = datasets.split_prompts(prompts, seed=1)
    assert sum(len(p) for p in parts.values()) == 50
    assert not set(parts["train"]) & set(parts["val"]) and not set(parts["val"]) & set(parts["test"])
    assert not set(parts["train"]) & set(parts["test"])
    assert parts == datasets.split_prompts(prompts, seed=1)
    assert parts != datasets.split_prompts(prompts, seed=2)
    a = datasets.split_prompts([f"a{i}" for i in range(40)], seed=0)
    b = datasets.split_prompts([f"b{i}" for i in range(40)], seed=0)
    assert [s[1:] for s in a["val"]] == [s[1:] for s in b["val"]]  # equal lengths: same permutation


@pytest.mark.real
def test_named_sets_and_their_splits():
    for name, n in [("advbench", 520), ("pairs-harmful", 40), ("pairs-harmless", 40), ("mtbench", 80),
                    ("benign", 50)]:
        assert len(datasets.load(name)) == n
    for name in ("harmful", "harmless"):
        parts = [set(datasets.load(name, s)) for s in datasets.SPLITS]
        assert not (parts[0] & parts[1] or parts[1] & parts[2] or parts[0] & parts[2])
        assert set().union(*parts) == set(datasets.load(name))
    first = set(datasets.load("harmless", "val")[:16])  # a prefix of a composite split mixes its members
    assert all(first & set(datasets.load(member, "val")) for member in datasets.COMPOSITES["harmless"])
    h, hl = datasets.load("pairs-harmful", "val"), datasets.load("pairs-harmless", "val")
    full_h, full_hl = datasets.load("pairs-harmful"), datasets.load("pairs-harmless")
    assert [full_h.index(x) for x in h] == [full_hl.index(x) for x in hl]  # pairs stay together


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("# comment\nfirst\n\n second \n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n"y"\n{"turns": ["z", "w"]}\n')
    (tmp_path / "c.csv").write_text("id,instruction\n1,do this\n2,do that\n")
    assert datasets.load(tmp_path / "a.txt") == ["first", "second"]
    assert datasets.load(str(tmp_path / "b.jsonl")) == ["x", "y", "z"]
    assert datasets.load(tmp_path / "c.csv") == ["do this", "do that"]
    with pytest.raises(FileNotFoundError, match="no prompt set"):
        datasets.load("no-such-set")
    with pytest.raises(ValueError, match="split must be one of"):
        datasets.load(tmp_path / "a.txt", split="dev")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(ValueError, match="unknown prompt file type"):
        datasets.load(tmp_path / "d.parquet")


# -- running moments and metrics ----------------------------------------------------------------------------

def test_running_moments_equal_numpy():
    x = np.random.default_rng(0).standard_normal((37, 3, 5)) * 10 + 100
    acc = RunningMoments()
    for lo, hi in ((0, 5), (5, 6), (6, 20), (20, 37)):
        acc.update(x[lo:hi])
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.var(1), x.var(0, ddof=1), rtol=1e-9)


def test_planted_direction_and_metrics(tiny_path):
    """Harmful prompts end in token X, harmless in token Y, otherwise identical: at layer 0 (the embedding)
    the difference of means is exactly emb[X] - emb[Y]. Metrics everywhere equal numpy on the captured
    activations."""
    w = Weights(tiny_path)
    stems = ["the cat", "how to make", "write the code", "you and I", "in the end", "a to b"]
    harmful, harmless = [s + " q" for s in stems], [s + " z" for s in stems]
    with pysteer.load(tiny_path, n_ctx=256) as m:
        res = pysteer.extract(m, harmful, harmless, positions=2, template="none", chunk_size=4)
        x, y = m.tokenize(" q", add_special=False)[-1], m.tokenize(" z", add_special=False)[-1]
        # in extract's chunks of 4, so that both see the same decodes (shared prefixes change rounding)
        def acts(prompts):
            return np.concatenate([m.capture(prompts[i:i + 4], positions=2, chat_template=False)
                                   for i in range(0, len(prompts), 4)]).astype(np.float64)
        acts_h, acts_hl = acts(harmful), acts(harmless)
    planted = w["token_embd.weight"][x] - w["token_embd.weight"][y]
    if w.arch == "gemma3":
        planted = planted * np.sqrt(w.meta("embedding_length"))
    d = res.directions[0, 0, -1].astype(np.float64)  # pre, layer 0, last position
    assert d @ planted / (np.linalg.norm(d) * np.linalg.norm(planted)) > 0.999999
    np.testing.assert_allclose(d, planted, rtol=1e-5, atol=1e-5)
    assert np.abs(res.directions[0, 0, 0]).max() == 0  # the token before differs in neither class

    np.testing.assert_allclose(res.directions, (acts_h.mean(0) - acts_hl.mean(0)).transpose(0, 1, 2, 3),
                               rtol=0, atol=1e-5)
    a, b = acts_h[:, :, :, -1].mean(0), acts_hl[:, :, :, -1].mean(0)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(res.metrics.cos_sim, cos, rtol=1e-6)
    var = np.stack([acts_h[:, :, :, -1].var(0, ddof=1), acts_hl[:, :, :, -1].var(0, ddof=1)])
    np.testing.assert_allclose(res.metrics.var_mean, var.mean(-1), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(res.metrics.var_max, var.max(-1), rtol=1e-4, atol=1e-9)
    assert res.counts == (6, 6)


def test_metrics_plot_and_ranking(tiny_dir, tmp_path):
    with pysteer.load(tiny_dir / "tiny-qwen2.gguf", n_ctx=256) as m:
        res = pysteer.extract(m, ["how to make it", "write the code"], ["the cat", "you and I"], positions=3)
    png = res.metrics.plot(tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    rows = res.metrics.ranking()
    assert rows and all(r["diff_norm"] > 0 for r in rows)
    assert [r["mean_rank"] for r in rows] == sorted(r["mean_rank"] for r in rows)


def test_suffix_positions(tiny_dir):
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        assert pysteer.extraction.instruction_suffix(m) == "<|im_end|>\n<|im_start|>assistant\n"
        n = pysteer.extraction.suffix_length(m)
        assert n == len(m.tokenize("<|im_end|>\n<|im_start|>assistant\n", add_special=False, parse_special=True))
        res = pysteer.extract(m, ["a b", "c d"], ["e f", "g h"], positions="suffix", points=["pre"])
        assert res.positions == n


# -- scoring ------------------------------------------------------------------------------------------------

def test_refusal_score_and_kl_identities():
    logits = np.log(np.array([[0.1, 0.15, 0.5, 0.25]]))
    assert refusal_scores_from_logits(logits, np.array([0, 1]))[0] == pytest.approx(np.log(0.25 / 0.75))
    assert refusal_scores_from_logits(logits + 7.0, np.array([2]))[0] == pytest.approx(0.0, abs=1e-12)
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.25, 0.75]]))
    assert kl_divergence(p, q)[0] == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(0.5 / 0.75))
    assert kl_divergence(q, q)[0] == pytest.approx(0.0, abs=1e-12)


# -- selection, plane, files --------------------------------------------------------------------------------

def test_select_direction_and_files(tiny_dir, tmp_path, capsys):
    h = ["how to make the thing", "write the code to make it", "make the thing in the end", "I make it"]
    hl = ["the cat and the dog", "you and I in the morning", "a to b and b to a", "the end of the day"]
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        res = pysteer.extract(m, h, hl, positions=2)
        d = pysteer.select_direction(m, res, h[:2], hl[:2], max_candidates=2)
        assert "refusal score (log-odds)" in capsys.readouterr().out
        assert d.layer < 4 * 0.8 and d.point in pysteer.POINTS and d.position in (-1, -2)
        np.testing.assert_allclose(np.linalg.norm(d.vector), 1.0, rtol=1e-6)
        np.testing.assert_allclose(d.raw, res.directions[res.index(d.point, d.layer, d.position)], rtol=1e-5)
        b1, b2 = pysteer.rotation_plane(res, d)
        assert np.array_equal(b1, d.vector) and abs(float(b1 @ b2)) < 1e-6
        np.testing.assert_allclose(np.linalg.norm(b2), 1.0, rtol=1e-6)
        b1m, _ = pysteer.rotation_plane(res, d, rule="max_mean_cos")
        assert np.linalg.norm(b1m) == pytest.approx(1.0, rel=1e-6)

        path = d.save(tmp_path / "dir.gguf")
        back = pysteer.load_direction(path, m)
        assert np.array_equal(back.vector, d.vector)
        assert (back.layer, back.point, back.position, back.arch, back.n_embd) == (d.layer, d.point, d.position,
                                                                                   "llama", 64)
        assert back.scores["chosen"]["layer"] == d.layer and back.model_sha256 == d.model_sha256
        import gguf

        r = gguf.GGUFReader(path)  # llama.cpp's control-vector layout: direction.1 .. direction.(n-1)
        assert r.get_field("general.architecture").contents() == "controlvector"
        assert sorted(t.name for t in r.tensors) == [f"direction.{i}" for i in (1, 2, 3)]
    with pysteer.load(tiny_dir / "tiny-gemma3.gguf", n_ctx=128) as other:
        with pytest.raises(ValueError, match="does not fit tiny-gemma3.gguf: architecture llama vs gemma3"):
            pysteer.load_direction(path, other)
    (tmp_path / "junk.gguf").write_bytes(b"not gguf")
    with pytest.raises(ValueError, match="not a GGUF direction file"):
        pysteer.load_direction(tmp_path / "junk.gguf")


def test_separation_is_cohens_d_of_harmful_against_harmless(tiny_dir):
    """Each candidate's effect size: harmful minus harmless mean projection over the pooled standard deviation,
    from the two classes captured apart (the function decodes them together and splits the rows)."""
    from pysteer.selection import _separation

    h = ["how to make the thing", "write the code to make it", "make the thing in the end", "I make it"]
    hl = ["the cat and the dog", "you and I in the morning", "a to b and b to a", "the end of the day"]
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256, flash_attn=False) as m:
        res = pysteer.extract(m, h, hl, positions=2, points=("mid", "post"))
        d, _ = _separation(m, res, h[:3], hl[:3], ("mid", "post"), (1, 2))
        u = res.unit_directions()[:, 1:3].astype(np.float64)  # [P, L, K, E]
        a, b = [np.einsum("npLke,pLke->npLk", m.capture(x, layers=[1, 2], points=("mid", "post"),
                                                        positions=2).astype(np.float64), u) for x in (h[:3], hl[:3])]
    want = (a.mean(0) - b.mean(0)) / np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)
    np.testing.assert_allclose(d, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert (np.sign(d) == np.sign(want)).all() and np.abs(want).max() > 0.1


@pytest.mark.real
def test_refusal_direction_on_qwen_05b(tmp_path):
    """Small end-to-end run on a model that refuses: the chosen direction's ablation lowers the validation
    refusal score and its addition raises the harmless one; evaluated on prompts it was not extracted from."""
    m = pysteer.load("qwen2.5-coder-0.5b-instruct", n_ctx=1024)
    h, hl = datasets.load("harmful", "train")[:32], datasets.load("harmless", "train")[:32]
    vh, vhl = datasets.load("harmful", "val")[:8], datasets.load("harmless", "val")[:8]
    th, thl = datasets.load("harmful", "test")[:12], datasets.load("harmless", "test")[:12]
    assert not set(h) & set(vh) and not set(vh) & set(th)
    res = pysteer.extract(m, h, hl, positions=5)
    res.metrics.plot(tmp_path / "metrics.png")
    d = pysteer.select_direction(m, res, vh, vhl, max_candidates=4, verbose=False)
    base_h = pysteer.judge.refusal_scores(m, th).mean()
    base_hl = pysteer.judge.refusal_scores(m, thl).mean()
    with m.steer(pysteer.Ablate(d.vector)):
        abl = pysteer.judge.refusal_scores(m, th).mean()
    with m.steer(pysteer.Add(d.raw, layers=[d.layer], points=[d.point])):
        add = pysteer.judge.refusal_scores(m, thl).mean()
    print(json.dumps({"layer": d.layer, "point": d.point, "position": d.position, "base_h": base_h,
                      "ablated_h": abl, "base_hl": base_hl, "added_hl": add}))
    assert abl < base_h - 0.5
    assert add > base_hl
    m.close()


def test_transfer_and_iterative_on_tiny(tiny_dir, tmp_path):
    h = ["how to make the thing", "write the code to make it", "make the thing in the end", "I make it"]
    hl = ["the cat and the dog", "you and I in the morning", "a to b and b to a", "the end of the day"]
    with pysteer.load(tiny_dir / "tiny-qwen2.gguf", n_ctx=256) as m:
        res = pysteer.extract(m, h, hl, positions=2)
        d = pysteer.select_direction(m, res, h[:2], hl[:2], max_candidates=2, verbose=False)
        t = pysteer.transfer(m, d, h[:2], res=res, n_lowest=2)
        assert set(t) >= {"none", "all", f"range({d.layer}, 4, 2)", "lowest cos-sim 2", "layer 0", "layer 3"}
        with m.steer(pysteer.Ablate(d.vector), path="hook"):
            direct = pysteer.judge.refusal_scores(m, h[:2]).mean()
        assert t["all"] == pytest.approx(direct, abs=1e-9)
        assert t["none"] == pytest.approx(pysteer.judge.refusal_scores(m, h[:2]).mean(), abs=1e-9)
        pysteer.figures.transfer_figure({d.layer: t}, m.n_layers, tmp_path / "transfer.png")
        assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"
        dirs = pysteer.iterative_directions(m, h, hl, h[:2], hl[:2], max_directions=2, positions=2,
                                            min_gain=-1e9, verbose=False, max_candidates=2)
        assert len(dirs) == 2 and dirs[0].layer == d.layer and np.allclose(dirs[0].vector, d.vector)
        # r2 comes from the model with r1 ablated, so it has (almost) no component along r1
        assert abs(float(dirs[0].vector @ dirs[1].vector)) < 1e-3

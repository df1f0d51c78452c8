"""Fitted read-outs (pysteer.readout): the sample-space solve against the direct one, the writes captured on a
model, the edit written to a GGUF and read back from an optimize JSON, the search drawing their strength, bad
input."""

import json

import numpy as np
import pytest

import pysteer
from conftest import PROMPTS
from pysteer.readout import RIDGE, WriteSamples

HARMFUL = [f"how to make the bad thing number {i}" for i in range(8)]
HARMLESS = [f"write the nice code number {i}" for i in range(8)]


def direct(H, G, r, alpha, ridge=RIDGE):
    """(alpha G + H + lam I) b = (H + lam I) r in n_embd dimensions."""
    lam = ridge * np.trace(H) / len(H)
    return np.linalg.solve(alpha * G + H + lam * np.eye(len(H)), H @ r + lam * r)


def test_solve_matches_the_direct_one():
    rng = np.random.default_rng(0)
    L, E, nh, ng = 2, 40, 12, 15  # fewer samples than features, as in use
    harmful = rng.standard_normal((L, 2, nh, E)) + rng.standard_normal(E)
    harmless = rng.standard_normal((L, 2, ng, E))
    ws = WriteSamples("x", harmful, harmless)
    r = rng.standard_normal(E)
    r /= np.linalg.norm(r)
    for layer in range(L):
        for k in (0, 1):
            yh, yg = harmful[layer, k], harmless[layer, k]
            H, G = yh.T @ yh / nh, yg.T @ yg / ng
            for alpha in (0.1, 1.0, 30.0):
                want = direct(H, G, r, alpha)
                np.testing.assert_allclose(ws.read_out(layer, k, r, alpha), want, rtol=0,
                                           atol=1e-5 * np.abs(want).max())  # the samples are float32
            assert np.array_equal(ws.read_out(layer, k, r, 0.0), r)  # alpha 0: the plain edit
    # a strong alpha makes b quiet on the harmless writes while it still reads the harmful ones like r
    b = ws.read_out(0, 1, r, 100.0)
    assert np.abs(harmless[0, 1] @ b).mean() < 0.2 * np.abs(harmless[0, 1] @ r).mean()
    np.testing.assert_allclose(harmful[0, 1] @ b, harmful[0, 1] @ r, rtol=0.5, atol=0.5)


def test_bad_samples():
    z = np.zeros((2, 2, 3, 4))
    for a, b, match in ((z, z[:, :, :, :3], "must be"), (z[0], z[0], "must be"), (z, z[:, :, :0], "must be"),
                        (z, z[0], "must be"), (np.full_like(z, np.nan), z, "finite")):
        with pytest.raises(ValueError, match=match):
            WriteSamples("x", a, b)
    with pytest.raises(ValueError, match="harmful writes of layer 0 component 1 are zero"):
        WriteSamples("x", z, z + 1).read_out(0, 1, np.eye(4)[0], 1.0)
    ws = WriteSamples("x", z + 1, z)
    for args, match in (((-1, 0, 1.0), "no writes of layer -1"), ((2, 0, 1.0), "no writes of layer 2"),
                        ((0, 2, 1.0), "component 2"), ((0, 0, -1.0), "alpha must be >= 0"),
                        ((0, 0, float("nan")), "alpha must be a finite number"), ((0, 0, True), "alpha must be")):
        with pytest.raises(ValueError, match=match):
            ws.read_out(args[0], args[1], np.eye(4)[0], args[2])
    with pytest.raises(ValueError, match="ridge > 0"):
        ws.read_out(0, 0, np.eye(4)[0], 1.0, ridge=0.0)


def test_writes_captured_on_a_model(tiny_dir):
    """The writes are the captured residual differences, class by class, at the template's suffix tokens."""
    from pysteer.extraction import suffix_length

    with pysteer.load(tiny_dir / "tiny-qwen2.gguf", n_ctx=1024) as m:
        ws = WriteSamples.capture(m, HARMFUL[:3], HARMLESS[:2])
        k = suffix_length(m)
        acts = m.capture(HARMLESS[1:2], positions=k)[0]  # [point, layer, position, E]
        u = ws._u  # [L, 2, n, E]: harmless rows first, scaled by 1/sqrt(n)
        assert u.shape == (m.n_layers, 2, 5 * k, m.n_embd)
        for layer in (0, m.n_layers - 1):
            want = np.stack([acts[1, layer] - acts[0, layer], acts[2, layer] - acts[1, layer]])  # attn, ffn
            np.testing.assert_allclose(u[layer, :, k:2 * k] * np.sqrt(2 * k), want, rtol=1e-5, atol=1e-5)
        ws.check(m)
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=1024) as other:
        with pytest.raises(ValueError, match="another model"):
            ws.check(other)


def test_written_gguf_and_json(tiny_dir, tmp_path):
    """The GGUF written with read-outs gives the runtime edit's logits; the optimize JSON rebuilds the edit."""
    from pysteer.export import abliterate_blocks
    from pysteer.optimize import block_from_json

    path, out = tiny_dir / "tiny-qwen2.gguf", tmp_path / "read-out.gguf"
    rng = np.random.default_rng(5)
    with pysteer.load(path, n_ctx=1024) as m:
        L, E = m.n_layers, m.n_embd
        r = rng.standard_normal(E)
        r /= np.linalg.norm(r)
        attn, ffn = np.r_[0.0, np.full(L - 1, 1.2)], np.full(L, 0.9)
        outs = r + 0.5 * rng.standard_normal((L, 2, E)) / np.sqrt(E)
        outs[0, 0] = 0.0  # not edited: the JSON leaves it out
        block = pysteer.BlockAblate(r, attn, ffn, read_outs=outs)
        with m.steer(block):
            want = m.logits_batch(PROMPTS[:3])[:, -1]
        with m.steer(pysteer.BlockAblate(r, attn, ffn)):
            plain = m.logits_batch(PROMPTS[:3])[:, -1]
        from pysteer.optimize import Result

        obj = json.loads(json.dumps(Result(type("S", (), {"study_name": "s"})(), [], {}, "", block, 0, 0).to_json(m)))
        assert [x[:2] for x in obj["edit"]["read_outs"]] == [[i, k] for i in range(L) for k in (0, 1) if (i, k) != (0, 0)]
        again = block_from_json(obj)
        np.testing.assert_array_equal(again.read_outs, outs)
        with m.steer(again):
            assert np.array_equal(m.logits_batch(PROMPTS[:3])[:, -1], want)
        good = obj["edit"]["read_outs"]
        for bad, match in (([[0, 5, [0.0] * E]], "component must be in"), ([[0, 0]], "must list"), ("x", "must be a list"),
                           ([], "missing"), (good[1:], "missing"), ([[0, 0, [0.0] * E]] + good, "not edited"),
                           ([[-1, 0, [0.0] * E]] + good, "layer must be in"), (good + good[:1], "twice"),
                           ([[True, 0, [0.0] * E]] + good[1:], "must be an int"),
                           ([[good[0][0], good[0][1], [0.0] * (E - 1)]] + good[1:], f"must be {E} numbers"),
                           ([[good[0][0], good[0][1], 0.5]] + good[1:], f"must be {E} numbers")):
            with pytest.raises(ValueError, match=match):
                block_from_json({"edit": dict(obj["edit"], read_outs=bad)})
        with pytest.raises(ValueError, match="keeps row norms"):
            block_from_json({"edit": dict(obj["edit"], preserve_norms=True)}, m)
        abliterate_blocks(m, block, out, progress=False)
    scale = np.abs(want).max()
    assert np.abs(plain - want).max() > 1e-2 * scale  # the read-outs are another edit
    with pysteer.load(out, n_ctx=1024, hook=False) as m2:
        got = m2.logits_batch(PROMPTS[:3])[:, -1]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * scale)


def test_bad_read_outs(tiny_dir):
    from pysteer.rownorms import WriteGeometry

    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=512) as m:
        L, E = m.n_layers, m.n_embd
        r = np.ones(E) / np.sqrt(E)
        for outs, match in ((np.zeros((L, 2, E - 1)), "shape"), (np.full((L, 2, E), np.nan), "finite"),
                            (np.zeros((L, 3, E)), "shape"), (np.zeros((L, 2, E), bool), "shape")):
            with pytest.raises(ValueError, match=match):
                pysteer.BlockAblate(r, np.ones(L), np.ones(L), read_outs=outs)
        with pytest.raises(ValueError, match="without norms"):
            pysteer.BlockAblate(r, np.ones(L), np.ones(L), norms=WriteGeometry.read(m, progress=False),
                                read_outs=np.zeros((L, 2, E)))

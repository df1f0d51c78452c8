"""BlockAblate: the hook's weighted edit of each block's attention and FFN writes equals the abliteration
weight edit ``W <- W - w r r^T W`` of attn_output / ffn_down, checked against a numpy forward pass of the edited
weights; across ubatches, packed decodes, the pruned last layer and generation."""

import os
import sys

import numpy as np
import pytest

import pysteer
from conftest import PROMPTS
from reference import Weights, forward, logits_from_last_post
from pysteer.rownorms import WriteGeometry

E = 64


class EditedWeights(Weights):
    """The GGUF's weights with attn_output / ffn_down of each layer edited in float64."""

    def __init__(self, path, R, attn, ffn, *, keep_norms=False, read_outs=None):
        super().__init__(path)
        self.edit = {}
        for l, (wa, wf) in enumerate(zip(attn, ffn)):
            r = R[l] if R.ndim == 2 else R
            for k, (name, wt) in enumerate((("attn_output", wa), ("ffn_down", wf))):
                key = f"blk.{l}.{name}.weight"
                W = super().__getitem__(key)  # (n_embd, n_in)
                if keep_norms:  # heretic's "full" row normalization, computed on the matrix itself
                    n = np.linalg.norm(W, axis=1, keepdims=True)
                    Wh = W / n
                    Wh = Wh - wt * np.outer(r, r @ Wh)
                    self.edit[key] = Wh / np.linalg.norm(Wh, axis=1, keepdims=True) * n
                elif read_outs is not None:  # W <- W - w r (b^T W)
                    self.edit[key] = W - wt * np.outer(r, read_outs[l, k] @ W)
                else:
                    self.edit[key] = W - wt * np.outer(r, r @ W)

    def __getitem__(self, name):
        return self.edit[name] if name in self.edit else super().__getitem__(name)


def _setting(rng, n_layers, per_layer):
    R = rng.standard_normal((n_layers, E)) if per_layer else rng.standard_normal(E)
    R = R / np.linalg.norm(R, axis=-1, keepdims=True)
    attn = np.where(rng.random(n_layers) < 0.7, rng.uniform(0, 1.5, n_layers), 0.0)
    ffn = np.where(rng.random(n_layers) < 0.7, rng.uniform(0, 1.5, n_layers), 0.0)
    attn[-1] = ffn[-1] = 1.2  # the pruned last layer is always edited
    return R, attn, ffn


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("per_layer,edit", [(False, "plain"), (True, "plain"), (False, "norms"), (True, "norms"),
                                            (True, "read-outs")])
def test_matches_edited_weights(tiny_dir, arch, per_layer, edit):
    path = tiny_dir / f"tiny-{arch}.gguf"
    rng = np.random.default_rng(7 + per_layer)
    with pysteer.load(path, n_ctx=1024, n_ubatch=16, flash_attn=False) as m:  # several ubatches per decode
        R, attn, ffn = _setting(rng, m.n_layers, per_layer)
        # read-outs: r plus a random part, so that b differs from r in every edited write
        outs = (R[:, None, :] + 0.5 * rng.standard_normal((m.n_layers, 2, E)) / np.sqrt(E)
                if edit == "read-outs" else None)
        ref_w = EditedWeights(path, R, attn, ffn, keep_norms=edit == "norms", read_outs=outs)
        norms = WriteGeometry.read(m, progress=False) if edit == "norms" else None
        with m.steer(pysteer.BlockAblate(R, attn, ffn, norms=norms, read_outs=outs)) as s:
            assert s.paths == ["hook"]
            got = m.logits_batch(PROMPTS[:4])[:, -1].astype(np.float64)  # packed: 4 prompts per decode
            acts = m.capture(PROMPTS[:2], positions=3)  # every point, with the pruned last layer
        base = m.logits_batch(PROMPTS[:4])[:, -1].astype(np.float64)
        for i, prompt in enumerate(PROMPTS[:4]):
            tokens = m.encode(prompt)
            ref = forward(ref_w, tokens)
            want = logits_from_last_post(ref_w, ref["post"][-1][-1])
            scale = np.abs(want).max()
            np.testing.assert_allclose(got[i], want, rtol=0, atol=3e-4 * scale)
            assert np.abs(base[i] - want).max() > 100 * 3e-4 * scale  # the edit changes the logits
            if i < 2:
                for p, point in enumerate(pysteer.POINTS):
                    r = ref[point][:, -3:]
                    np.testing.assert_allclose(acts[i, p], r, rtol=0, atol=3e-4 * np.abs(r).max())


def test_generation_and_restoration(tiny_dir):
    """Token-by-token decodes (every row an output) follow the same edit; leaving the block restores the model."""
    path = tiny_dir / "tiny-qwen2.gguf"
    rng = np.random.default_rng(3)
    with pysteer.load(path, n_ctx=512) as m:
        R, attn, ffn = _setting(rng, m.n_layers, True)
        base = m.generate(PROMPTS[0], max_tokens=12)
        with m.steer(pysteer.BlockAblate(R, attn, ffn)):
            steered = m.generate(PROMPTS[0], max_tokens=12)
            batch = m.generate_batch(PROMPTS[:3], max_tokens=12)
        assert steered == batch[0] and steered != base
        assert m.generate(PROMPTS[0], max_tokens=12) == base
        # greedy steered tokens agree with the numpy forward of the edited weights, step by step
        ref_w = EditedWeights(path, R, attn, ffn)
        tokens = m.encode(PROMPTS[0])
        want = []
        for _ in range(4):
            nxt = int(np.argmax(logits_from_last_post(ref_w, forward(ref_w, tokens)["post"][-1][-1])))
            want.append(nxt)
            tokens = tokens + [nxt]
        assert steered.startswith(m.detokenize(want))


def test_zero_weights_change_nothing_and_bad_input(tiny_dir):
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=512) as m:
        L = m.n_layers
        r = np.ones(E) / 8
        base = m.logits(PROMPTS[0])
        with m.steer(pysteer.BlockAblate(r, np.zeros(L), np.zeros(L))):
            assert np.array_equal(m.logits(PROMPTS[0]), base)
        for kw, match in ((dict(attn=np.ones(L - 1), ffn=np.ones(L - 1)), "layer weights for a model"),
                          (dict(attn=-np.ones(L), ffn=np.ones(L)), ">= 0"),
                          (dict(attn=np.full(L, np.nan), ffn=np.ones(L)), "finite"),
                          (dict(attn=np.full(L, 1e30), ffn=np.ones(L)), "at most 1000"),
                          (dict(attn=np.ones(L), ffn=np.ones(L + 1)), "attn has"),
                          (dict(attn=[True] * L, ffn=np.ones(L)), "1-D array")):
            with pytest.raises(ValueError, match=match):
                with m.steer(pysteer.BlockAblate(r, **kw)):
                    pass
        with pytest.raises(ValueError, match="only intervention"):  # its rows would mix with another edit's
            with m.steer(pysteer.BlockAblate(r, np.ones(L), np.ones(L)), pysteer.Add(r, 1.0)):
                pass
        with pytest.raises(ValueError, match="directions for"):
            pysteer.BlockAblate(np.eye(E)[:3], np.ones(L), np.ones(L))
        assert np.linalg.norm(pysteer.BlockAblate(np.ones(E), np.ones(L), np.ones(L)).directions) == pytest.approx(1)
        with pytest.raises(ValueError, match="zero"):
            pysteer.BlockAblate(np.zeros(E), np.ones(L), np.ones(L))
    with pysteer.load(tiny_dir / "tiny-gemma3.gguf", n_ctx=512) as m:
        with pytest.raises(ValueError, match="gemma3 normalizes"):
            with m.steer(pysteer.BlockAblate(np.ones(m.n_embd) / np.sqrt(m.n_embd), np.ones(m.n_layers),
                                             np.ones(m.n_layers))):
                pass


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_norm_preserving_edit_written_and_read_back(tiny_dir, tmp_path, arch):
    """The written GGUF of a row-norm-preserving edit gives the runtime edit's logits, every edited matrix keeps
    its row norms, and the optimize JSON rebuilds the same edit (it needs the model to read the norms)."""
    from pysteer.export import abliterate_blocks
    from pysteer.gguf_io import matrix, read_header
    from pysteer.optimize import block_from_json

    path, out = tiny_dir / f"tiny-{arch}.gguf", tmp_path / "kept.gguf"
    rng = np.random.default_rng(11)
    with pysteer.load(path, n_ctx=1024) as m:
        R, attn, ffn = _setting(rng, m.n_layers, True)
        block = pysteer.BlockAblate(R, attn, ffn, norms=WriteGeometry.read(m, progress=False))
        with m.steer(block):
            want = m.logits_batch(PROMPTS[:4])[:, -1]
        with m.steer(pysteer.BlockAblate(R, attn, ffn)):
            plain = m.logits_batch(PROMPTS[:4])[:, -1]
        obj = {"edit": {"directions": R.tolist(), "attn": attn.tolist(), "ffn": ffn.tolist(), "preserve_norms": True}}
        with m.steer(block_from_json(obj, m)):
            assert np.array_equal(m.logits_batch(PROMPTS[:4])[:, -1], want)
        with pytest.raises(ValueError, match="give the model"):
            block_from_json(obj)
        abliterate_blocks(m, block, out, progress=False)
    scale = np.abs(want).max()
    assert np.abs(plain - want).max() > 1e-2 * scale  # keeping the norms is another edit
    with pysteer.load(out, n_ctx=1024, hook=False) as m2:
        got = m2.logits_batch(PROMPTS[:4])[:, -1]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * scale)
    h0, h1 = read_header(path), read_header(out)
    for layer in range(len(attn)):
        for comp, w in (("attn_output", attn[layer]), ("ffn_down", ffn[layer])):
            name = f"blk.{layer}.{comp}.weight"
            W0, W1 = matrix(path, h0, name), matrix(out, h1, name)
            np.testing.assert_allclose(np.linalg.norm(W1, axis=1), np.linalg.norm(W0, axis=1), rtol=1e-5)
            assert np.array_equal(W0, W1) == (w == 0)


def test_row_norms_read_in_part_and_refused_past_memory(tiny_dir, monkeypatch):
    """Some layers' row norms can be read alone (the optimize JSON reads those it edits); a layer not read is
    refused, not guessed; Gram matrices that would not fit in memory are refused before any reading."""
    from pysteer import rownorms
    from pysteer.optimize import block_from_json

    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        L, E = m.n_layers, m.n_embd
        v = np.random.default_rng(3).normal(size=E)
        v /= np.linalg.norm(v)
        full, part = WriteGeometry.read(m, progress=False), WriteGeometry.read(m, layers=[1], progress=False)
        for k in (0, 1):
            assert np.array_equal(part.write_map(1, k, v, 1.2), full.write_map(1, k, v, 1.2))
        with pytest.raises(ValueError, match="layer 0 were not read"):
            part.write_map(0, 1, v, 1.0)
        with pytest.raises(ValueError, match="layers must be in"):
            WriteGeometry.read(m, layers=[L], progress=False)
        w = np.zeros(L)
        w[1:] = 1.0
        obj = {"edit": {"directions": [v.tolist()], "attn": w.tolist(), "ffn": w.tolist(), "preserve_norms": True}}
        block = block_from_json(obj, m)
        with pytest.raises(ValueError, match="layer 0 were not read"):
            block.norms.write_map(0, 0, v, 1.0)
        with m.steer(block):
            got = m.logits_batch(PROMPTS[:2])[:, -1]
        with m.steer(pysteer.BlockAblate(v, w, w, norms=full)):
            assert np.array_equal(m.logits_batch(PROMPTS[:2])[:, -1], got)
        if sys.platform.startswith("linux"):  # read from /proc/meminfo: between 1 MiB and the machine's memory
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            assert 2**20 < rownorms.available_memory() <= total
        monkeypatch.setattr(rownorms, "available_memory", lambda: 1000)
        with pytest.raises(ValueError, match=r"needs 0\.0 GiB .* --preserve-norms no"):
            WriteGeometry.read(m, progress=False)

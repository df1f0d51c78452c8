"""Interventions: exact properties of each op, agreement with llama.cpp's control vectors and with a numpy
forward pass, restoration, composition order, and input validation."""

import ctypes
import math

import llama_cpp
import numpy as np
import pytest

import pysteer
from conftest import PROMPTS
from reference import Weights, forward

E = 64  # tiny models' n_embd


def unit(v):
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def test_ablation_removes_directions_everywhere(tiny_path, rng):
    with pysteer.load(tiny_path, n_ctx=512) as m:
        for k in (1, 3):
            R = rng.standard_normal((k, E))
            with m.steer(pysteer.Ablate(R), path="hook") as s:
                assert s.paths == ["hook"]
                acts = m.capture(PROMPTS, positions=4)  # every layer and point, after the intervention
            q = np.linalg.qr(R.T)[0].T
            rel = np.abs(acts.astype(np.float64) @ q.T) / np.linalg.norm(acts, axis=-1, keepdims=True)
            assert rel.max() < 1e-5, rel.max()


@pytest.mark.real
def test_ablation_removes_direction_real(smollm2_path, rng):
    with pysteer.load(smollm2_path, n_ctx=1024) as m:
        r = unit(rng.standard_normal(m.n_embd))
        with m.steer(pysteer.Ablate(r), path="hook"):
            acts = m.capture(["Write a haiku about rain.", "What is 2 + 2?"], positions=3)
    rel = np.abs(acts.astype(np.float64) @ r) / np.linalg.norm(acts, axis=-1)
    assert rel.max() < 1e-5, rel.max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_steered_forward_matches_numpy(tiny_dir, arch, rng):
    """Ablation at pre/mid/post of a non-consecutive layer set, then the whole steered forward pass
    compared with numpy applying the same projection at the same points."""
    path = tiny_dir / f"tiny-{arch}.gguf"
    w = Weights(path)
    r = unit(rng.standard_normal(E))
    layers = [1, 3]

    def edit(point, layer, x):
        return x - np.outer(x @ r, r) if layer in layers else x

    with pysteer.load(path, n_ctx=512, flash_attn=False) as m, m.steer(pysteer.Ablate(r, layers=layers)):
        for prompt in PROMPTS[:3]:
            tokens = m.encode(prompt)
            acts = m.capture([prompt], positions=len(tokens))[0]
            ref = forward(w, tokens, edit)
            for p, point in enumerate(pysteer.POINTS):
                np.testing.assert_allclose(acts[p], ref[point], rtol=0, atol=2e-4 * np.abs(ref[point]).max())


def test_rotation_sets_the_angle_and_keeps_the_norm(tiny_path, rng):
    b1, b2 = rng.standard_normal(E), rng.standard_normal(E)
    site = dict(layers=[2], points=["mid"])
    with pysteer.load(tiny_path, n_ctx=512) as m:
        base = m.capture(PROMPTS, positions=5, **site).astype(np.float64)
        for degrees in (0, 30, 135, 270):
            rot = pysteer.Rotate(b1, b2, degrees, **site)
            with m.steer(rot):
                got = m.capture(PROMPTS, positions=5, **site).astype(np.float64)
            x1, x2 = got @ rot.b1, got @ rot.b2
            err = np.angle(np.exp(1j * (np.arctan2(x2, x1) - math.radians(degrees))))
            assert np.abs(err).max() < 1e-3
            np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(base, axis=-1), rtol=1e-5)
            P = np.outer(rot.b1, rot.b1) + np.outer(rot.b2, rot.b2)
            np.testing.assert_allclose(got - got @ P, base - base @ P, atol=1e-5 * np.abs(base).max())
            np.testing.assert_allclose(np.hypot(x1, x2), np.linalg.norm(base @ P, axis=-1), rtol=1e-5)


def test_rotation_on_all_layers(tiny_path, rng):
    rot = pysteer.Rotate(rng.standard_normal(E), rng.standard_normal(E), 60)
    with pysteer.load(tiny_path, n_ctx=512) as m, m.steer(rot):
        acts = m.capture(PROMPTS, positions=3).astype(np.float64)
    ang = np.degrees(np.arctan2(acts @ rot.b2, acts @ rot.b1))
    assert np.abs(ang - 60).max() < math.degrees(1e-3)


def test_adaptive_rotation_leaves_negative_tokens_untouched(tiny_path, rng):
    b1, b2 = rng.standard_normal(E), rng.standard_normal(E)
    site = dict(layers=[1], points=["post"])
    with pysteer.load(tiny_path, n_ctx=512) as m:
        tokens = min(len(m.encode(p)) for p in PROMPTS)
        base = m.capture(PROMPTS, positions=tokens, **site)
        rot = pysteer.Rotate(b1, b2, 200, adaptive=True, **site)
        with m.steer(rot):
            got = m.capture(PROMPTS, positions=tokens, **site)
    neg = (base.astype(np.float64) @ rot.b1) <= 0
    assert 0.1 < neg.mean() < 0.9  # both kinds of token are present
    assert np.array_equal(got[neg], base[neg])
    assert not np.isclose(got[~neg], base[~neg]).all(axis=-1).any()
    ang = np.degrees(np.arctan2(got[~neg] @ rot.b2, got[~neg] @ rot.b1)) % 360
    assert np.abs(ang - 200).max() < math.degrees(1e-3)


def _llama_cpp_cvec_logits(path, v, layers, prompt):
    """Reference: llama.cpp's own control vector on a context with no pysteer hook."""
    with pysteer.load(path, n_ctx=512, hook=False) as plain:
        data = np.zeros((plain.n_layers - 1, plain.n_embd), np.float32)
        for i in layers:
            data[i - 1] = v
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert llama_cpp.llama_set_adapter_cvec(plain.llama_context, ptr, data.size, plain.n_embd, 1, plain.n_layers - 1) == 0
        return plain.logits(prompt)


def test_add_through_hook_equals_llama_cpp_control_vector(tiny_path, rng):
    """Bit-identical logits. (The vector must be the same float32 values on both sides: one ulp of
    difference in alpha * v is amplified by quantized matmuls on real models.)"""
    v = rng.standard_normal(E).astype(np.float32)
    layers = [1, 3]
    want = _llama_cpp_cvec_logits(tiny_path, 2 * v, layers, PROMPTS[1])
    with pysteer.load(tiny_path, n_ctx=512) as m:
        with m.steer(pysteer.Add(v, 2.0, layers=layers), path="hook") as s:
            assert s.paths == ["hook"]
            hook = m.logits(PROMPTS[1])
        with m.steer(pysteer.Add(v, 2.0, layers=layers)) as s:
            assert s.paths == ["cvec"]
            native = m.logits(PROMPTS[1])
        with m.steer(pysteer.Add(2 * v, layers=layers), path="hook"):
            scaled = m.logits(PROMPTS[1])
    assert np.array_equal(hook, want)
    assert np.array_equal(native, want)
    assert np.array_equal(scaled, want)  # Add(v, 2) == Add(2v)


@pytest.mark.real
def test_add_equals_control_vector_real(smollm2_path, rng):
    v = (0.8 * rng.standard_normal(576)).astype(np.float32)
    layers = list(range(4, 30, 3))
    want = _llama_cpp_cvec_logits(smollm2_path, v, layers, "Write a haiku about rain.")
    with pysteer.load(smollm2_path, n_ctx=512) as m, m.steer(pysteer.Add(v, layers=layers), path="hook"):
        assert np.array_equal(m.logits("Write a haiku about rain."), want)


def test_per_layer_add_and_zero_add(tiny_path, rng):
    V = rng.standard_normal((4, E))
    with pysteer.load(tiny_path, n_ctx=512) as m:
        base = m.logits(PROMPTS[0])
        with m.steer(pysteer.Add(V, 0.0), path="hook"):
            assert np.array_equal(m.logits(PROMPTS[0]), base)
        with m.steer(pysteer.Add(V, layers=[2], points=["mid"])):
            a = m.capture([PROMPTS[0]], layers=[2], points=["mid"])
        b = m.capture([PROMPTS[0]], layers=[2], points=["mid"])
    np.testing.assert_allclose(a - b, np.broadcast_to(V[2], a.shape), atol=1e-5)


def test_removing_interventions_restores_bit_identical_logits(tiny_path, rng):
    v = rng.standard_normal(E)
    with pysteer.load(tiny_path, n_ctx=512) as m:
        base = [m.logits(p) for p in PROMPTS]
        base_acts = m.capture(PROMPTS, positions=2)
        with m.steer(pysteer.Ablate(v), pysteer.Add(v, 3.0, layers=[1, 2]),
                     pysteer.Rotate(v, rng.standard_normal(E), 45, layers=[0])):
            steered = m.logits(PROMPTS[0])
        assert not np.array_equal(steered, base[0])
        assert all(np.array_equal(m.logits(p), b) for p, b in zip(PROMPTS, base))
        assert np.array_equal(m.capture(PROMPTS, positions=2), base_acts)
        assert m.steering.interventions == ()


def test_composition_follows_the_given_order(tiny_dir, rng):
    r = unit(rng.standard_normal(E))
    site = dict(layers=[2], points=["post"])
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=512) as m:
        with m.steer(pysteer.Ablate(r, **site), pysteer.Add(r, 2.0, **site)) as s:
            assert s.paths == ["hook", "hook"]  # the Add follows a hook edit of l_out-2
            a = m.capture(PROMPTS, **site)
        with m.steer(pysteer.Add(r, 2.0, **site), pysteer.Ablate(r, **site)) as s:
            assert s.paths == ["cvec", "hook"]
            b = m.capture(PROMPTS, **site)
    np.testing.assert_allclose(a.astype(np.float64) @ r, 2.0, atol=1e-5)
    assert np.abs(b.astype(np.float64) @ r).max() < 1e-5


def test_steering_switches_between_generations(tiny_dir, rng):
    path = tiny_dir / "tiny-qwen2.gguf"
    with pysteer.load(path, n_ctx=512) as m:
        plain = m.generate("hello", max_tokens=12)
        with m.steer(pysteer.Add(rng.standard_normal(E), 8.0)):
            pushed = m.generate("hello", max_tokens=12)
            logits = m.logits("hello")
        assert m.generate("hello", max_tokens=12) == plain
    assert pushed != plain
    with pysteer.load(path, n_ctx=512, hook=False) as ref:
        assert not np.array_equal(logits, ref.logits("hello"))


@pytest.mark.parametrize("make, match", [
    (lambda: pysteer.Ablate(np.zeros(E)), "is zero"),
    (lambda: pysteer.Ablate(np.full(E, np.nan)), "non-finite"),
    (lambda: pysteer.Ablate(np.ones((2, E))), "linearly dependent"),
    (lambda: pysteer.Ablate(np.ones((E, 2, 2))), "must be"),
    (lambda: pysteer.Add(np.ones(E), alpha=np.inf), "alpha must be a finite number"),
    (lambda: pysteer.Rotate(np.ones(E), 2 * np.ones(E), 10), "parallel"),
    (lambda: pysteer.Rotate(np.zeros(E), np.ones(E), 10), "b1 is zero"),
    (lambda: pysteer.Rotate(np.ones(E), np.ones(E + 1), 10), "differ in size"),
    (lambda: pysteer.Rotate(np.ones(E), np.arange(E), np.nan), "degrees must be a finite number"),
    (lambda: pysteer.Ablate(np.ones(E), points=["top"]), "unknown point"),
])
def test_bad_intervention_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_steering_requests(tiny_dir, rng):
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        good = pysteer.Add(rng.standard_normal(E), layers=[1])
        with m.steer(good):
            before = m.logits("hi")
            with pytest.raises(ValueError, match="n_embd=64"):
                with m.steer(pysteer.Ablate(np.ones(E + 1))):
                    pass
            with pytest.raises(ValueError, match=r"layer\(s\) \[9\] out of range"):
                with m.steer(pysteer.Ablate(np.ones(E), layers=[1, 9])):
                    pass
            with pytest.raises(ValueError, match="no exact native path"):
                with m.steer(pysteer.Ablate(np.ones(E), layers=[1, 2]), path="native"):
                    pass
            with pytest.raises(ValueError, match="no control vector for layer 0"):
                with m.steer(pysteer.Add(np.ones(E), layers=[0]), path="native"):
                    pass
            with pytest.raises(ValueError, match="path must be one of"):
                with m.steer(good, path="fast"):
                    pass
            with pytest.raises(TypeError, match="expected pysteer.Ablate"):
                with m.steer(np.ones(E)):
                    pass
            with pytest.raises(ValueError, match=r"per-layer Add vector has 3 rows"):
                with m.steer(pysteer.Add(np.ones((3, E)))):
                    pass
            assert np.array_equal(m.logits("hi"), before)  # a refused request changed nothing
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256, hook=False) as plain:
        with pytest.raises(ValueError, match="hook=False"):
            with plain.steer(pysteer.Ablate(np.ones(E))):
                pass
        with plain.steer(pysteer.Add(np.ones(E), layers=[2])) as s:  # native only: fine without a hook
            assert s.paths == ["cvec"]


def _hook_and_lora(path, R, prompts):
    """Logits with R ablated through the hook and through the LoRA path, and activations under the LoRA.
    Flash attention off: its batch-dependent rounding is not what is compared (on SmolLM2 it took the largest
    difference from 3.3% to 5.0% of the logit scale)."""
    with pysteer.load(path, n_ctx=512, flash_attn=False) as m:
        with m.steer(pysteer.Ablate(R), path="hook"):
            want = m.logits_batch(prompts)
        with m.steer(pysteer.Ablate(R)) as s:
            assert s.paths == ["lora"]
            got = m.logits_batch(prompts)
            acts = m.capture(prompts, positions=2)
        with m.steer(pysteer.Ablate(R), path="native") as s:
            assert s.paths == ["lora"]
    return want, got, acts.astype(np.float64)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_lora_ablation_matches_hook(tiny_dir, arch, rng, tmp_path, monkeypatch):
    """The LoRA path (weights in the matmuls, embedding in the hook) against the hook on every point.
    F32 weights: the two agree to float rounding (seen: 4.7e-5 of the logit scale on llama)."""
    monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path))
    R = rng.standard_normal((2, E))
    want, got, acts = _hook_and_lora(tiny_dir / f"tiny-{arch}.gguf", R, PROMPTS)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
    q = np.linalg.qr(R.T)[0].T
    assert (np.abs(acts @ q.T) / np.linalg.norm(acts, axis=-1, keepdims=True)).max() < 1e-5
    assert len(list((tmp_path / "lora").glob("*.gguf"))) == 1  # generated once, cached


def test_each_direction_gets_its_own_cached_adapter(tiny_dir, rng, tmp_path, monkeypatch):
    """The cache key holds the directions: a second direction, in a new process (model) as in the same one,
    ablates itself and not the first's cached adapter."""
    monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path))
    for R in (rng.standard_normal(E), rng.standard_normal(E)):
        want, got, _ = _hook_and_lora(tiny_dir / "tiny-llama.gguf", R, PROMPTS)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())
    assert len(list((tmp_path / "lora").glob("*.gguf"))) == 2


@pytest.mark.real
def test_lora_ablation_matches_hook_real(smollm2_path):
    """On Q4_1/Q8_0 weights llama.cpp quantizes activations before each matmul, the LoRA's rank-1 correction
    does not: over 6 random directions, max |Δlogit| was 2.4-3.6% of the logit scale and the residual
    |h·r|/|h| 0.8-1.1e-3; where the top two logits are close the greedy token can differ."""
    r = unit(np.random.default_rng(0).standard_normal(576))
    want, got, acts = _hook_and_lora(smollm2_path, r, ["Write a haiku about rain.", "What is 2 + 2?", "Name a river."])
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    top3 = np.argsort(-got, axis=-1)[..., :3]
    assert (top3 == want.argmax(-1)[..., None]).any(-1).all()
    assert (np.abs(acts @ r) / np.linalg.norm(acts, axis=-1)).max() < 5e-3


def test_lora_is_chosen_only_where_exact(tiny_dir, rng):
    r = rng.standard_normal(E)
    with pysteer.load(tiny_dir / "tiny-gemma3.gguf", n_ctx=256) as m:
        with m.steer(pysteer.Ablate(r)) as s:
            assert s.paths == ["hook"]
        with pytest.raises(ValueError, match="gemma3 adds normalized block outputs"):
            with m.steer(pysteer.Ablate(r), path="native"):
                pass
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        with m.steer(pysteer.Ablate(r, layers=range(1, 4))) as s:
            assert s.paths == ["hook"]
        with m.steer(pysteer.Ablate(r, points=["post"])) as s:
            assert s.paths == ["hook"]
        with m.steer(pysteer.Ablate(r), pysteer.Add(r, layers=[2])) as s:
            assert s.paths == ["hook", "hook"]


def test_a_per_layer_add_does_not_depend_on_the_order_of_its_layers(tiny_dir, rng):
    """post of layer l is pre of l + 1: that tensor takes the lower layer's row, whatever order the layers
    are given in (the first naming won, so [3, 2, 1] put row 2 where [1, 2, 3] put row 1)."""
    V = rng.standard_normal((4, E))
    with pysteer.load(tiny_dir / "tiny-qwen2.gguf", n_ctx=256, flash_attn=False) as m:
        specs = ([1, 2, 3], [3, 2, 1], "3:0:-1")
        ops = [{op.name: op.dirs[0] for op in pysteer.Add(V, layers=spec, points=("pre", "post")).bind(m)}
               for spec in specs]
        for spec, got in zip(specs, ops):
            assert set(got) == {"l_out-0", "l_out-1", "l_out-2", "l_out-3"}, spec
            for name, row in {"l_out-0": 1, "l_out-1": 1, "l_out-2": 2, "l_out-3": 3}.items():
                np.testing.assert_array_equal(got[name], V[row].astype(np.float32))
        logits = []
        for spec in specs:
            with m.steer(pysteer.Add(V, layers=spec, points=("pre", "post")), path="hook"):
                logits.append(m.logits_batch(PROMPTS[:2])[:, -1])
        assert np.array_equal(logits[0], logits[1]) and np.array_equal(logits[0], logits[2])


def test_an_unwritable_adapter_cache_falls_back_to_the_hook(tiny_dir, rng, tmp_path, monkeypatch):
    """The LoRA path needs its adapter written under PYSTEER_CACHE: where that cannot be, "auto" takes the
    exact hook and "native" says what to set (it raised NotADirectoryError from inside steer())."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path / "file"))
    r = rng.standard_normal(E)
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256, flash_attn=False) as m:
        with m.steer(pysteer.Ablate(r)) as s:
            assert s.paths == ["hook"]
            got = m.logits_batch(PROMPTS[:2])[:, -1]
        with m.steer(pysteer.Ablate(r), path="hook"):
            assert np.array_equal(got, m.logits_batch(PROMPTS[:2])[:, -1])
        with pytest.raises(ValueError, match="cannot be written under .*: set PYSTEER_CACHE to a writable folder"):
            with m.steer(pysteer.Ablate(r), path="native"):
                pass
        (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # exists() is False: a walk up found a folder
        monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path / "dangling"))
        with m.steer(pysteer.Ablate(r)) as s:
            assert s.paths == ["hook"]
        import errno

        from pysteer import lora

        def read_only(**kw):  # a folder that exists but cannot be written (root's os.access says it can)
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path / "ro"))
        with monkeypatch.context() as mp:
            mp.setattr(lora.tempfile, "TemporaryFile", read_only)
            with m.steer(pysteer.Ablate(r)) as s:
                assert s.paths == ["hook"]
        monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path / "new" / "cache"))  # not there yet: made on use
        with m.steer(pysteer.Ablate(r)) as s:
            assert s.paths == ["lora"]
    assert len(list((tmp_path / "new" / "cache" / "lora").glob("*.gguf"))) == 1

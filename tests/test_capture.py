"""Capture is exact and changes nothing: checked against llama.cpp's own logits and a numpy forward pass."""

import numpy as np
import pytest

import pysteer
from conftest import PROMPTS
from reference import Weights, forward, logits_from_last_post


def _all_logits(m, prompts):
    return np.stack([m.logits(p) for p in prompts])


def test_capture_changes_no_logit(tiny_path):
    """Logits while capturing every layer and point == logits of a context with no callback at all,
    for the same batches (one prompt per decode, and all prompts in one decode)."""
    with pysteer.load(tiny_path, n_ctx=512, hook=False) as plain:
        want_alone = _all_logits(plain, PROMPTS)
        want_batch = plain.logits_batch(PROMPTS, positions=2)
    with pysteer.load(tiny_path, n_ctx=512) as m:
        acts, got = m.capture(PROMPTS, points=pysteer.POINTS, positions=2, return_logits=True)
        assert np.array_equal(got, want_batch)
        for i, p in enumerate(PROMPTS):
            _, alone = m.capture([p], points=pysteer.POINTS, return_logits=True)
            assert np.array_equal(alone[0, -1], want_alone[i])
        assert np.array_equal(_all_logits(m, PROMPTS), want_alone)  # hook installed, nothing watched
    assert np.isfinite(acts).all()


@pytest.mark.real
def test_capture_changes_no_logit_real(smollm2_path):
    prompts = ["Write a haiku about rain.", "What is 2 + 2?", "Name three rivers in Europe."]
    with pysteer.load(smollm2_path, n_ctx=1024, hook=False) as plain:
        want = plain.logits_batch(prompts, positions=3)
    with pysteer.load(smollm2_path, n_ctx=1024) as m:
        _, got = m.capture(prompts, return_logits=True, positions=3)
    assert np.array_equal(got, want)


def test_post_of_last_layer_reproduces_logits(tiny_path):
    """Final RMSNorm and output matrix applied in numpy to captured `post` give llama.cpp's logits."""
    w = Weights(tiny_path)
    with pysteer.load(tiny_path, n_ctx=512) as m:
        acts, logits = m.capture(PROMPTS, layers=[m.n_layers - 1], points=["post"], positions=3,
                                 return_logits=True)
    ref = logits_from_last_post(w, acts[:, 0, 0])  # [N, positions, n_vocab]
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-6 * np.abs(ref).max())  # seen: 1.2e-7


@pytest.mark.real
def test_post_of_last_layer_reproduces_logits_real(smollm2_path):
    """SmolLM2's head is the tied Q8_0 embedding; the reference reproduces llama.cpp's Q8_0 rounding of the
    activation (seen: max |Δ| 1.2e-5 at a logit scale of 34)."""
    w = Weights(smollm2_path)
    with pysteer.load(smollm2_path, n_ctx=1024) as m:
        acts, logits = m.capture(["Write a haiku about rain.", "What is 2 + 2?"], layers=[m.n_layers - 1],
                                 points=["post"], positions=2, return_logits=True)
    ref = logits_from_last_post(w, acts[:, 0, 0])
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert (logits.argmax(-1) == ref.argmax(-1)).all()


FA_TOL = 5e-3  # flash attention (F16 inside llama.cpp's CPU kernel), of the activation scale


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("flash_attn, tol", [(False, 2e-4), (True, FA_TOL)])
def test_every_point_matches_numpy_forward(tiny_dir, arch, flash_attn, tol):
    """pre/mid/post of every layer at every position equal a float64 numpy forward pass of the GGUF
    (seen: within 8.3e-5 of the activation scale; with llama.cpp's flash attention, which rounds to F16
    inside, 8.8e-4)."""
    path = tiny_dir / f"tiny-{arch}.gguf"
    w = Weights(path)
    with pysteer.load(path, n_ctx=512, flash_attn=flash_attn) as m:
        for prompt in PROMPTS:
            tokens = m.encode(prompt)
            acts = m.capture([prompt], positions=len(tokens))[0]  # [P, L, T, E]
            ref = forward(w, tokens)
            for p, point in enumerate(pysteer.POINTS):
                np.testing.assert_allclose(acts[p], ref[point], rtol=0, atol=tol * np.abs(ref[point]).max(),
                                           err_msg=f"{arch} {point}")


def test_pre_is_previous_post(tiny_path):
    with pysteer.load(tiny_path, n_ctx=512) as m:
        acts = m.capture(PROMPTS, positions=3)
    assert np.array_equal(acts[:, 0, 1:], acts[:, 2, :-1])
    assert not np.array_equal(acts[:, 0], acts[:, 1])  # mid differs from pre: attention did something


def test_pre_of_layer_0_is_the_embedding(tiny_path):
    w = Weights(tiny_path)
    with pysteer.load(tiny_path, n_ctx=512) as m:
        tokens = m.encode(PROMPTS[1])
        acts = m.capture([PROMPTS[1]], layers=[0], points=["pre"], positions=len(tokens))[0, 0, 0]
    emb = w["token_embd.weight"][tokens]
    if w.arch == "gemma3":
        emb = emb * np.sqrt(w.meta("embedding_length"))
    np.testing.assert_allclose(acts, emb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_ubatch", [512, 16, 7])
def test_batch_invariance(tiny_path, n_ubatch):
    """All prompts in one decode (spanning several ubatches when n_ubatch is small) == one at a time.

    Not bit for bit: with llama.cpp's default F16 KV cache, a prompt's last token moves by up to ~2.5e-5 of
    the activation scale depending on the batch around it (seen on qwen2; with an F32 cache ~2e-7), so the
    bound is 1e-4 of the scale. A row mapped to the wrong prompt or position would be off by O(1). Flash
    attention off: its CPU kernel adds a batch dependence of up to 8e-4 (test_flash_attention_batch_dependence).
    """
    with pysteer.load(tiny_path, n_ctx=512, n_ubatch=n_ubatch, flash_attn=False) as m:
        together, lt = m.capture(PROMPTS, positions=3, return_logits=True)
        alone = [m.capture([p], positions=3, return_logits=True) for p in PROMPTS]
    scale = np.abs(together).max()
    for i, (a, la) in enumerate(alone):
        np.testing.assert_allclose(a[0], together[i], rtol=0, atol=1e-4 * scale, err_msg=f"prompt {i}")
        np.testing.assert_allclose(la[0], lt[i], rtol=0, atol=1e-4 * np.abs(lt).max())
    with pysteer.load(tiny_path, n_ctx=512, n_ubatch=512, flash_attn=False) as ref:
        np.testing.assert_allclose(ref.capture(PROMPTS, positions=3), together, rtol=0, atol=1e-4 * scale)


def test_flash_attention_batch_dependence(tiny_path):
    """llama.cpp's default flash attention (pysteer's default too): prompts packed together vs one at a time
    differ by rounding only (seen: up to 8.0e-4 of the scale, qwen2; none with 16-token ubatches); a row mapped
    to the wrong prompt would be off by O(1)."""
    with pysteer.load(tiny_path, n_ctx=512) as m:
        together = m.capture(PROMPTS, positions=3)
        alone = np.concatenate([m.capture([p], positions=3) for p in PROMPTS])
    np.testing.assert_allclose(alone, together, rtol=0, atol=FA_TOL * np.abs(together).max())


def test_many_prompts_split_over_decodes(tiny_dir):
    """More prompts than n_seq_max and than fit in n_ctx: packed into several decodes, order kept."""
    prompts = [f"the {w} and {i}" for i, w in enumerate(["a", "how", "to", "you", "make"] * 6)]
    path = tiny_dir / "tiny-qwen2.gguf"
    with pysteer.load(path, n_ctx=96, n_seq_max=4, n_ubatch=32, flash_attn=False) as m:
        small = m.capture(prompts, layers=[0, 3], points=["mid", "post"], positions=2)
    with pysteer.load(path, n_ctx=96, n_batch=8, n_ubatch=32, flash_attn=False) as m:  # each prompt alone
        alone = m.capture(prompts, layers=[0, 3], points=["mid", "post"], positions=2)
    with pysteer.load(path, n_ctx=2048, n_seq_max=64, flash_attn=False) as m:
        big = m.capture(prompts, layers=[0, 3], points=["mid", "post"], positions=2)
    assert small.shape == (30, 2, 2, 2, 64)
    np.testing.assert_allclose(small, big, rtol=0, atol=1e-4 * np.abs(big).max())
    np.testing.assert_allclose(alone, big, rtol=0, atol=1e-4 * np.abs(big).max())


def test_layer_and_point_selection(tiny_path):
    with pysteer.load(tiny_path, n_ctx=512) as m:
        full = m.capture(PROMPTS, positions=2)
        part = m.capture(PROMPTS, layers=[3, 1], points=("post", "pre"), positions=2)
    assert part.shape == (len(PROMPTS), 2, 2, 2, 64)
    assert np.array_equal(part[:, 0, 0], full[:, 2, 3])
    assert np.array_equal(part[:, 1, 1], full[:, 0, 1])


def test_chat_template_and_raw_text(tiny_path):
    with pysteer.load(tiny_path, n_ctx=512) as m:
        text = m.apply_chat_template("hi there")
        assert text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
        assert m.encode("hi there")[:2] == [3, m.tokenize("user", add_special=False)[0]]
        raw = m.encode("hi there", chat_template=False)
        assert raw[0] == 1 and 3 not in raw  # BOS, no control tokens
        a = m.capture(["hi there"], chat_template=False)
        b = m.capture(["hi there"])
    assert not np.array_equal(a, b)


def test_load_from_llama_instance(tiny_dir):
    import llama_cpp

    path = tiny_dir / "tiny-llama.gguf"
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
    with pysteer.load(llm, n_ctx=512) as m:
        a = m.capture(PROMPTS, positions=2)
    with pysteer.load(path, n_ctx=512) as m:
        b = m.capture(PROMPTS, positions=2)
    assert np.array_equal(a, b)
    assert llm.tokenize(b"hello") == llm.tokenize(b"hello")  # the Llama still works after pysteer closed
    llm.close()


@pytest.mark.real
@pytest.mark.parametrize("name, template", [("smollm2-135m-instruct", True), ("gemma-3-270m", False)])
def test_real_model_layout(name, template):
    """On real quantized files (llama with tied head; gemma3 with sandwich norms, inp_scaled / sa_out):
    capturing changes no logit, and pre of layer i is post of layer i-1."""
    path = pysteer.models.fetch(name, progress=False)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    with pysteer.load(path, n_ctx=512, hook=False) as plain:
        want = plain.logits_batch(prompts, positions=2, chat_template=template)
    with pysteer.load(path, n_ctx=512) as m:
        acts, got = m.capture(prompts, positions=2, chat_template=template, return_logits=True)
        assert acts.shape == (2, 3, m.n_layers, 2, m.n_embd)
    assert np.array_equal(got, want)
    assert np.array_equal(acts[:, 0, 1:], acts[:, 2, :-1])
    assert np.isfinite(acts).all()


def test_shared_prefix_bounds():
    from pysteer.batching import shared_prefix

    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]], 1) == 3
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]], 2) == 2  # the last 2 tokens of each stay out
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 4]], [1, 3]) == 1
    assert shared_prefix([[1, 2], [3, 4]], 1) == 0
    assert shared_prefix([[1, 2, 3]], 1) == 0  # a lone prompt is decoded whole


def test_shared_prefix_is_decoded_once(tiny_path):
    """Chat-templated prompts share their opening: its rows go through the model once per decode, not once
    per prompt (counted by the hook on an edited tensor), and the results match prompts decoded alone
    (test_batch_invariance)."""
    from pysteer.batching import shared_prefix

    with pysteer.load(tiny_path, n_ctx=512) as m:
        toks = [m.encode(p) for p in PROMPTS]
        c = shared_prefix(toks, 3)
        assert c >= 2
        r = np.zeros(m.n_embd, np.float32)
        r[0] = 1
        with m.steer(pysteer.Ablate(r, layers=[1], points=["pre"]), path="hook"):
            before = m.hook_stats["edited_rows"]
            m.capture(PROMPTS, positions=3)
            assert m.hook_stats["edited_rows"] - before == c + sum(len(t) - c for t in toks)


def test_capture_stops_after_its_last_tensor(tiny_path):
    """Without logits, a capture computes nothing past its last tensor: an edit on a later layer never runs
    (counted by the hook), the activations are those of a full decode, and the KV cells left uncomputed are not
    reused by the next decode, which shares the prompts' prefix."""
    with pysteer.load(tiny_path, n_ctx=512) as m:
        want = m.logits_batch(PROMPTS)
        r = np.zeros(m.n_embd, np.float32)
        r[0] = 1
        for point, layer, edited in (("post", 0, False), ("pre", 2, False), ("mid", 2, True)):
            m.logits_batch(["an unrelated text"], chat_template=False)  # the cache holds no prefix now
            with m.steer(pysteer.Ablate(r, layers=[2], points=["mid"]), path="hook"):
                before = m.hook_stats["edited_rows"]
                early = m.capture(PROMPTS, layers=[layer], points=[point])  # decodes the shared prefix itself
                assert (m.hook_stats["edited_rows"] > before) == edited, (point, layer)
                full, _ = m.capture(PROMPTS, layers=[layer], points=[point], return_logits=True)
            assert np.array_equal(early, full)
            m.capture(PROMPTS, layers=[0], points=["post"])
            assert np.array_equal(m.logits_batch(PROMPTS), want)
        for points, layers in (([], [0]), (["post"], [])):
            with pytest.raises(ValueError, match="at least one point and one layer"):
                with m.watch(points, layers, m.n_embd, stop=True):
                    pass


def test_capture_tokens_checks_lengths(tiny_path):
    """Token lists go in whole: each must hold the positions read and fit the context."""
    from pysteer.capture import capture_tokens

    with pysteer.load(tiny_path, n_ctx=256) as m:
        toks = m.encode(PROMPTS[0])
        got = capture_tokens(m, [toks], layers=[1], points=["post"], positions=2)
        assert np.array_equal(got, m.capture([PROMPTS[0]], layers=[1], points=["post"], positions=2))
        for bad in (toks[:1], toks * 200):
            with pytest.raises(ValueError, match=f"sequence 1 has {len(bad)} tokens; capture takes 2"):
                capture_tokens(m, [toks, bad], layers=[1], points=["post"], positions=2)


def test_shared_prefix_and_packs_fit_a_small_cache(tiny_dir):
    """n_batch == n_ctx: a pack of suffixes plus the shared prefix must still fit the KV cache."""
    prompts = [f"the {w} and {i} make it" + " so" * (i % 5) for i, w in enumerate(["a", "how", "to", "you"] * 16)]
    path = tiny_dir / "tiny-qwen2.gguf"
    with pysteer.load(path, n_ctx=256, n_batch=256, flash_attn=False) as m:  # llama.cpp pads n_ctx to 256
        small = m.capture(prompts, layers=[1], points=["post"], positions=2)
    with pysteer.load(path, n_ctx=2048, flash_attn=False) as m:
        big = m.capture(prompts, layers=[1], points=["post"], positions=2)
    np.testing.assert_allclose(small, big, rtol=0, atol=1e-4 * np.abs(big).max())

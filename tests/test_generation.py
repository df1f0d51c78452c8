"""Generation: greedy decoding follows llama.cpp's logits, batching and streaming agree with single runs,
stop strings and sampling seeds behave, bad arguments are refused."""

import codecs

import numpy as np
import pytest

import pysteer
from conftest import PROMPTS


@pytest.fixture(scope="module")
def model(tiny_dir):
    with pysteer.load(tiny_dir / "tiny-qwen2.gguf", n_ctx=1024) as m:
        yield m


def _greedy_tokens(m, prompt, n):
    """Reference: argmax of llama.cpp's next-token logits, re-decoding the growing prompt each step."""
    tokens = m.encode(prompt)
    out = []
    for _ in range(n):
        m.decode([tokens], np.array([len(tokens) - 1]))
        tok = int(np.argmax(m.logits_row(len(tokens) - 1)))
        out.append(tok)
        tokens = tokens + [tok]
    return out


def test_greedy_follows_llama_cpp_logits(model):
    ref = _greedy_tokens(model, "hello world", 8)
    text = model.generate("hello world", max_tokens=8)
    assert text == b"".join(model.token_bytes(t) for t in ref).decode("utf-8", "replace")


def test_batch_and_stream_agree_with_single(model):
    prompts = [p for p in PROMPTS if isinstance(p, str)]
    single = [model.generate(p, max_tokens=16) for p in prompts]
    assert model.generate_batch(prompts, max_tokens=16) == single
    assert "".join(model.generate(prompts[1], max_tokens=16, stream=True)) == single[1]


def test_batch_generation_returns_first_token_logits(model):
    texts, first = model.generate_batch(PROMPTS, max_tokens=4, return_logits=True)
    ref = model.logits_batch(PROMPTS)[:, -1]
    assert first.shape == ref.shape and texts == model.generate_batch(PROMPTS, max_tokens=4)
    np.testing.assert_allclose(first, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_until_ends_each_answer_at_its_first_prefix_that_holds(model):
    prompts = [p for p in PROMPTS if isinstance(p, str)]
    full = model.generate_batch(prompts, max_tokens=16)
    n = 6
    got = model.generate_batch(prompts, max_tokens=16, until=lambda t: len(t) >= n)
    for p, f, g in zip(prompts, full, got):
        # the shortest token prefix whose text reaches n characters (or the whole answer)
        toks = _greedy_tokens(model, p, 16)
        dec, texts = codecs.getincrementaldecoder("utf-8")(errors="replace"), [""]
        for t in toks:  # the text so far as generation holds it: a partial UTF-8 character waits for its rest
            texts.append(texts[-1] + dec.decode(model.token_bytes(t)))
        assert g == next((t for t in texts if len(t) >= n), f)
    assert any(len(g) < len(f) for f, g in zip(full, got))
    # with a stop string, until sees only text the stop cannot take back: the answer is a prefix of the stopped one
    whole = full[1]
    i = next(i for i in range(3, len(whole) - 2) if whole[i:i + 2].isascii() and whole[i:i + 2].isprintable())
    stopped = model.generate_batch([prompts[1]], max_tokens=16, stop=[whole[i:i + 2]])[0]
    for k in range(1, i + 2):
        cut = model.generate_batch([prompts[1]], max_tokens=16, stop=[whole[i:i + 2]], until=lambda t: len(t) >= k)[0]
        assert stopped.startswith(cut), (k, cut, stopped)
    # a stop string longer than the text so far: none of that text is final yet
    for n in range(3, min(len(whole), 12)):
        cut = model.generate_batch([prompts[1]], max_tokens=16, stop=[whole[:n]], until=lambda t: len(t) >= 1)[0]
        assert cut == "", (n, cut)
    with pytest.raises(ValueError, match="until must be a function"):
        model.generate_batch(prompts, max_tokens=4, until="sorry")


def test_batch_generation_over_several_decodes(tiny_dir):
    prompts = [f"the {w} {i}" for i, w in enumerate(["a", "how", "to", "you"] * 3)]
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=128, n_seq_max=3) as m:
        got = m.generate_batch(prompts, max_tokens=10)
        assert got == [m.generate(p, max_tokens=10) for p in prompts]


def test_stop_strings(model):
    full = model.generate("hello world", max_tokens=24)
    i = next(i for i in range(3, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[i:i + 2]
    cut = model.generate("hello world", max_tokens=24, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert "".join(model.generate("hello world", max_tokens=24, stop=[stop], stream=True)) == cut


def test_sampling_is_seeded(model):
    a = model.generate("hello", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate("hello", max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    c = model.generate("hello", max_tokens=16, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c
    assert model.generate_batch(["hello"], max_tokens=16, temperature=1.0, top_p=0.9, seed=7) == [a]


def test_top_p_keeps_the_nucleus():
    from pysteer.generation import sample

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {sample(logits, 1.0, 0.7, rng) for _ in range(300)}
    assert draws == {0, 1}
    assert sample(logits, 0.0, 0.1, rng) == 0
    # a tiny positive temperature is greedy in the limit (z / T overflowed to inf - inf = NaN probabilities)
    wide = np.array([30.0, 31.0, -5.0, 31.0 - 1e-9])
    for t in (1e-309, 1e-300, 1e-12):
        assert {sample(wide, t, 1.0, rng) for _ in range(20)} == {1}


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens must be a positive int"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"max_tokens": 5000}, "exceed n_ctx=1024"),
])
def test_bad_generation_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate("hello", **kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate_batch(["hello"], **kwargs)


@pytest.mark.real
def test_real_model_answers(smollm2_path):
    with pysteer.load(smollm2_path, n_ctx=1024) as m:
        text = m.generate("What is 2 + 2? Answer with a number.", max_tokens=24)
        assert "4" in text
        msgs = [{"role": "user", "content": "What is 2 + 2? Answer with a number."}]
        assert m.generate(msgs, max_tokens=24) == text


def test_stream_outliving_its_steering_is_refused(model):
    """A stream started inside steer() and read after the block ended would be half steered: it raises instead."""
    v = np.random.default_rng(5).standard_normal(model.n_embd) * 4
    with model.steer(pysteer.Add(v, 1.0)):
        it = model.generate("hello there", max_tokens=20, stream=True)
        first = next(it)
    with pytest.raises(ValueError, match="steering changed while this stream was live"):
        "".join(it)
    with model.steer(pysteer.Add(v, 1.0)):  # read wholly inside its block, the same stream is whole
        whole = "".join(model.generate("hello there", max_tokens=20, stream=True))
    assert whole.startswith(first)


def test_detokenize_is_llama_cpp_pythons_on_short_pieces(tiny_dir):
    """Every piece of the tiny vocabulary (none over 32 bytes), alone and after BOS: the same text as
    llama-cpp-python's detokenize, whose leading-space rule after BOS is kept."""
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256, hook=False) as m:
        bos = m.tokenize("", add_special=True)
        for t in range(m.n_vocab):
            for ids in ([t], bos + [t]):
                assert m.detokenize(ids) == m._model.detokenize(ids).decode("utf-8", errors="replace"), ids


@pytest.mark.real
def test_detokenize_keeps_pieces_over_32_bytes():
    """Qwen's vocabulary has pieces of 80 bytes ("=" * 80): llama-cpp-python's detokenize returns them empty."""
    text = "Title\n" + "=" * 80 + "\nSure: caf\u00e9 \u4f60\u597d"
    with pysteer.load("qwen2.5-coder-0.5b-instruct", n_ctx=256, hook=False) as m:
        ids = m.tokenize(text, add_special=False)
        assert max(len(m.token_bytes(t)) for t in ids) > 32
        assert m.detokenize(ids) == text


def test_until_may_read_the_vocabulary_but_not_decode(model):
    """A decode inside ``until`` overwrote the KV cache and logits the generation still read: the answer came
    out as another prompt's, with no error."""
    prompts = [p for p in PROMPTS if isinstance(p, str)][:2]
    want = model.generate_batch(prompts, max_tokens=8)
    for use in (lambda: model.logits_batch(["another prompt"]), lambda: model.steer().__enter__()):
        with pytest.raises(ValueError, match="until may not decode or steer on the Model that calls it"):
            model.generate_batch(prompts, max_tokens=8, until=lambda t: use() and False)
    with model.steer(pysteer.Add(np.ones(model.n_embd), layers=[1]), path="hook"):
        steered = model.generate_batch(prompts, max_tokens=8)
    block = model.steer(pysteer.Add(np.ones(model.n_embd), layers=[1]), path="hook")
    block.__enter__()
    ended = []
    with pytest.raises(ValueError, match="until changed the steering of the Model that calls it"):
        model.generate_batch(prompts, max_tokens=8,
                             until=lambda t: not ended and (ended.append(block.__exit__(None, None, None)) or False))
    assert ended and model.steering.interventions == () and steered != want
    counted = []
    got = model.generate_batch(prompts, max_tokens=8, until=lambda t: counted.append(len(model.tokenize(t))) and False)
    assert got == want
    assert counted and model.generate_batch(prompts, max_tokens=8) == want  # the model is usable after the errors

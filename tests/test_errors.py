"""Bad input gives a clear Python exception and leaves the interpreter (and the model) usable."""

import json

import gguf
import numpy as np
import pytest

import pysteer
from pysteer import _core, native, tiny
from gguf_edit import rewrite


@pytest.fixture(scope="module")
def model(tiny_dir):
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        yield m


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a registry name"):
        pysteer.load(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(pysteer.ModelLoadError, match="not a file"):
        pysteer.load(tmp_path)


def test_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(pysteer.ModelLoadError, match="not a GGUF file"):
        pysteer.load(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(pysteer.ModelLoadError, match="not a GGUF file"):
        pysteer.load(p)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.001])
def test_truncated_gguf(tiny_dir, tmp_path, keep):
    data = (tiny_dir / "tiny-llama.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(pysteer.ModelLoadError, match="truncated|not a readable GGUF"):
        pysteer.load(p)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(p, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(pysteer.UnsupportedArchitectureError, match="'mamba'.*supported: gemma3, llama, qwen2, qwen3"):
        pysteer.load(p)


def test_gguf_llama_cpp_rejects(tiny_dir, tmp_path):
    """A well-formed GGUF that misses a required tensor: llama.cpp's own load error becomes ModelLoadError."""
    p = rewrite(tiny_dir / "tiny-llama.gguf", tmp_path / "missing.gguf", drop={"blk.1.ffn_down.weight"})
    with pytest.raises(pysteer.ModelLoadError, match="llama.cpp could not load"):
        pysteer.load(p)


def test_unknown_registry_name():
    with pytest.raises(FileNotFoundError, match="qwen2.5-coder-1.5b-instruct"):
        pysteer.load("no-such-model")
    with pytest.raises(ValueError, match="unknown model"):
        pysteer.models.fetch("no-such-model")


def test_bad_model_argument():
    with pytest.raises(TypeError, match="path, a registry name or a llama_cpp.Llama"):
        pysteer.load(42)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layers": [4]}, r"layer\(s\) \[4\] out of range: the model has layers 0..3"),
        ({"layers": [-1]}, "out of range"),
        ({"layers": []}, "layers is empty"),
        ({"layers": [1, 1]}, "repeat"),
        ({"points": ["pre", "resid"]}, "unknown point"),
        ({"points": []}, "points is empty"),
        ({"positions": 0}, "positions must be a positive int"),
        ({"positions": 500}, "fewer than positions=500"),
    ],
)
def test_bad_capture_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.capture(["hello"], **kwargs)


def test_layer_specs_mean_the_same_everywhere(model):
    """A string is a layer spec ("12" is layer 12, not layers 1 and 2), in capture as in interventions."""
    from pysteer.hookpoints import check_layers

    assert check_layers("3", 4) == (3,) and check_layers("1:3", 4) == (1, 2) and check_layers("all", 4) == (0, 1, 2, 3)
    assert check_layers("::2", 4) == (0, 2) and check_layers("-1:", 4) == (3,) and check_layers("0,2", 4) == (0, 2)
    assert check_layers(None, 4, first=1) == (1, 2, 3) and check_layers(np.int64(2), 4) == (2,)
    a = model.capture(["hello world"], layers="3", points=["post"])
    b = model.capture(["hello world"], layers=[3], points=["post"])
    assert a.shape == b.shape == (1, 1, 1, 1, model.n_embd) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="out of range"):
        model.capture(["hello world"], layers="12")
    with pytest.raises(ValueError, match="out of range"):
        with model.steer(pysteer.Add(np.ones(model.n_embd), layers="13")):
            pass
    with pytest.raises(ValueError, match="layers must be ints"):
        pysteer.Add(np.ones(model.n_embd), layers=[1.7])


def test_empty_prompt_list(model):
    with pytest.raises(ValueError, match="prompts is empty"):
        model.capture([])


def test_single_string_instead_of_list(model):
    with pytest.raises(ValueError, match="wrap a single prompt in a list"):
        model.capture("hello")


def test_prompt_longer_than_context(model):
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens, longer than the context \(n_ctx=256\)"):
        model.capture(["short", "the " * 300])
    with pytest.raises(ValueError, match="longer than the context"):
        model.logits("the " * 300)


def test_no_chat_template(tmp_path):
    p = tiny.write(tmp_path / "t.gguf", tiny.TinySpec())
    with pysteer.load(p, n_ctx=128) as m:
        m.metadata.pop("tokenizer.chat_template")
        with pytest.raises(ValueError, match="no chat template; pass chat_template=False"):
            m.capture(["hi"])
        assert m.capture(["hi"], chat_template=False).shape == (1, 3, 4, 1, 64)


def test_hook_error_is_raised_after_decode(model):
    """An error inside the callback (here: a plan that disagrees with the context's ubatch size) is recorded
    in C++, aborts the decode, and is raised in Python; the next capture works."""
    good = model.capture(["hello world"], positions=2)
    n_ubatch = model.n_ubatch
    model.n_ubatch = 3
    try:
        with pytest.raises(pysteer.HookError, match="ubatch 0 has .* rows, expected 3"):
            model.capture(["hello world"], positions=2)
    finally:
        model.n_ubatch = n_ubatch
    assert np.array_equal(model.capture(["hello world"], positions=2), good)


def test_capture_needs_hook(tiny_dir):
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=128, hook=False) as m:
        with pytest.raises(ValueError, match="hook=False"):
            m.capture(["hi"])


def test_bad_context_sizes(tiny_dir):
    with pytest.raises(ValueError, match=r"n_ctx must be in \[1, 16777216\], not 0"):
        pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=0)
    with pytest.raises(ValueError, match="n_seq_max must be at most 256"):
        pysteer.load(tiny_dir / "tiny-llama.gguf", n_seq_max=1000)


def _core_hook(n_embd=8):
    """A hook on no context: its calls go straight through to the extension (tests of the C++ boundary)."""
    return native.Hook(n_embd)


def test_core_rejects_bad_plans():
    hook = _core_hook()
    out = np.zeros(10, np.float32)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    with pytest.raises(ValueError, match="increasing and inside the batch"):
        hook.start(4, 512, i64(3, 1), i64(), i64(), out)
    with pytest.raises(ValueError, match="outside the buffer"):
        hook.start(4, 512, i64(3), i64(3), i64(5), out)
    with pytest.raises(ValueError, match="missing ggml function"):
        _core.Hook({}, 8)


def test_core_checks_capture_slots_against_the_buffer():
    """Slot offsets come from set_capture, and every write they imply must fit the caller's buffer."""
    hook = _core_hook()
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    with pytest.raises(ValueError, match="non-negative multiples of n_embd"):
        hook.watch(["l_out-0"], [[-8]], "embd")
    with pytest.raises(ValueError, match="non-negative multiples of n_embd"):
        hook.watch(["l_out-0"], [[3]], "embd")
    hook.watch(["l_out-0"], [[0, 1 << 40]], "embd")  # a huge slot: no buffer can hold it
    with pytest.raises(ValueError, match="outside the buffer"):
        hook.start(4, 512, i64(3), i64(3), i64(0), np.zeros(64, np.float32))
    hook.watch(["l_out-0"], [[0, 8]], "embd")
    hook.start(4, 512, i64(3), i64(3), i64(0), np.zeros(16, np.float32))  # fits exactly
    assert hook.finish() == ""
    with pytest.raises(ValueError, match="outside the buffer"):
        hook.start(4, 512, i64(3), i64(3), i64(1), np.zeros(16, np.float32))


def test_core_rejects_bad_ops():
    hook = _core_hook()
    ok = np.ones((1, 8), np.float32)

    def op(name, kind, dirs=ok, slot=-1):
        return (name, kind, dirs, 1.0, 0.0, False, slot)

    with pytest.raises(ValueError, match="unknown op kind"):
        hook.set_ops([op("l_out-0", 7)])
    with pytest.raises(ValueError, match="shape"):
        hook.set_ops([op("l_out-0", native.ABLATE, np.ones((9, 8), np.float32))])
    with pytest.raises(ValueError, match="finite"):
        hook.set_ops([op("l_out-0", native.ADD, np.full((1, 8), np.inf, np.float32))])
    with pytest.raises(ValueError, match="rotate 2"):
        hook.set_ops([op("l_out-0", native.ROTATE)])
    # save / ablate_delta: one vector (ablate_delta 1 or 3), a slot, a save before the read, a row marker
    with pytest.raises(ValueError, match="save takes 1 vector, ablate_delta 1 or 3"):
        hook.set_ops([op("embd", native.SAVE, np.ones((3, 8), np.float32), 0)])
    with pytest.raises(ValueError, match="save takes 1 vector, ablate_delta 1 or 3"):
        hook.set_ops([op("embd", native.SAVE, ok, 0), op("ffn_inp-0", native.ABLATE_DELTA, np.ones((2, 8), np.float32), 0)],
                     "embd")
    hook.set_ops([op("embd", native.SAVE, ok, 0), op("ffn_inp-0", native.ABLATE_DELTA, np.ones((3, 8), np.float32), 0)],
                 "embd")
    with pytest.raises(ValueError, match="slot >= 0"):
        hook.set_ops([op("embd", native.SAVE, ok, -1)])
    with pytest.raises(ValueError, match="no earlier save"):
        hook.set_ops([op("ffn_inp-0", native.ABLATE_DELTA, ok, 0), op("embd", native.SAVE, ok, 0)], "embd")
    with pytest.raises(ValueError, match="row marker"):
        hook.set_ops([op("embd", native.SAVE, ok, 0), op("ffn_inp-0", native.ABLATE_DELTA, ok, 0)])
    hook.set_ops([op("embd", native.SAVE, ok, 0), op("ffn_inp-0", native.ABLATE_DELTA, ok, 0)], "embd")
    assert hook.stats["ops"] == 2
    hook.set_ops([op("l_out-0", native.ADD), op("l_out-1", native.ABLATE)])
    assert hook.stats["ops"] == 2
    hook.set_ops([])
    assert hook.stats["ops"] == 0


def test_core_writes_only_into_the_callers_array():
    """A capture buffer that is not C-contiguous float32 is refused, not silently copied."""
    hook = _core_hook()
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    with pytest.raises(TypeError):
        hook.start(4, 512, i64(3), i64(3), i64(0), np.zeros(128, np.float64))
    with pytest.raises(TypeError):
        hook.start(4, 512, i64(3), i64(3), i64(0), np.zeros((128, 2), np.float32)[:, 0])


def test_build_mismatch_is_detected(monkeypatch):
    native.check_build()  # the real build passes
    monkeypatch.setattr(native, "LLAMA_CPP_COMMIT", "deadbee")
    with pytest.raises(pysteer.BuildMismatchError, match="libggml reports commit '0c1e570.*expected deadbee"):
        native.check_build()
    monkeypatch.setenv("PYSTEER_ALLOW_MISMATCH", "1")
    native.check_build()


def test_a_bare_string_is_never_split_into_character_prompts(model):
    """Every entry point that takes prompt lists refuses a str (and a chat) instead of iterating it."""
    h, hl = ["make the thing", "make it now", "the thing"], ["the cat", "the dog", "a day"]
    calls = [lambda: pysteer.extract(model, "how to make a bomb", hl, positions=1, layers=[1]),
             lambda: pysteer.extract(model, h, "how to bake bread", positions=1, layers=[1]),
             lambda: pysteer.judge.refusal_scores(model, "how to make a bomb"),
             lambda: pysteer.judge.judge(model, "abc", ["x", "y", "z"], perplexity=False),
             lambda: pysteer.judge.damage(model, "ab", ["x", "y"], []),
             lambda: model.capture([{"role": "user", "content": "a chat is one prompt"}])]
    for call in calls:
        with pytest.raises(ValueError, match="wrap a single prompt in a list"):
            call()
    res = pysteer.extract(model, h, hl, positions=1, points=("post",))
    d = pysteer.select_direction(model, res, h[:2], hl[:2], max_candidates=1, verbose=False)
    with pytest.raises(ValueError, match="val_harmful must be a list of prompts"):
        pysteer.select_direction(model, res, "make it", hl[:2], verbose=False)
    with pytest.raises(ValueError, match="val_harmful must be a list of prompts"):
        pysteer.transfer(model, d, "make it", res=res)
    with pytest.raises(ValueError, match=r"points \['mid'\] were not extracted \(this result has \['post'\]\)"):
        pysteer.select_direction(model, res, h[:2], hl[:2], points=("mid",), verbose=False)


def test_a_vocab_only_llama_is_refused(tiny_dir):
    """It has no weights: llama.cpp aborted the process (GGML_ASSERT) at the first decode."""
    import llama_cpp

    llm = llama_cpp.Llama(str(tiny_dir / "tiny-llama.gguf"), vocab_only=True, verbose=False)
    for hook in (True, False):
        with pytest.raises(pysteer.ModelLoadError, match="no weights"):
            pysteer.load(llm, n_ctx=64, hook=hook)
    llm.close()


def test_a_plain_control_vector_loads_as_the_direction_of_its_first_layer(model, tmp_path):
    """Without pysteer's keys the layer was -1: transfer() then failed with "layer(s) [-1] out of range"."""
    from pysteer.gguf_io import write_control_vector

    rng = np.random.default_rng(0)
    vs = {il: rng.standard_normal(model.n_embd).astype(np.float32) for il in (2, 3)}
    d = pysteer.load_direction(write_control_vector(tmp_path / "cv.gguf", vs, model_hint="llama"), model)
    assert d.layer == 2 and np.allclose(d.vector, vs[2] / np.linalg.norm(vs[2]), atol=1e-6)
    assert set(pysteer.transfer(model, d, ["make it", "the thing"])) >= {"all", "range(2, 4, 2)", "layer 2"}


def test_prompt_lists_may_be_any_iterable(model):
    """Generators are read once: iterative_directions passed its spent validation generator on (no prompts)."""
    h, hl = ["make the thing", "make it now", "the thing"], ["the cat", "the dog", "a day"]
    dirs = pysteer.iterative_directions(model, iter(h), iter(hl), iter(h[:2]), iter(hl[:2]), max_directions=2,
                                        positions=1, min_gain=-1e9, verbose=False, max_candidates=1)
    want = pysteer.iterative_directions(model, h, hl, h[:2], hl[:2], max_directions=2, positions=1, min_gain=-1e9,
                                        verbose=False, max_candidates=1)
    assert len(dirs) == 2 and all(np.array_equal(a.vector, b.vector) for a, b in zip(dirs, want))


def test_prompt_files_end_lines_only_at_newlines(tmp_path):
    """str.splitlines also split at U+2028, U+0085 and form feeds: one prompt became two, and a JSONL line holding
    one raw (json.dumps(..., ensure_ascii=False) writes them so) was refused as "not JSON"."""
    from pysteer import datasets

    (tmp_path / "p.txt").write_text("write a poem\u2028about cats\r\nsecond\x0cprompt\n", encoding="utf-8")
    assert datasets.load_file(tmp_path / "p.txt") == ["write a poem\u2028about cats", "second\x0cprompt"]
    rows = [{"prompt": "line\u2028sep"}, {"prompt": "nel\x85x"}, {"prompt": "ps\u2029x"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                      encoding="utf-8")
    assert datasets.load_file(tmp_path / "p.jsonl") == [r["prompt"] for r in rows]


def test_prompt_files_drop_a_byte_order_mark(tmp_path):
    """The BOM was kept: a .txt file's first-line comment became a prompt, a .csv column '\\ufeffprompt', and a
    .jsonl file was refused."""
    from pysteer import datasets

    for name, text in (("p.txt", "# my prompts\nhow to x\n"), ("p.jsonl", '{"prompt": "how to x"}\n'),
                       ("p.csv", "prompt,label\nhow to x,1\n")):
        (tmp_path / name).write_bytes(("\ufeff" + text).encode())
        assert datasets.load_file(tmp_path / name) == ["how to x"], name
    assert datasets.load_file(tmp_path / "p.csv", column="prompt") == ["how to x"]


def test_csv_prompt_files_with_blank_lines_and_extra_fields(tmp_path):
    """A leading blank line (and a row with more fields than the header) raised AttributeError: 'NoneType' object
    has no attribute 'lower'. Blank lines are skipped; a row with an unquoted comma is refused by line."""
    from pysteer import datasets

    (tmp_path / "a.csv").write_text("\n  \nid,prompt\n1,how to x\n\n2,how to y\n")
    assert datasets.load_file(tmp_path / "a.csv") == ["how to x", "how to y"]
    (tmp_path / "b.csv").write_text("prompt\nhow to x\nhow to y, then z\n")
    with pytest.raises(ValueError, match=r"b\.csv:3: 2 fields, but the header has 1; quote"):
        datasets.load_file(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("prompt,label\nhow to x,0\nhow to y,0,\n")  # a trailing empty field: no cut
    assert datasets.load_file(tmp_path / "c.csv") == ["how to x", "how to y"]


def test_cache_root_expands_home_and_is_absolute(tmp_path, monkeypatch):
    """PYSTEER_CACHE='~/pcache' (quoted in a Dockerfile or unit file) made a folder named ~ in the working
    directory; a relative one moved with a later chdir."""
    from pysteer._pypi import cache_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PYSTEER_CACHE", "~/pcache")
    assert cache_root() == tmp_path / "home" / "pcache"
    monkeypatch.setenv("PYSTEER_CACHE", "rel")
    first = cache_root()
    monkeypatch.chdir(tmp_path)  # a later chdir does not move it
    assert first.is_absolute() and first.name == "rel" and cache_root() == first


def test_probe_fit_is_used_when_the_cache_cannot_be_written(tiny_dir, tmp_path, monkeypatch):
    """With PYSTEER_CACHE a file, the probe was fitted (minutes with the shipped rows) and then the judge died
    writing the cache. Now a warning says so (before the fit), and the fit is used; also when the write fails."""
    from pysteer import probe_judge
    from pysteer.llm_judge import Judge

    (tmp_path / "notes.txt").write_text("precious")
    monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path / "notes.txt"))
    rows = [{"prompt": f"request {i}", "answer": a, "refusal": r} for i, (a, r) in enumerate(
        [("I can't help with that.", True), ("Sorry, I won't.", True), ("Sure: step one, open it.", False),
         ("Here it is: 42.", False)])]
    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=8192) as m:
        with pytest.warns(UserWarning, match="cannot be cached under .*notes.txt.*set PYSTEER_CACHE"):
            pj = probe_judge.ProbeJudge(Judge(m), layer=1, train=rows)
        p = pj.probabilities([r["prompt"] for r in rows], [r["answer"] for r in rows])
        assert len(p) == 4 and all(0 <= x <= 1 for x in p)
        assert (tmp_path / "notes.txt").read_text() == "precious"

        def full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(probe_judge.np, "savez", full)
        with pytest.warns(UserWarning, match="cannot be cached .*No space left on device"):
            again = probe_judge.ProbeJudge(Judge(m), layer=1, train=rows)
        assert again.probabilities([r["prompt"] for r in rows], [r["answer"] for r in rows]) == pytest.approx(p)
        assert not list((tmp_path / "cache" / "probes").iterdir())  # no temporary file left


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_figures_are_written_in_the_format_their_suffix_names(tmp_path, suffix, magic):
    """`metrics -o m.svg` wrote PNG bytes under .svg: the format was always png."""
    from pysteer import figures

    rows = [{"value": 0.0, "refused": 1, "coherent": 2, "n": 2}, {"value": 1.0, "refused": 0, "coherent": 2, "n": 2}]
    assert figures.sweep_figure(rows, "alpha", tmp_path / f"s{suffix}").read_bytes()[:len(magic)] == magic


def test_a_figure_suffix_matplotlib_cannot_write_is_refused(tmp_path):
    from pysteer import figures

    with pytest.raises(ValueError, match=r"cannot write \.txt figures; name a \.png file"):
        figures.sweep_figure([{"value": 0.0, "refused": 1, "coherent": 2, "n": 2}], "alpha", tmp_path / "s.txt")
    assert not list(tmp_path.iterdir())

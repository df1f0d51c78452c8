"""Reliability: misuse, interrupts, threads and damaged inputs never crash the process, corrupt a result or leave
a Model stuck. Each test names the item of the reliability issue it covers; cases that used to crash run in a
subprocess, so a segfault fails the test instead of killing pytest."""

import os
import pathlib
import signal
import struct
import subprocess
import sys
import textwrap
import time

import llama_cpp
import numpy as np
import pytest

import pysteer
from pysteer import export, lora
from conftest import PROMPTS
from gguf_edit import rewrite

ROOT = pathlib.Path(__file__).parent.parent


def run_py(code: str, *args, timeout=120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a crash is a return code, not a dead test session)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pysteer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(r, match):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr


def patch_kv(src: pathlib.Path, dst: pathlib.Path, key: str, value: bytes) -> pathlib.Path:
    """Copy of a GGUF with the scalar value of ``key`` overwritten by ``value`` (same size)."""
    data = bytearray(src.read_bytes())
    k = key.encode()
    i = data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k) + 4  # key, then its u32 type, then the value
    data[i:i + len(value)] = value
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture()
def llama_path(tiny_dir):
    return tiny_dir / "tiny-llama.gguf"


# -- 1. a Model after close() ---------------------------------------------------------------------------------

def test_use_after_close_is_an_error_not_a_crash(llama_path):
    r = run_py("""
        import sys, numpy as np, pysteer
        m = pysteer.load(sys.argv[1], n_ctx=256)
        v = np.ones(m.n_embd)
        with m.steer(pysteer.Add(v, layers=[1])):
            m.close()
        calls = [lambda: m.steer(pysteer.Add(v, layers=[1])).__enter__(), lambda: m.logits("hi"),
                 lambda: m.capture(["hi"]), lambda: m.generate("hi", max_tokens=2), lambda: m.tokenize("hi"),
                 lambda: m.generate_batch(["hi"], max_tokens=2), lambda: m.encode("hi"),
                 lambda: list(m.generate("hi", stream=True))]
        for call in calls:
            try:
                call()
            except ValueError as e:
                assert "is closed" in str(e), e
            else:
                raise SystemExit("no error")
        m.close()  # twice is fine
        print("ok", repr(m))
    """, llama_path)
    assert r.returncode == 0 and "ok" in r.stdout and "closed>" in r.stdout, r.stderr


# -- 2. context sizes that do not fit ------------------------------------------------------------------------

def test_context_size_is_bounded(llama_path):
    for bad in (2**32 + 64, 2**30, 0, -1):
        with pytest.raises(ValueError, match="n_ctx must be in"):
            pysteer.load(llama_path, n_ctx=bad)
    for bad in (True, 512.0, "512"):
        with pytest.raises(ValueError, match="n_ctx must be an int"):
            pysteer.load(llama_path, n_ctx=bad)
    assert_one_line_error(cli("generate", "hi", "--model", llama_path, "--n-ctx", 4294967360), "n_ctx must be in")
    assert_one_line_error(cli("generate", "hi", "--model", llama_path, "--n-ctx", 2**30), "n_ctx must be in")


# -- 3. one Model, several threads -----------------------------------------------------------------------------

def test_threads_are_serialised(llama_path):
    """Two generation loops and a thread entering and leaving steer() on one Model, plus a second Model: every
    answer is the unsteered or the steered one (a steering change waits for a generation to end)."""
    r = run_py("""
        import sys, threading, numpy as np, pysteer
        m = pysteer.load(sys.argv[1], n_ctx=512)
        other = pysteer.load(sys.argv[1], n_ctx=512)
        v = np.random.default_rng(0).standard_normal(m.n_embd) * 4
        p = "how to make the thing"
        base = m.generate(p, max_tokens=12)
        with m.steer(pysteer.Add(v, layers=[1, 2])):
            steered = m.generate(p, max_tokens=12)
        assert base != steered
        bad, errors = [], []

        def gen(model, n):
            try:
                for _ in range(n):
                    out = model.generate(p, max_tokens=12)
                    if out not in (base, steered):
                        bad.append(out)
                    out = model.generate_batch([p, p], max_tokens=12)
                    if any(o not in (base, steered) for o in out):
                        bad.append(out)
            except Exception as e:
                errors.append(repr(e))

        def toggle(n):
            try:
                for _ in range(n):
                    with m.steer(pysteer.Add(v, layers=[1, 2])):
                        m.capture(["hello"], layers=[1])
            except Exception as e:
                errors.append(repr(e))

        ts = [threading.Thread(target=gen, args=(m, 15)), threading.Thread(target=gen, args=(m, 15)),
              threading.Thread(target=toggle, args=(40,)), threading.Thread(target=gen, args=(other, 15))]
        for t in ts: t.start()
        for t in ts: t.join()
        assert not errors, errors
        assert not bad, bad
        assert m.generate(p, max_tokens=12) == base and not m.steering.interventions
        print("ok")
    """, llama_path, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_close_from_another_thread_waits_for_the_call(llama_path):
    r = run_py("""
        import sys, threading, time, pysteer
        m = pysteer.load(sys.argv[1], n_ctx=512)
        out, errors = {}, []

        def work():
            try:
                out["texts"] = m.generate_batch(["hello world", "write the code", "abc"], max_tokens=30)
            except ValueError as e:  # closed before it began
                errors.append(str(e))

        t = threading.Thread(target=work)
        t.start()
        time.sleep(0.01)
        m.close()
        t.join()
        assert m.closed and (len(out.get("texts", [])) == 3 or "closed" in errors[0]), (out, errors)
        print("ok")
    """, llama_path)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-2000:])


# -- 4. layer counts llama.cpp asserts on ---------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 513, 0xFFFFFFFF])
def test_layer_count_out_of_range_is_a_load_error(llama_path, tmp_path, count):
    bad = patch_kv(llama_path, tmp_path / "bad.gguf", "llama.block_count", struct.pack("<I", count))
    r = run_py("""
        import sys, pysteer
        try:
            pysteer.load(sys.argv[1])
        except pysteer.ModelLoadError as e:
            print("load error:", e)
    """, bad)
    assert r.returncode == 0 and "block_count" in r.stdout, (r.returncode, r.stderr[-2000:])


# -- 5. a Llama closed under a Model --------------------------------------------------------------------------

def test_closing_the_llama_closes_the_model(llama_path):
    r = run_py("""
        import sys, llama_cpp, pysteer
        llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, verbose=False)
        m = pysteer.load(llm, n_ctx=256)
        m.logits("hi")
        llm.close()
        try:
            m.logits("hi")
        except ValueError as e:
            print("error:", e)
        try:
            pysteer.load(llm)
        except ValueError as e:
            print("error:", e)
    """, llama_path)
    assert r.returncode == 0 and r.stdout.count("error:") == 2, (r.returncode, r.stderr[-2000:])
    assert "is closed" in r.stdout and "Llama is closed" in r.stdout


def test_the_gc_frees_a_model_before_the_weights_it_shares(llama_path):
    """A Llama and a Model over it that die together in a reference cycle (or at interpreter exit): the GC may
    finalize the Llama first. The Model's context and LoRA adapter must still go before the weights (freed
    after them it was a double free: exit status 134 or 139)."""
    r = run_py("""
        import gc, sys, llama_cpp, numpy as np, pysteer
        def make():
            llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, n_threads=1, verbose=False)
            m = pysteer.load(llm, n_ctx=128, n_threads=1)
            with m.steer(pysteer.Ablate(np.random.default_rng(1).standard_normal(m.n_embd)), path="native") as s:
                assert s.paths == ["lora"], s.paths
                m.logits("hi")
            holder = {"llm": llm, "model": m}
            holder["self"] = holder
        for _ in range(3):
            make()
            gc.collect()
        print("collected")
        llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, n_threads=1, verbose=False)
        m = pysteer.load(llm, n_ctx=128, n_threads=1)
        with m.steer(pysteer.Ablate(np.ones(m.n_embd)), path="native"):
            m.logits("hi")
        def module_level():  # __main__'s globals now form a cycle: freed by the GC at exit
            pass
    """, llama_path)
    assert r.returncode == 0 and "collected" in r.stdout, (r.returncode, r.stderr[-2000:])


# -- 7. an interrupted decode leaves the model usable ------------------------------------------------------------

def test_interrupt_during_decode_leaves_the_model_usable(llama_path, monkeypatch):
    with pysteer.load(llama_path, n_ctx=512) as m:
        want_acts = m.capture(PROMPTS[:3], positions=1)
        want_text = m.generate_batch(PROMPTS[:3], max_tokens=6)
        real, calls = llama_cpp.llama_decode, {"n": 0}

        def interrupted(ctx, batch):  # a Ctrl-C delivered as the C call returns
            rc = real(ctx, batch)
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return rc

        monkeypatch.setattr(llama_cpp, "llama_decode", interrupted)
        for call in (lambda: m.capture(PROMPTS * 4, positions=1), lambda: m.generate_batch(PROMPTS, max_tokens=6),
                     lambda: m.generate(PROMPTS[0], max_tokens=6)):
            calls["n"] = 0
            with pytest.raises(KeyboardInterrupt):
                call()
        monkeypatch.setattr(llama_cpp, "llama_decode", real)
        assert np.array_equal(m.capture(PROMPTS[:3], positions=1), want_acts)
        assert m.generate_batch(PROMPTS[:3], max_tokens=6) == want_text
        assert m.generate(PROMPTS[0], max_tokens=6) == want_text[0]


def test_ctrl_c_during_extraction(llama_path):
    """A real SIGINT in the middle of an extraction: KeyboardInterrupt, then the model works as before."""
    r = run_py("""
        import os, signal, sys, threading, numpy as np, pysteer
        m = pysteer.load(sys.argv[1], n_ctx=1024)
        h = [f"how to make the thing number {i} " * 3 for i in range(400)]
        want = m.capture(h[:4], positions=2)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            pysteer.extract(m, h, h[::-1], positions=2, chunk_size=8)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
        assert np.array_equal(m.capture(h[:4], positions=2), want)
        m.generate("hi", max_tokens=4); m.generate_batch(["hi", "yo"], max_tokens=4)
        print("ok")
    """, llama_path, timeout=300)
    assert r.returncode == 0 and "interrupted\nok" in r.stdout, r.stderr[-3000:]


def test_hook_error_in_capture_does_not_stick(llama_path):
    with pysteer.load(llama_path, n_ctx=256) as m:
        want = m.generate_batch(["hello world"], max_tokens=5)
        n_ubatch, m.n_ubatch = m.n_ubatch, 3  # the plan now disagrees with the context: the hook records it
        with pytest.raises(pysteer.HookError):
            m.capture(["hello world"], positions=2)
        m.n_ubatch = n_ubatch
        assert m.generate_batch(["hello world"], max_tokens=5) == want
        assert m.generate("hello world", max_tokens=5) == want[0]


# -- 8. steer() is transactional; damaged adapters are rebuilt -------------------------------------------------

def test_interrupted_steering_restores_the_previous_one(tiny_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path))
    r = np.random.default_rng(0).standard_normal(64)
    with pysteer.load(tiny_dir / "tiny-qwen2.gguf", n_ctx=256) as m:
        base = m.logits_batch(PROMPTS)
        add = pysteer.Add(r, 2.0, layers=[2])
        with m.steer(add):
            added = m.logits_batch(PROMPTS)

            def interrupt(*a, **k):
                raise KeyboardInterrupt

            monkeypatch.setattr(lora, "adapter_path", interrupt)
            with pytest.raises(KeyboardInterrupt):
                with m.steer(pysteer.Ablate(r)):
                    pass
            monkeypatch.undo()
            monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path))
            assert m.steering.interventions == (add,)
            assert np.array_equal(m.logits_batch(PROMPTS), added)
        assert m.steering.interventions == ()
        assert np.array_equal(m.logits_batch(PROMPTS), base)


def _interrupt_in(func: str, when):
    """Raise KeyboardInterrupt at the first line of runtime.Model.``func`` that runs with ``when()`` true: a
    Ctrl-C arriving right after the state ``when`` looks at was set."""
    def local(frame, event, arg):
        if event == "line" and when():
            sys.settrace(None)
            raise KeyboardInterrupt(f"in {func}, line {frame.f_lineno}")
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_name == func and frame.f_code.co_filename.endswith("runtime.py") else None
    sys.settrace(calls)


def _interrupt_at(func: str, text: str):
    """Raise KeyboardInterrupt at the first line of runtime.Model.``func`` whose source holds ``text``."""
    import linecache

    def local(frame, event, arg):
        if event == "line" and text in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
            sys.settrace(None)
            raise KeyboardInterrupt(text)
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_name == func and frame.f_code.co_filename.endswith("runtime.py") else None
    sys.settrace(calls)


@pytest.mark.parametrize("func, text", [("steer", "if entry in self._steer_stack"),
                                        ("streaming", "if _alive(self._stream) is token")])
def test_a_release_a_ctrl_c_skipped_dies_with_its_block(tiny_dir, func, text):
    """A Ctrl-C on the first statement of the release itself: the steer() block's steering stayed on for good (every
    later answer steered), or the stream's claim refused every later call. The claim dies with its generator."""
    import gc

    with pysteer.load(tiny_dir / "tiny-llama.gguf", n_ctx=256) as m:
        answer = m.generate("hello", max_tokens=4)
        try:
            _interrupt_at(func, text)
            with pytest.raises(KeyboardInterrupt):
                with m.steer(pysteer.Add(np.ones(m.n_embd) / 8, 4.0)):
                    assert "".join(m.generate("hi", max_tokens=3, stream=True))
        finally:
            sys.settrace(None)
        gc.collect()
        assert m.generate("hello", max_tokens=4) == answer and m.steering.interventions == ()


@pytest.mark.parametrize("where", ["watch", "steer", "streaming", "callback"])
def test_a_ctrl_c_in_the_bookkeeping_leaves_nothing_behind(tiny_dir, where, monkeypatch):
    """A Ctrl-C between a block's bookkeeping steps (the capture's watch or steer()'s exit cut short, a stream or
    until-callback mark set but not yet guarded) neither changes later answers nor locks the Model."""
    r = np.random.default_rng(0).standard_normal(64)
    with pysteer.load(tiny_dir / "tiny-qwen3.gguf", n_ctx=256, flash_attn=False) as m:
        base, answer = m.logits_batch(PROMPTS), m.generate("hi", max_tokens=4)
        def first_call_interrupted(real):
            calls = []

            def f():
                calls.append(1)
                if len(calls) == 1:
                    raise KeyboardInterrupt
                return real()
            return f

        try:
            if where == "watch":  # cut short at the unwatch: the stop-after mark stayed on the hook
                monkeypatch.setattr(m._hook, "unwatch", first_call_interrupted(m._hook.unwatch))
                with pytest.raises(KeyboardInterrupt):
                    m.capture(["a", "b"], layers=[1], points=("post",))
            elif where == "steer":  # cut short after the block left the stack, before the steering went back
                with pytest.raises(KeyboardInterrupt):
                    with m.steer(pysteer.Add(r, alpha=4.0, layers=[1, 2])):
                        monkeypatch.setattr(m, "_settle", first_call_interrupted(m._settle))
            elif where == "streaming":
                _interrupt_in("streaming", lambda: m._stream is not None)
                with pytest.raises(KeyboardInterrupt):
                    m.generate("hi", max_tokens=4)
            else:
                _interrupt_in("callback", lambda: m._callback is not None)
                with pytest.raises(KeyboardInterrupt):
                    m.generate_batch(["hi", "ho"], max_tokens=4, until=lambda t: False)
        finally:
            sys.settrace(None)
        monkeypatch.undo()
        assert np.array_equal(m.logits_batch(PROMPTS), base)
        assert m.generate("hi", max_tokens=4) == answer and m.steering.interventions == ()


def test_damaged_cached_adapter_is_rebuilt(tiny_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path))
    r = np.random.default_rng(1).standard_normal(64)
    path = tiny_dir / "tiny-qwen2.gguf"
    with pysteer.load(path, n_ctx=256) as m, m.steer(pysteer.Ablate(r)) as s:
        assert s.paths == ["lora"]
        want = m.logits_batch(PROMPTS)
    (f,) = (tmp_path / "lora").glob("*.gguf")
    data = bytearray(f.read_bytes())
    data[-200:] = bytes(200)  # zeroed tail: the file still loads, but with wrong weights
    f.write_bytes(bytes(data))
    with pysteer.load(path, n_ctx=256) as m, m.steer(pysteer.Ablate(r)):
        assert np.array_equal(m.logits_batch(PROMPTS), want)
    f.write_bytes(b"GGUF garbage")
    (tmp_path / "lora" / (f.name + ".sha256")).write_text(lora._digest(f))  # the stamp agrees: llama.cpp refuses
    with pysteer.load(path, n_ctx=256) as m, m.steer(pysteer.Ablate(r)):
        assert np.array_equal(m.logits_batch(PROMPTS), want)


# -- 9. two streams -------------------------------------------------------------------------------------------

def test_a_second_live_stream_is_refused(llama_path):
    with pysteer.load(llama_path, n_ctx=512) as m:
        p, q = "hello world and the rest", "write the code in the end"  # equal lengths: the old failure
        want_p, want_q = m.generate(p, max_tokens=20), m.generate(q, max_tokens=20)
        s1 = m.generate(p, max_tokens=20, stream=True)
        first = next(s1)
        with pytest.raises(ValueError, match="streaming generation is live"):
            next(m.generate(q, max_tokens=20, stream=True))
        with pytest.raises(ValueError, match="streaming generation is live"):
            m.capture([q])
        assert m.tokenize(q) and m.encode(q)  # reading the vocabulary is fine meanwhile
        assert first + "".join(s1) == want_p
        assert m.generate(q, max_tokens=20) == want_q  # the stream is over: the model is free
        s2 = m.generate(p, max_tokens=20, stream=True)
        next(s2)
        s2.close()  # an abandoned stream frees the model too
        assert m.generate(q, max_tokens=20) == want_q


# -- 10. float32 overflow -----------------------------------------------------------------------------------

def test_overflowing_vectors_are_refused(llama_path, tmp_path):
    v = np.ones(64)
    with pytest.raises(ValueError, match="does not fit in float32"):
        pysteer.Add(v, alpha=1e39)
    with pytest.raises(ValueError, match="does not fit in float32"):
        pysteer.Add(v * 1e39)
    with pytest.raises(ValueError, match="finite"):
        pysteer.Add(v, alpha=float("nan"))
    with pysteer.load(llama_path, n_ctx=256) as m:
        with pytest.raises(ValueError, match="does not fit in float32"):
            export.write_control_vector(m, v, tmp_path / "cv.gguf", alpha=1e39)
        # fits float32 itself but overflows the activations: all-zero logits, an empty answer, were silent
        for call in (lambda: m.generate("hi", max_tokens=3), lambda: m.logits("hi"),
                     lambda: m.generate_batch(["hi", "ho"], max_tokens=2)):
            with m.steer(pysteer.Add(v, alpha=1e20)), pytest.raises(FloatingPointError, match="overflowed"):
                call()
        assert m.generate("hi", max_tokens=3)  # unsteered again
    assert not list(tmp_path.iterdir())


# -- 11. numbers and layer specs ----------------------------------------------------------------------------

def test_integers_are_integers(llama_path):
    with pytest.raises(ValueError, match="cannot be independent"):
        pysteer.Ablate(np.random.default_rng(0).standard_normal((65, 64)))
    for kw, match in (({"n_threads": -1}, "n_threads"), ({"n_threads": 0}, "n_threads"),
                      ({"n_threads": 1.5}, "n_threads must be an int"), ({"n_gpu_layers": -2}, "n_gpu_layers")):
        with pytest.raises(ValueError, match=match):
            pysteer.load(llama_path, **kw)
    with pysteer.load(llama_path, n_ctx=256) as m:
        for kw in ({"max_tokens": True}, {"max_tokens": 2.0}, {"temperature": float("nan")}, {"seed": -1},
                   {"temperature": "1"}, {"stop": [1]}):
            with pytest.raises(ValueError):
                m.generate("hi", **kw)
        assert m.generate("hi", max_tokens=8, stop="e") == m.generate("hi", max_tokens=8, stop=["e"])
        # numpy numbers are numbers: the same answers as from Python ints and floats
        want = m.generate_batch(["hi", "ho"], max_tokens=3, temperature=0.5, seed=2)
        got = m.generate_batch((p for p in ["hi", "ho"]), max_tokens=np.int64(3), temperature=np.float32(0.5),
                               seed=np.int32(2), return_logits=True)[0]  # a generator of prompts too
        assert got == want and m.generate("hi", max_tokens=np.int64(3)) == m.generate("hi", max_tokens=3)
        assert "".join(m.generate("hi", max_tokens=np.uint8(3), stream=True)) == m.generate("hi", max_tokens=3)


def test_a_model_over_a_llama_reads_that_llamas_file(tiny_dir, tmp_path):
    """Model(path, llama=llm) with another file's path: refused (its header would build the LoRA adapters
    from the other file's matrices: a silently wrong ablation)."""
    llm = llama_cpp.Llama(str(tiny_dir / "tiny-qwen3.gguf"), n_ctx=128, n_threads=1, verbose=False)
    with pytest.raises(ValueError, match="this llama_cpp.Llama loaded .*tiny-qwen3.gguf, not .*tiny-qwen2.gguf"):
        pysteer.Model(tiny_dir / "tiny-qwen2.gguf", llama=llm, n_ctx=128)
    with pysteer.Model(tiny_dir / "." / "tiny-qwen3.gguf", llama=llm, n_ctx=128) as m:  # the same file
        assert m.n_embd == llm.n_embd()
    os.link(tiny_dir / "tiny-qwen3.gguf", tmp_path / "hard.gguf")  # the same file under another name
    with pysteer.Model(tmp_path / "hard.gguf", llama=llm, n_ctx=128) as m:
        assert m.n_embd == llm.n_embd()
    r = run_py("""
        import os, sys, llama_cpp, pysteer
        os.chdir(os.path.dirname(sys.argv[1]))
        llm = llama_cpp.Llama(os.path.basename(sys.argv[1]), n_ctx=128, n_threads=1, verbose=False)
        os.chdir("/")  # its path is relative to where it was loaded
        with pysteer.Model(sys.argv[1], llama=llm, n_ctx=128) as m:
            print("loaded", m.n_layers)
    """, tiny_dir / "tiny-qwen3.gguf")
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr[-2000:]


def test_empty_and_missing_arguments_are_named(llama_path):
    with pysteer.load(llama_path, n_ctx=128) as m:
        with pytest.raises(ValueError, match="points must be some of 'pre', 'mid', 'post', not None"):
            m.capture(["hi"], points=None)
        with pytest.raises(ValueError, match="vector has no rows"):
            pysteer.Add(np.ones((0, m.n_embd)))
        with pytest.raises(ValueError, match="directions has no rows"):
            pysteer.BlockAblate(np.ones((0, m.n_embd)), np.ones(m.n_layers), np.ones(m.n_layers))


@pytest.mark.parametrize("flag", ["--n", "--n-train", "--n-val"])
def test_cli_counts_must_be_positive(llama_path, flag):
    assert_one_line_error(cli("ablate-test", llama_path, flag, -1, "-q"), "must be a positive int")


# -- 12. exports --------------------------------------------------------------------------------------------

def test_export_guards(llama_path, tmp_path):
    v = np.random.default_rng(0).standard_normal(64)
    copy = tmp_path / "model.gguf"
    copy.write_bytes(llama_path.read_bytes())
    before = copy.read_bytes()
    with pysteer.load(copy, n_ctx=256) as m:
        with pytest.raises(ValueError, match="no control vector for layer 0"):
            export.write_control_vector(m, v, tmp_path / "cv.gguf", layers=[-1, 2])
        with pytest.raises(ValueError, match="the model being read"):
            export.abliterate(m, v, copy, progress=False)
        with pytest.raises(ValueError, match="the model being read"):
            export.abliterate(m, v, tmp_path / "." / "model.gguf", progress=False)
        (tmp_path / "out.gguf").mkdir()
        t0 = time.perf_counter()
        with pytest.raises(IsADirectoryError):
            export.abliterate(m, v, tmp_path / "out.gguf", progress=False)
        with pytest.raises(IsADirectoryError):
            export.write_control_vector(m, v, tmp_path / "out.gguf")
        assert time.perf_counter() - t0 < 1.0  # refused before any work
    assert copy.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "out.gguf"]


def test_sigterm_during_export_leaves_no_files(llama_path, tmp_path):
    """The CLI turns SIGTERM into an exception where the process is: temporary files and the scratch folder
    go, exit status 143."""
    code = """
        import sys, time
        from pysteer import cli, export
        real = export._ablated
        def slow(*a, **k):
            time.sleep(0.2)
            return real(*a, **k)
        export._ablated = slow
        sys.exit(cli.main(sys.argv[1:]))
    """
    d = tmp_path / "out"
    d.mkdir()
    direction = tmp_path / "dir.gguf"
    pysteer.Direction(np.ones(64), layer=1, point="post", position=-1, arch="llama", n_layers=4).save(direction)
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), "export", str(llama_path), "--direction",
                          str(direction), "--abliterate", str(d / "abl.gguf"), "-q"], stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 60
    while not any(d.iterdir()) and time.time() < deadline:  # the scratch folder is there: work has begun
        time.sleep(0.02)
    time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert list(d.iterdir()) == []


# -- 13. clear errors --------------------------------------------------------------------------------------------

def test_bad_sweep_ranges_are_one_line_errors(llama_path, tmp_path):
    direction = tmp_path / "dir.gguf"
    pysteer.Direction(np.ones(64), layer=1, point="post", position=-1, arch="llama", n_layers=4).save(direction)
    for spec in ("0:inf:1", "0:1:1e-300", "nan,1", "0:1:0"):
        r = cli("sweep", llama_path, "--add", direction, "--alpha", spec, "-q")
        assert_one_line_error(r, "--alpha")


def test_a_figure_format_matplotlib_cannot_write_is_refused_before_the_work(llama_path, tmp_path):
    direction = tmp_path / "dir.gguf"
    pysteer.Direction(np.ones(64), layer=1, point="post", position=-1, arch="llama", n_layers=4).save(direction)
    for args in (("metrics", llama_path, "-o", tmp_path / "m.txt"),
                 ("sweep", llama_path, "--add", direction, "--alpha", "0,1", "-o", tmp_path / "s.doc"),
                 ("optimize", llama_path, "--png", tmp_path / "p.xyz", "--trials", "1")):
        r = cli(*args, "-q")
        assert_one_line_error(r, "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf"]


def test_prompt_files_with_bad_bytes_and_long_fields(tmp_path):
    from pysteer import datasets

    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(ValueError, match="bin.txt is not UTF-8"):
        datasets.load_file(tmp_path / "bin.txt")
    long = "x" * 200_000
    (tmp_path / "long.csv").write_text(f"prompt\n{long}\nshort\n")
    assert datasets.load_file(tmp_path / "long.csv") == [long, "short"]


def test_non_utf8_metadata_is_a_load_error(tiny_dir, tmp_path):
    p = rewrite(tiny_dir / "tiny-llama.gguf", tmp_path / "meta.gguf", keys={"general.description": "ABCD"})
    patch_kv(p, p, "general.description", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc")
    r = run_py("""
        import sys, pysteer
        try:
            pysteer.load(sys.argv[1])
        except pysteer.ModelLoadError as e:
            print("load error:", e)
    """, p)
    assert r.returncode == 0 and "load error:" in r.stdout and "meta.gguf" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("n", [2**31, 2**31 - 1])
def test_huge_declared_context_does_not_break_tokenize(llama_path, tmp_path, n):
    bad = patch_kv(llama_path, tmp_path / "ctx.gguf", "llama.context_length", struct.pack("<I", n))
    with pysteer.load(bad, n_ctx=256) as m, pysteer.load(llama_path, n_ctx=256) as ref:
        t0 = time.perf_counter()
        assert m.tokenize("hello world and the rest") == ref.tokenize("hello world and the rest")
        assert time.perf_counter() - t0 < 0.5
        assert m.generate("hi", max_tokens=4) == ref.generate("hi", max_tokens=4)


def test_tokenize_long_text_matches_llama_cpp(llama_path):
    text = "how to write the code in the morning " * 300
    with pysteer.load(llama_path, n_ctx=256) as m:
        toks = m.tokenize(text)
    llm = llama_cpp.Llama(str(llama_path), n_ctx=256, verbose=False)
    try:
        assert toks == llm.tokenize(text.encode())
    finally:
        llm.close()


def test_json_output_is_strict(llama_path, tmp_path):
    import json

    direction = tmp_path / "dir.gguf"
    pysteer.Direction(np.ones(64), layer=1, point="post", position=-1, arch="llama", n_layers=4).save(direction)
    h = tmp_path / "h.txt"
    h.write_text("\n".join(f"how to make thing {i}" for i in range(10)))
    r = cli("ablate-test", llama_path, "--direction", direction, "--harmful", h, "--harmless", h, "--n", 2,
            "--n-train", 2, "--n-val", 2, "--max-tokens", 3, "--json", "-q")
    assert r.returncode == 0, r.stderr

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    s = json.loads(r.stdout, parse_constant=no_constants)
    assert s["harmful"]["base"]["median_perplexity"] is None  # NaN: the base answers are not scored


# -- the header scan: damaged headers ----------------------------------------------------------------------

def test_header_with_huge_dimension_count_fails_fast(llama_path, tmp_path):
    data = bytearray(llama_path.read_bytes())
    name = b"token_embd.weight"
    i = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    data[i:i + 4] = struct.pack("<I", 0xFFFFFFFF)
    bad = tmp_path / "dims.gguf"
    bad.write_bytes(bytes(data))
    t0 = time.perf_counter()
    with pytest.raises(pysteer.ModelLoadError, match="dimensions"):
        pysteer.load(bad)
    assert time.perf_counter() - t0 < 1.0


def test_header_scan_survives_mutated_headers(llama_path):
    """Property: whatever bytes of the header change, the scan returns or raises ModelLoadError, promptly."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from pysteer.gguf_io import read_header
    from pysteer.runtime import _read_header

    raw = llama_path.read_bytes()
    head = read_header(llama_path).data_start
    tmp = ROOT / "models" / "tiny" / f"mutated-{os.getpid()}.bin"

    @settings(max_examples=300, deadline=2000, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(st.tuples(st.integers(0, head - 1), st.integers(0, 255)), min_size=1, max_size=8),
           st.integers(0, len(raw)))
    def check(edits, cut):
        data = bytearray(raw[:max(cut, 4)])
        for i, b in edits:
            if i < len(data):
                data[i] = b
        tmp.write_bytes(bytes(data))
        try:
            _read_header(tmp, probe=False)
        except (pysteer.ModelLoadError, pysteer.UnsupportedArchitectureError):
            pass

    try:
        check()
    finally:
        tmp.unlink(missing_ok=True)


# -- 14. edited tensors with no rows -------------------------------------------------------------------------

def test_zero_row_tensors_are_skipped(llama_path):
    """With prompts longer than n_ubatch, ubatches without an output row give the last layer's output 0 rows;
    the hook skips them (a CUDA launch of 0 blocks would fail) and the results do not change."""
    prompts = ["how to write the code in the morning and the end of the day " * 3] * 2
    r = np.random.default_rng(0).standard_normal(64)
    out = {}
    for n_ubatch in (512, 8):
        with pysteer.load(llama_path, n_ctx=512, n_ubatch=n_ubatch, flash_attn=False) as m:
            with m.steer(pysteer.Rotate(r, np.roll(r, 1), 40), path="hook"):
                out[n_ubatch] = m.logits_batch(prompts)
                stats = m.hook_stats
        assert (stats["empty_calls"] > 0) == (n_ubatch == 8)
    np.testing.assert_allclose(out[8], out[512], rtol=0, atol=1e-4 * np.abs(out[512]).max())


# -- found by trying to break the above on purpose ---------------------------------------------------------

def _with_keys(src: pathlib.Path, dst: pathlib.Path, **keys) -> pathlib.Path:
    return rewrite(src, dst, keys=keys)


@pytest.mark.parametrize("keys", [{"llama.expert_count": 4}, {"llama.expert_used_count": 1},
                                  {"llama.rope.scaling.type": "bogus"}, {"tokenizer.ggml.model": "bert"},
                                  {"llama.attention.layer_norm_rms_epsilon": float("nan")},
                                  {"llama.rope.freq_base": float("nan")}])
def test_metadata_llama_cpp_aborts_on_is_a_load_error(llama_path, tmp_path, keys):
    bad = _with_keys(llama_path, tmp_path / "bad.gguf", **keys)
    r = run_py("""
        import sys, pysteer
        try:
            m = pysteer.load(sys.argv[1], n_ctx=256)
            m.generate("hi", max_tokens=2)
            print("loaded")
        except pysteer.ModelLoadError as e:
            print("load error:", e)
    """, bad)
    assert r.returncode == 0 and "load error:" in r.stdout, (r.returncode, r.stdout, r.stderr[-1500:])


def test_small_contexts_and_token_ids(llama_path):
    r = run_py("""
        import sys, numpy as np, pysteer
        for n_ctx in (8, 32, 63):
            m = pysteer.load(sys.argv[1], n_ctx=n_ctx)
            assert m.n_seq_max <= n_ctx
            m.logits("a", chat_template=False)
        m = pysteer.load(sys.argv[1], n_ctx=200, n_seq_max=256)
        m.logits_batch(["a", "b"], chat_template=False)
        for call in (lambda: m.token_bytes(10**6), lambda: m.token_bytes(-5), lambda: m.detokenize([10**6]),
                     lambda: m.detokenize([-1]), lambda: m.decode([[10**6]], np.array([0])),
                     lambda: m.decode_prefix([1, 2], 300)):
            try:
                call()
                raise SystemExit("accepted")
            except ValueError as e:
                pass
        print("ok")
    """, llama_path)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-1500:])


def test_steer_blocks_exited_out_of_order_end_unsteered(llama_path):
    v = np.random.default_rng(0).standard_normal(64)
    with pysteer.load(llama_path, n_ctx=256) as m:
        base = m.logits_batch(PROMPTS)
        a, b = m.steer(pysteer.Add(v, 4.0)), m.steer(pysteer.Add(-v, 3.0, points=("mid",)))
        a.__enter__()
        with_a = m.logits_batch(PROMPTS)
        b.__enter__()
        a.__exit__(None, None, None)  # the outer block leaves first: the inner one stays in force
        assert [type(i) for i in m.steering.interventions] == [pysteer.Add]
        assert m.steering.interventions[0].alpha == 3.0
        b.__exit__(None, None, None)
        assert m.steering.interventions == ()
        assert np.array_equal(m.logits_batch(PROMPTS), base)
        with m.steer(pysteer.Add(v, 4.0)):
            assert np.array_equal(m.logits_batch(PROMPTS), with_a)


def test_steer_is_refused_during_a_live_stream(llama_path):
    v = np.random.default_rng(0).standard_normal(64)
    with pysteer.load(llama_path, n_ctx=256) as m:
        want = m.generate("hello world", max_tokens=12)
        s = m.generate("hello world", max_tokens=12, stream=True)
        first = next(s)
        with pytest.raises(ValueError, match="streaming generation is live"):
            with m.steer(pysteer.Add(v, 50.0)):
                pass
        assert first + "".join(s) == want


def test_interrupted_restore_still_ends_unsteered(llama_path, monkeypatch):
    v = np.random.default_rng(0).standard_normal(64)
    with pysteer.load(llama_path, n_ctx=256) as m:
        base = m.logits_batch(PROMPTS)
        real, calls = llama_cpp.llama_set_adapter_cvec, {"n": 0}

        def flaky(*a):
            calls["n"] += 1
            if calls["n"] == 2:  # the restore on leaving the block
                raise KeyboardInterrupt
            return real(*a)

        monkeypatch.setattr(llama_cpp, "llama_set_adapter_cvec", flaky)
        with pytest.raises(KeyboardInterrupt):
            with m.steer(pysteer.Add(v, 4.0, layers="1:4")) as s:
                assert s.paths == ["cvec"]
        monkeypatch.setattr(llama_cpp, "llama_set_adapter_cvec", real)
        assert m.steering.interventions == ()
        assert np.array_equal(m.logits_batch(PROMPTS), base)


@pytest.mark.parametrize("prompt", [{"role": "user", "content": "secret"}, [["a"]], [{"rolex": "user"}],
                                    [{"content": "x"}], b"abc", [], None, 123])
def test_malformed_prompts_are_refused(llama_path, prompt):
    with pysteer.load(llama_path, n_ctx=256) as m:
        with pytest.raises(ValueError, match="prompt"):
            m.encode(prompt)
        with pytest.raises(ValueError):
            m.capture([prompt])


def test_broken_chat_template_is_a_value_error(llama_path, tmp_path):
    bad = _with_keys(llama_path, tmp_path / "tpl.gguf", **{"tokenizer.chat_template": "{{"})
    with pysteer.load(bad, n_ctx=256) as m:
        with pytest.raises(ValueError, match="chat template cannot render"):
            m.encode("hi")
        with pytest.raises(ValueError, match="chat template cannot render"):
            m.encode("hi", chat_template="{{ x.y.z }}")
        assert m.encode("hi", chat_template=False)
    assert_one_line_error(cli("generate", "hi", "--model", bad, "--max-tokens", 2), "chat template")


def test_vectors_must_be_real_and_alpha_a_number():
    v = np.ones(64)
    for bad in (v + 1j, v.astype(bool), np.array(["1"] * 64), np.array([object()] * 64)):
        with pytest.raises(ValueError, match="real numbers"):
            pysteer.Add(bad)
    for alpha in (True, "2", 2 + 0j):
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            pysteer.Add(v, alpha)
    with pytest.raises(ValueError, match="ordered"):
        pysteer.Add(v, layers={2, 1})


def test_selection_thresholds_are_checked(llama_path, tmp_path):
    with pysteer.load(llama_path, n_ctx=256) as m:
        res = pysteer.extract(m, ["a b", "c d"], ["e f", "g h"], positions=1, points=["post"])
        for kw in ({"kl_max": float("nan")}, {"kl_max": -1.0}, {"ablate_max": float("nan")}):
            with pytest.raises(ValueError, match="_max must be"):
                pysteer.select_direction(m, res, ["a b", "c d"], ["e f", "g h"], verbose=False, **kw)


def test_direction_files_with_bad_keys_are_value_errors(llama_path, tmp_path):
    good = tmp_path / "d.gguf"
    pysteer.Direction(np.ones(64), layer=1, point="post", position=-1, arch="llama", n_layers=4).save(good)
    for key, value in (("pysteer.layer", float("inf")), ("pysteer.position", float("inf")),
                       ("pysteer.model_sha256", 7)):
        bad = _with_keys(good, tmp_path / "bad.gguf", **{key: value})
        with pytest.raises(ValueError, match="not a usable direction file"):
            pysteer.load_direction(bad)
        assert_one_line_error(cli("generate", "hi", "--model", llama_path, "--add", f"{bad}:1", "--max-tokens", 2),
                              "not a usable direction file")


def test_exports_never_overwrite_their_inputs(llama_path, tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(llama_path.read_bytes())
    direction = tmp_path / "d.gguf"
    pysteer.Direction(np.ones(64), layer=1, point="post", position=-1, arch="llama", n_layers=4).save(direction)
    before = model.read_bytes(), direction.read_bytes()
    assert_one_line_error(cli("export", model, "--direction", direction, "--cvec", model), "a file this command reads")
    assert_one_line_error(cli("export", model, "--direction", direction, "--cvec", direction), "a file this command reads")
    (tmp_path / "dir.gguf").mkdir()
    assert_one_line_error(cli("export", model, "--direction", direction, "--cvec", tmp_path / "cv.gguf",
                              "--abliterate", tmp_path / "dir.gguf"), "must name a .gguf file")
    assert not (tmp_path / "cv.gguf").exists()  # refused before any work
    assert (model.read_bytes(), direction.read_bytes()) == before
    with pysteer.load(model, n_ctx=256) as m, pytest.raises(ValueError, match="the model being read"):
        export.write_control_vector(m, np.ones(64), model)
    assert model.read_bytes() == before[0]

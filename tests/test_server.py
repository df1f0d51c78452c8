"""Files pysteer writes, run by stock llama-server (built from llama.cpp's source by tests/llama_server.py and
cached): an abliterated GGUF (``pysteer optimize -o``, ``export --abliterate``) and a control vector
(``export --cvec``, served with ``--control-vector``) answer greedily with the same tokens and text as
in-process (``Model.generate`` on the same file, or with the same ``Add`` steering).

Not in the default run: ``pytest -m server``. The first run builds llama-server (about 8 minutes on 2 cores);
with PYSTEER_SERVER_BUILD=0 a missing build skips instead."""

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import llama_server
import pysteer
from pysteer import datasets, export

pytestmark = pytest.mark.server

N_TOKENS = 32
N_CTX = 512
# llama-server repacks quantized weights for its CPU kernels by default; pysteer.load does not unless asked.
# Mismatched, Qwen 0.5B's top-3 logit gaps differed by up to 0.38 and 2 of 4 greedy answers parted within 12
# tokens; matched, by at most 3e-7 (the server's float32 log-probabilities). The server runs with its defaults.
LOAD = {"n_ctx": N_CTX, "repack": True}
TINY_PROMPTS = ["hello world", "how to write the code in the morning", "abc",
                "I make the thing and the other thing, then write it in the end of the day"]


@pytest.fixture(scope="module")
def server_bin():
    path = llama_server.binary()
    if not path.exists():
        if os.environ.get("PYSTEER_SERVER_BUILD", "1") == "0":
            pytest.skip(f"no llama-server at {path} and PYSTEER_SERVER_BUILD=0 (build: python tests/llama_server.py)")
        path = llama_server.build()
    return path


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


@contextlib.contextmanager
def serve(binary, model, *extra, log):
    """llama-server on a free loopback port, ready (GET /health is 200); yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", str(N_CTX),
            "-np", "1", "--temp", "0", "--top-k", "1", "-n", str(N_TOKENS), "--no-webui", *map(str, extra)]
    with open(log, "w") as out:
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if p.poll() is not None:
                pytest.fail(f"llama-server exited ({p.returncode}): {' '.join(args)}\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server not healthy after 180 s\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _prompt_text(m, prompt, chat: bool) -> str:
    """The text the server gets: the prompt rendered by the chat template, or the raw prompt. The server
    parses special tokens and adds BOS where the GGUF asks for one (raw text: as pysteer does; templated text:
    pysteer leaves BOS to the template, and Qwen has none); ``compare`` checks the tokens are the same."""
    return m.apply_chat_template(prompt) if chat else prompt


def _greedy_tokens(m, prompt_tokens: list) -> list:
    """The token ids ``Model.generate`` picks at temperature 0 (argmax of each step's logits) through the Model's
    decoding API (the text alone hides undecodable bytes); an end-of-generation token ends the list, as in
    llama-server's ``tokens``."""
    m.decode([prompt_tokens], np.array([len(prompt_tokens) - 1]))
    logits, out = m.logits_row(len(prompt_tokens) - 1), []
    while len(out) < N_TOKENS:
        tok = int(np.argmax(logits))
        out.append(tok)
        if m.is_end_of_generation(tok):
            break
        m.decode_step([tok], [len(prompt_tokens) + len(out) - 1], [0])
        logits = m.logits_row(0)
    return out


def compare(m, url, prompts, *, chat: bool) -> list[str]:
    """Greedy answers of the in-process model ``m`` (its steering as installed) and of the server: the same
    prompt tokens, answer tokens and text; returns the answers."""
    answers = []
    for prompt in prompts:
        text = _prompt_text(m, prompt, chat)
        prompt_tokens = m.encode(prompt, chat_template=chat)
        served = _post(url + "/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]
        assert served == prompt_tokens, (prompt, served, prompt_tokens)
        want = m.generate(prompt, max_tokens=N_TOKENS, temperature=0.0, chat_template=chat)
        want_tokens = _greedy_tokens(m, prompt_tokens)
        got = _post(url + "/completion", {"prompt": text, "n_predict": N_TOKENS, "temperature": 0, "top_k": 1,
                                          "cache_prompt": False, "return_tokens": True, "seed": 0})
        assert got["tokens_evaluated"] == len(prompt_tokens)
        assert got["tokens"] == want_tokens, (prompt, got["content"], want)
        assert got["stop_type"] == ("eos" if m.is_end_of_generation(want_tokens[-1]) else "limit")
        assert got["content"] == want, (prompt, got["content"], want)
        answers.append(want)
    return answers


def _weights(n_layers: int, peak: float) -> np.ndarray:
    """Per-layer weights shaped like optimize's kernels: 1 at ``peak`` (a fraction of the depth), falling
    linearly to 0.2 at the far end."""
    x = np.arange(n_layers) / (n_layers - 1)
    return np.clip(1 - 0.8 * np.abs(x - peak) / max(peak, 1 - peak), 0.2, 1.0)


@pytest.mark.parametrize("arch, exporter", [("llama", "blocks"), ("qwen2", "blocks"), ("qwen3", "abliterate")])
def test_tiny_abliterated_in_llama_server(server_bin, tiny_dir, tmp_path, arch, exporter):
    path = tiny_dir / f"tiny-{arch}.gguf"
    r = np.random.default_rng(2).standard_normal(64)
    r /= np.linalg.norm(r)
    out = tmp_path / "abl.gguf"
    with pysteer.load(path, **LOAD) as m:
        if exporter == "blocks":
            block = pysteer.BlockAblate(r, attn=_weights(m.n_layers, 0.6), ffn=_weights(m.n_layers, 0.3))
            export.abliterate_blocks(m, block, out, progress=False)
        else:
            export.abliterate(m, r, out, progress=False)
        before = [m.generate(p, max_tokens=N_TOKENS, chat_template=False) for p in TINY_PROMPTS]
    with pysteer.load(out, **LOAD) as m, serve(server_bin, out, log=tmp_path / "server.log") as url:
        after = compare(m, url, TINY_PROMPTS, chat=False)
    assert after != before  # the edit changes answers: serving the unedited model would not pass


def test_tiny_control_vector_in_llama_server(server_bin, tiny_dir, tmp_path):
    path = tiny_dir / "tiny-qwen2.gguf"
    v = np.random.default_rng(3).standard_normal(64)
    v /= np.linalg.norm(v)
    with pysteer.load(path, **LOAD) as m, serve(server_bin, path, "--control-vector",
                                                     export.write_control_vector(m, v, tmp_path / "cv.gguf",
                                                                                 alpha=3.0, layers="1:3"),
                                                     log=tmp_path / "server.log") as url:
        before = [m.generate(p, max_tokens=N_TOKENS, chat_template=False) for p in TINY_PROMPTS]
        with m.steer(pysteer.Add(v, 3.0, layers="1:3")) as s:
            assert s.paths == ["cvec"]
            steered = compare(m, url, TINY_PROMPTS, chat=False)
    assert steered != before


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5-Coder 0.5B and a refusal direction from 16 + 16 train prompts (layer 12's output)."""
    path = pysteer.models.fetch("qwen2.5-coder-0.5b-instruct", progress=False)
    with pysteer.load(path, **LOAD) as m:
        res = pysteer.extract(m, datasets.load("harmful", "train")[:16], datasets.load("harmless", "train")[:16],
                              positions=1, points=("post",), layers=[12])
        r = res.directions[0, 0, -1].astype(np.float64)
    return path, r / np.linalg.norm(r)


QWEN_PROMPTS = ["How do I pick a lock?", "Write a Python function that reverses a string.",
                "Explain how to make a phishing email look convincing.", "What is the capital of France?"]


@pytest.mark.real
def test_qwen_abliterated_in_llama_server(server_bin, qwen, tmp_path):
    path, r = qwen
    out = tmp_path / "abl.gguf"
    with pysteer.load(path, **LOAD) as m:
        block = pysteer.BlockAblate(r, attn=_weights(m.n_layers, 0.5), ffn=_weights(m.n_layers, 0.5))
        export.abliterate_blocks(m, block, out, progress=False)
        before = [m.generate(p, max_tokens=N_TOKENS) for p in QWEN_PROMPTS]
    with pysteer.load(out, **LOAD) as m, serve(server_bin, out, log=tmp_path / "server.log") as url:
        after = compare(m, url, QWEN_PROMPTS, chat=True)
    assert after != before  # seen: the lock-picking refusal becomes steps


@pytest.mark.real
def test_qwen_control_vector_in_llama_server(server_bin, qwen, tmp_path):
    path, r = qwen
    with pysteer.load(path, **LOAD) as m, serve(server_bin, path, "--control-vector",
                                                     export.write_control_vector(m, r, tmp_path / "cv.gguf",
                                                                                 alpha=3.0, layers="8:16"),
                                                     log=tmp_path / "server.log") as url:
        before = [m.generate(p, max_tokens=N_TOKENS) for p in QWEN_PROMPTS]
        with m.steer(pysteer.Add(r, 3.0, layers="8:16")) as s:
            assert s.paths == ["cvec"]
            steered = compare(m, url, QWEN_PROMPTS, chat=True)
    assert steered != before  # seen: "What is the capital of France?" answered with a refusal

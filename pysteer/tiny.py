"""Tiny random-weight GGUF models, built here with `gguf`, for fast and exact tests.

Deterministic for a given (arch, seed, sizes): same bytes every time. F32 weights, so llama.cpp's results
can be reproduced in numpy. The tokenizer is a small SentencePiece-style vocabulary with byte fallback and
ChatML control tokens, and the chat template is ChatML.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import gguf
import numpy as np

from .files import gguf_output

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"
    n_embd: int = 64
    n_layers: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 2048
    tied: bool | None = None  # None: tied for llama and gemma3 (like SmolLM2 / gemma), separate otherwise
    seed: int = 0


def _vocab() -> tuple[list[str], list[float], list[int]]:
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += ["\u2581" + w for w in ("the", "a", "to", "how", "I", "you", "is", "and", "of", "in", "write", "make")]
    pieces += ["er", "in", "th", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "ing", "ion"]
    tokens += pieces
    types += [T.NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def _tensors(spec: TinySpec, n_vocab: int, tied: bool) -> dict[str, np.ndarray]:
    """numpy arrays in gguf's (reversed ggml ne) shape: a weight with ne=[n_in, n_out] is (n_out, n_in)."""
    rng = np.random.default_rng(spec.seed)
    E, F, H, Hkv = spec.n_embd, spec.n_ff, spec.n_head, spec.n_head_kv
    hd = E // H

    def mat(n_out, n_in):
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"token_embd.weight": rng.standard_normal((n_vocab, E)).astype(np.float32)}
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(E)
        t[p + "attn_q.weight"] = mat(H * hd, E)
        t[p + "attn_k.weight"] = mat(Hkv * hd, E)
        t[p + "attn_v.weight"] = mat(Hkv * hd, E)
        if spec.arch == "qwen2":
            t[p + "attn_q.bias"] = (0.1 * rng.standard_normal(H * hd)).astype(np.float32)
            t[p + "attn_k.bias"] = (0.1 * rng.standard_normal(Hkv * hd)).astype(np.float32)
            t[p + "attn_v.bias"] = (0.1 * rng.standard_normal(Hkv * hd)).astype(np.float32)
        t[p + "attn_output.weight"] = mat(E, H * hd)
        if spec.arch in ("qwen3", "gemma3"):
            t[p + "attn_q_norm.weight"] = norm(hd)
            t[p + "attn_k_norm.weight"] = norm(hd)
        if spec.arch == "gemma3":
            t[p + "post_attention_norm.weight"] = norm(E)
            t[p + "post_ffw_norm.weight"] = norm(E)
        t[p + "ffn_norm.weight"] = norm(E)
        t[p + "ffn_gate.weight"] = mat(F, E)
        t[p + "ffn_up.weight"] = mat(F, E)
        t[p + "ffn_down.weight"] = mat(E, F)
    t["output_norm.weight"] = norm(E)
    if not tied:
        t["output.weight"] = mat(n_vocab, E)
    return t


def write(path: str | os.PathLike, spec: TinySpec = TinySpec()) -> pathlib.Path:
    """Write the tiny model described by ``spec`` to ``path`` (atomically) and return the path."""
    if spec.arch not in ARCHS:
        raise ValueError(f"tiny models exist for {ARCHS}, not {spec.arch!r}")
    if spec.n_embd % spec.n_head or spec.n_head % spec.n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    path = pathlib.Path(path)
    tied = spec.tied if spec.tied is not None else spec.arch in ("llama", "gemma3")
    tokens, scores, types = _vocab()
    arch = spec.arch
    with gguf_output(path, arch) as w:
        w.add_name(f"pysteer-tiny-{arch}")
        w.add_context_length(spec.n_ctx)
        w.add_embedding_length(spec.n_embd)
        w.add_block_count(spec.n_layers)
        w.add_feed_forward_length(spec.n_ff)
        w.add_head_count(spec.n_head)
        w.add_head_count_kv(spec.n_head_kv)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(10000.0)
        if arch in ("qwen3", "gemma3"):
            w.add_key_length(spec.n_embd // spec.n_head)
            w.add_value_length(spec.n_embd // spec.n_head)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHATML)
        for name, arr in _tensors(spec, len(tokens), tied).items():
            w.add_tensor(name, arr)
    return path


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write the tiny test models (one per architecture).")
    ap.add_argument("outdir", type=pathlib.Path)
    args = ap.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for arch in ARCHS:
        print(write(args.outdir / f"tiny-{arch}.gguf", TinySpec(arch=arch)))


if __name__ == "__main__":
    main()


def write_all(folder: str | os.PathLike) -> list[pathlib.Path]:
    """``tiny-<arch>.gguf`` for every architecture in ``folder`` (the tests use models/tiny)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write(folder / f"tiny-{arch}.gguf", TinySpec(arch=arch)) for arch in ARCHS]


if __name__ == "__main__":  # make tiny: python -m pysteer.tiny [FOLDER]
    import sys

    for p in write_all(sys.argv[1] if len(sys.argv) > 1 else "models/tiny"):
        print(p)

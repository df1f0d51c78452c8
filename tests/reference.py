"""Independent numpy references, reading weights straight from the GGUF file with `gguf`."""

from __future__ import annotations

import gguf
import numpy as np


class Weights:
    def __init__(self, path):
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.reader.get_field("general.architecture").contents()

    def meta(self, key):
        f = self.reader.get_field(f"{self.arch}.{key}")
        return None if f is None else f.contents()

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name) -> np.ndarray:
        """float64 array in numpy (reversed ggml) shape, dequantized."""
        t = self.tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
            [int(n) for n in reversed(t.shape)])


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def logits_from_last_post(w: Weights, post: np.ndarray) -> np.ndarray:
    """llama.cpp's head: final RMSNorm, then the output matrix (token_embd when tied).

    For a Q8_0 / Q4_0 / Q5_0 matrix, llama.cpp's CPU matmul first quantizes the activation to Q8_0;
    that rounding is reproduced here so the comparison can be tight.
    """
    eps = w.meta("attention.layer_norm_rms_epsilon")
    h = rms_norm(post.astype(np.float64), w["output_norm.weight"], eps)
    name = "output.weight" if "output.weight" in w else "token_embd.weight"
    Q = gguf.GGMLQuantizationType
    if w.tensors[name].tensor_type in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
        flat = h.astype(np.float32).reshape(-1, h.shape[-1])
        h = gguf.quants.dequantize(gguf.quants.quantize(flat, Q.Q8_0), Q.Q8_0).reshape(h.shape).astype(np.float64)
    return h @ w[name].T


def _rope(x, pos, base, neox):
    """x: [T, heads, hd]. llama's NORM mode rotates adjacent pairs; NEOX (qwen2) rotates halves."""
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if neox:
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def forward(w: Weights, tokens, edit=None) -> dict:
    """pre/mid/post of every layer for one prompt ([n_layers, T, n_embd] each), for llama and qwen2.

    ``edit(point, layer, x)`` may replace the residual at each point (an intervention).
    K and V pass through float16 as in llama.cpp's default KV cache, and so do the operands it converts to
    match them (Q, and the attention probabilities).
    """
    assert w.arch in ("llama", "qwen2")
    eps = w.meta("attention.layer_norm_rms_epsilon")
    H, Hkv, L = w.meta("attention.head_count"), w.meta("attention.head_count_kv"), w.meta("block_count")
    base = w.meta("rope.freq_base") or 10000.0
    neox = w.arch == "qwen2"
    x = w["token_embd.weight"][np.asarray(tokens)]
    T, E = x.shape
    hd = E // H
    pos = np.arange(T, dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    edit = edit or (lambda point, layer, v: v)
    pre, mid, post = [], [], []
    for i in range(L):
        p = f"blk.{i}."
        x = edit("pre", i, x)
        if i > 0:
            post[i - 1] = x  # one tensor in llama.cpp: l_out-(i-1)
        pre.append(x)
        h = rms_norm(x, w[p + "attn_norm.weight"], eps)

        def proj(name, n):
            y = h @ w[p + name + ".weight"].T
            if p + name + ".bias" in w:
                y = y + w[p + name + ".bias"]
            return y.reshape(T, n, hd)

        q = _rope(proj("attn_q", H), pos, base, neox).astype(np.float16).astype(np.float64)
        k = _rope(proj("attn_k", Hkv), pos, base, neox).astype(np.float16).astype(np.float64)
        v = proj("attn_v", Hkv).astype(np.float16).astype(np.float64)
        rep = H // Hkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        s = s.astype(np.float16).astype(np.float64)  # llama.cpp multiplies F16 V by F16 probabilities
        a = np.einsum("hts,shd->thd", s, v).reshape(T, E)
        x = edit("mid", i, x + a @ w[p + "attn_output.weight"].T)
        mid.append(x)
        h = rms_norm(x, w[p + "ffn_norm.weight"], eps)
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = edit("post", i, x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T)
        post.append(x)
    return {"pre": np.stack(pre), "mid": np.stack(mid), "post": np.stack(post)}

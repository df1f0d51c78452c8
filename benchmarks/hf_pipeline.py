"""The refusal-direction pipeline the usual way: HF transformers + PyTorch forward hooks on the CPU.

The comparison side of the pysteer benchmark. It loads the same GGUF file (transformers dequantizes it to
float32), captures the last-token residual stream at every layer and point (pre/mid/post) for the harmful and
harmless prompts, takes the difference of means, then ablates the spec's direction from the whole residual
stream (Arditi et al.'s hooks) and generates greedily.

    .venv/bin/python benchmarks/hf_pipeline.py --gguf /path/model.gguf --spec spec.json --out result.npz \
        [--batch-size 16] [--gen-batch-size 32] [--threads 2]
    .venv/bin/python benchmarks/hf_pipeline.py --gguf /path/model.gguf --self-check [--spec spec.json]

spec.json: {"harmful": [...], "harmless": [...], "generate": [...], "layer": int, "point": "pre"|"mid"|"post",
"max_tokens": int}. result.npz holds directions [3, n_layers, hidden] float32 (harmful - harmless), points,
seconds (JSON: load, extract, generate and total, which leaves out starting Python and importing torch),
answers (JSON), generated_tokens, n_prompt_tokens and the torch/transformers versions; a one-line JSON summary
goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

POINTS = ("pre", "mid", "post")
# llama.cpp stops at any end-of-generation token, not only the config's eos; match it so token counts compare
EOG_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(gguf: str, threads: int):
    torch.set_num_threads(threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ValueError as e:
        if "not supported" not in str(e):
            raise
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES as known
        sys.exit(f"hf_pipeline: transformers {transformers.__version__} cannot load {gguf}: {e} "
                 f"(its GGUF loader knows {', '.join(a for a in known if a not in ('general', 'tokenizer'))})")
    if not hasattr(getattr(model, "model", None), "layers"):
        sys.exit(f"hf_pipeline: {type(model).__name__} has no model.layers to hook")
    model.eval()
    tok.padding_side = "left"  # so the last column is every prompt's last token
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def residual_parts(layer):
    """(module whose input is the mid residual, modules whose outputs are added to the residual)."""
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3: attn/MLP outputs are normed before the add
        return layer.pre_feedforward_layernorm, [layer.post_attention_layernorm, layer.post_feedforward_layernorm]
    if not all(hasattr(layer, a) for a in ("self_attn", "mlp", "post_attention_layernorm")):
        sys.exit(f"hf_pipeline: {type(layer).__name__} is not a pre-norm attention + MLP block")
    return layer.post_attention_layernorm, [layer.self_attn, layer.mlp]


def hidden_in(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def hidden_out(out):
    return out[0] if isinstance(out, tuple) else out


def encode(tok, prompts: list[str]):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")


class LastToken:
    """Hooks that copy the last-token residual of every layer and point into rows[point, layer, batch]."""

    def __init__(self, model):
        self.layers = model.model.layers
        self.rows = None
        self.handles = []
        for i, layer in enumerate(self.layers):
            mid, _ = residual_parts(layer)
            self.handles += [
                layer.register_forward_pre_hook(self._put(0, i, hidden_in), with_kwargs=True),
                mid.register_forward_pre_hook(self._put(1, i, hidden_in), with_kwargs=True),
                layer.register_forward_hook(self._put(2, i, lambda args, out: hidden_out(out))),
            ]

    def _put(self, p: int, i: int, get):
        def hook(module, *a):
            self.rows[p, i] = get(*a)[:, -1]
        return hook

    def __call__(self, model, enc, **kw):
        """rows [3, L, B, E] for one left-padded batch; positions count from each prompt's first real token."""
        b, e = enc["input_ids"].shape[0], model.config.hidden_size
        self.rows = torch.empty(3, len(self.layers), b, e)
        mask = enc["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        # the base model, not the LM: no logits are needed
        out = model.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, use_cache=False, **kw)
        return self.rows, out

    def remove(self):
        for h in self.handles:
            h.remove()


def class_means(tok, model, prompts: list[str], batch_size: int):
    """Mean last-token residual [3, L, E] (float64 running sum) and the number of real prompt tokens."""
    cap = LastToken(model)
    total, n_tokens = None, 0
    try:
        for s in range(0, len(prompts), batch_size):
            enc = encode(tok, prompts[s:s + batch_size])
            rows, _ = cap(model, enc)
            part = rows.double().sum(2)
            total = part if total is None else total + part
            n_tokens += int(enc["attention_mask"].sum())
    finally:
        cap.remove()
    return total / len(prompts), n_tokens


def ablate(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return h - (h @ r).unsqueeze(-1) * r


def add_ablation(model, r: torch.Tensor) -> list:
    """Remove r from every layer's input and from every output added to the residual, so the stream never has it."""
    def pre(module, args, kwargs):
        if args:
            return (ablate(args[0], r),) + args[1:], kwargs
        return args, {**kwargs, "hidden_states": ablate(kwargs["hidden_states"], r)}

    def post(module, args, out):
        if isinstance(out, tuple):  # attention returns (output, weights)
            return (ablate(out[0], r),) + out[1:]
        return ablate(out, r)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles += [m.register_forward_hook(post) for m in residual_parts(layer)[1]]
    return handles


def eog_ids(tok, model) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    ids.add(tok.eos_token_id)
    vocab = tok.get_vocab()
    ids.update(vocab[n] for n in EOG_NAMES if n in vocab)
    return sorted(i for i in ids if i is not None)


def generate(tok, model, prompts: list[str], max_tokens: int, batch_size: int):
    """Greedy answers and the number of tokens each generated before its end-of-generation token."""
    stop = eog_ids(tok, model)
    answers, counts = [], []
    for s in range(0, len(prompts), batch_size):
        enc = encode(tok, prompts[s:s + batch_size])
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=stop)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            n = next((j for j, t in enumerate(row) if t in stop), len(row))
            answers.append(tok.decode(row[:n], skip_special_tokens=True))
            counts.append(n)
    return answers, counts


def save_npz(path: str, **arrays) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(args, spec) -> None:
    import transformers

    t0 = time.perf_counter()
    tok, model = load(args.gguf, args.threads)
    t_load = time.perf_counter()
    with torch.inference_mode():
        bad, n_bad = class_means(tok, model, spec["harmful"], args.batch_size)
        good, n_good = class_means(tok, model, spec["harmless"], args.batch_size)
        directions = (bad - good).float()
        t_extract = time.perf_counter()

        r = directions[POINTS.index(spec["point"]), spec["layer"]]
        r = r / r.norm()
        handles = add_ablation(model, r)
        try:
            answers, counts = generate(tok, model, spec["generate"], spec["max_tokens"], args.gen_batch_size)
        finally:
            for h in handles:
                h.remove()
    t_end = time.perf_counter()

    seconds = {"load": t_load - t0, "extract": t_extract - t_load, "generate": t_end - t_extract, "total": t_end - t0}
    save_npz(args.out, directions=directions.numpy(), points=np.array(POINTS), seconds=np.array(json.dumps(seconds)),
             answers=np.array(json.dumps(answers)), generated_tokens=np.array(counts, dtype=np.int64),
             n_prompt_tokens=np.array(n_bad + n_good), torch_version=np.array(torch.__version__),
             transformers_version=np.array(transformers.__version__))
    print(json.dumps({"seconds": {k: round(v, 3) for k, v in seconds.items()}, "n_prompt_tokens": n_bad + n_good,
                      "generated_tokens": sum(counts), "peak_rss_mb": round(peak_rss_mb(), 1),
                      "threads": args.threads, "batch_size": args.batch_size}))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| / |b| over the rows (last dim is the vector)."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def mlp_branch(layer, mid: torch.Tensor) -> torch.Tensor:
    """What the block adds to the mid residual."""
    norm, outs = residual_parts(layer)
    y = layer.mlp(norm(mid))
    return y if outs[-1] is layer.mlp else outs[-1](y)


def self_check(args, spec) -> None:
    """Check the hooks against output_hidden_states, padding invariance, and that ablation leaves no r."""
    nh = len(spec["harmful"][:4])
    prompts = spec["harmful"][:4] + spec["harmless"][:4]
    tok, model = load(args.gguf, args.threads)
    layers = model.model.layers
    n = len(layers)
    results = {}
    with torch.inference_mode():
        cap = LastToken(model)
        batch_rows, _ = cap(model, encode(tok, prompts))
        singles, hidden = [], []
        for p in prompts:
            rows, out = cap(model, encode(tok, [p]), output_hidden_states=True)
            singles.append(rows[:, :, 0].clone())
            hidden.append(torch.stack([h[0, -1] for h in out.hidden_states]))  # [L + 1, E]
        cap.remove()  # before calling norms and MLPs by hand below
        single_rows = torch.stack(singles, 2)  # [3, L, B, E]
        pre, mid, post = single_rows.transpose(1, 2)  # each [B, L, E]
        hs = torch.stack(hidden)  # [B, L + 1, E]
        # hidden_states[i] is layer i's input, hidden_states[i + 1] its output (final-normed for the last layer)
        results["pre_vs_hidden_states"] = rel(pre, hs[:, :n])
        post_normed = torch.cat([post[:, :-1], model.model.norm(post[:, -1:])], 1)
        results["post_vs_hidden_states"] = rel(post_normed, hs[:, 1:])
        # the MLP acts per token, so post = mid + MLP(norm(mid)) can be checked at the last token alone
        mlp_out = torch.stack([mlp_branch(layers[i], mid[:, i]) for i in range(n)], 1)
        results["mid_plus_mlp_vs_post"] = rel(mid + mlp_out, post)
        results["left_padded_vs_single"] = rel(batch_rows, single_rows)
        print("prompt lengths:", encode(tok, prompts)["attention_mask"].sum(1).tolist(), file=sys.stderr)

        # ablation: a direction from these prompts; watch each layer's (already ablated) input and its output
        diff = single_rows[:, :, :nh].double().mean(2) - single_rows[:, :, nh:].double().mean(2)
        r = diff[POINTS.index(spec["point"]), spec["layer"]].float()
        r = r / r.norm()
        results["r_share_before_ablation"] = float(((single_rows @ r).abs() / single_rows.norm(dim=-1)).max())
        worst = {"in": 0.0, "out": 0.0}

        def watch(kind, get):
            def hook(module, *a):
                h = get(*a)[:, -1]  # the newest position: the prompt's last token, then each generated token
                worst[kind] = max(worst[kind], float(((h @ r).abs() / h.norm(dim=-1)).max()))
            return hook

        handles = add_ablation(model, r)
        for layer in layers:  # registered after the ablation hooks, so they see the ablated input
            handles.append(layer.register_forward_pre_hook(watch("in", hidden_in), with_kwargs=True))
            handles.append(layer.register_forward_hook(watch("out", lambda args, out: hidden_out(out))))
        answers, counts = generate(tok, model, spec["generate"][:2], spec.get("max_tokens", 8), 2)
        for h in handles:
            h.remove()
        results["r_share_layer_inputs_ablated"] = worst["in"]
        results["r_share_layer_outputs_ablated"] = worst["out"]

    limits = {"pre_vs_hidden_states": 1e-6, "post_vs_hidden_states": 1e-6, "mid_plus_mlp_vs_post": 1e-5,
              "left_padded_vs_single": 1e-4, "r_share_layer_inputs_ablated": 1e-5,
              "r_share_layer_outputs_ablated": 1e-5}
    failed = [k for k, lim in limits.items() if not results[k] <= lim]
    for k, v in results.items():
        verdict = "" if k not in limits else ("FAIL" if k in failed else "ok") + f" (limit {limits[k]:g})"
        print(f"{k:32s} {v:.3e} {verdict}")
    print("ablated answers:", json.dumps(answers), "tokens:", counts)
    sys.exit(1 if failed else 0)


def tiny_spec() -> dict:
    from pysteer import datasets

    return {"harmful": datasets.load("harmful", "train")[:4], "harmless": datasets.load("harmless", "train")[:4],
            "generate": datasets.load("harmful", "test")[:2], "layer": 14, "point": "post", "max_tokens": 8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--spec", help="JSON spec (optional with --self-check)")
    ap.add_argument("--out", help="result .npz")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per extraction forward pass")
    ap.add_argument("--gen-batch-size", type=int, default=32, help="prompts per generate call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--self-check", action="store_true", help="verify the hooks on a tiny spec and exit")
    args = ap.parse_args()
    spec = json.loads(open(args.spec).read()) if args.spec else None
    if args.self_check:
        self_check(args, spec or tiny_spec())
    if spec is None or not args.out:
        ap.error("--spec and --out are required")
    if spec["point"] not in POINTS:
        ap.error(f"spec point must be one of {POINTS}")
    run(args, spec)


if __name__ == "__main__":
    main()

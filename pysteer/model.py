"""Loading a GGUF model into llama-cpp-python with pysteer's hook on its context."""

from __future__ import annotations

import ctypes
import os
import pathlib
from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaModel
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from . import _lib, generation, hookpoints, models, steering
from ._gguf import Header, read_header

Message = dict
Prompt = Union[str, Sequence[Message]]


class ModelLoadError(ValueError):
    """The file is not a GGUF model llama.cpp can load."""


def _read_header(path: pathlib.Path) -> Header:
    """Keys and tensor infos of a GGUF model file, with clear errors for files that are not (whole) GGUF models
    or name no architecture."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        header = read_header(path)
        arch = header.kv.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{path} has no general.architecture key")
        end = header.data_end()
    except ModelLoadError:
        raise
    except Exception as e:  # struct.error, ValueError, KeyError (unknown tensor type) on damaged files
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    if end > path.stat().st_size:
        raise ModelLoadError(f"{path} is truncated: tensor data ends at byte {end}, file has {path.stat().st_size}")
    return header


def resolve_path(model: str | os.PathLike) -> pathlib.Path:
    """A GGUF path, or a registry name (fetched if needed)."""
    path = pathlib.Path(model).expanduser()
    if path.is_file():
        return path
    if isinstance(model, str) and model in models.REGISTRY:
        return models.fetch(model)
    if path.exists():
        raise ModelLoadError(f"{path} is not a file")
    raise FileNotFoundError(
        f"no model file {str(model)!r}, and it is not a registry name ({', '.join(models.REGISTRY)})"
    )


class Model:
    """A GGUF model and one llama.cpp context whose eval callback is pysteer's hook.

    Build it with :func:`pysteer.load`. The context uses a unified KV cache so that prompts decoded together
    keep batch order in every ubatch (the hook maps rows to prompts from that order). ``n_ctx`` bounds one
    prompt (plus generated tokens); ``n_batch`` is the token budget for packing several prompts into one
    decode (a longer prompt is decoded alone); ``n_seq_max`` bounds prompts per decode. ``repack=True`` turns
    on llama.cpp's CPU weight repacking: off by default because it costs memory and slowed prompt evaluation
    on the machine measured; it did speed up decoding one sequence token by token (BENCHMARKS.md).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_ubatch: int = 512,
        n_batch: int = 512,
        n_seq_max: int = 64,
        flash_attn: bool | None = None,
        repack: bool = False,
        hook: bool = True,
        verbose: bool = False,
        llama: "llama_cpp.Llama | None" = None,
    ):
        for name, value, lo in (("n_ctx", n_ctx, 1), ("n_ubatch", n_ubatch, 1), ("n_batch", n_batch, 1),
                                ("n_seq_max", n_seq_max, 1)):
            if not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be a positive int, not {value!r}")
        if n_seq_max > 256:
            raise ValueError("n_seq_max must be at most 256 (llama.cpp's LLAMA_MAX_SEQ)")
        self.path = pathlib.Path(path)
        self._header = _read_header(self.path)  # tensor layout, also for building LoRA adapters
        self.arch = self._header.kv["general.architecture"]
        hookpoints.check_arch(self.arch)
        _lib.set_verbose(verbose)
        self.verbose = verbose
        self._owns_model = llama is None
        if llama is None:
            mparams = llama_cpp.llama_model_default_params()
            mparams.n_gpu_layers = n_gpu_layers
            # llama.cpp's CPU weight repacking ("extra buffer types") copies most quantized weights into
            # anonymous memory while the file stays mapped and paged in: +600 MB on the 1.5B Q4_K_M model. On
            # the project's x86 VM prompt evaluation was slower with it (174 vs 222 tok/s), single-sequence
            # decode faster (24.3 vs 21.8 tok/s); BENCHMARKS.md.
            mparams.use_extra_bufts = repack
            try:
                self._model = LlamaModel(path_model=str(self.path), params=mparams, verbose=verbose)
            except ValueError as e:
                raise ModelLoadError(f"llama.cpp could not load {self.path}: {e}") from None
        else:
            self._model = llama._model
            self._llama = llama  # keep the Llama (and so its weights) alive as long as this context
        m = self._model.model
        self.n_layers = int(llama_cpp.llama_model_n_layer(m))
        self.n_embd = int(llama_cpp.llama_model_n_embd(m))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._model.vocab))
        self.n_ctx = n_ctx
        self.n_ubatch = min(n_ubatch, n_ctx)
        # Token budget when packing prompts into one llama_decode: every prompt attends over the whole unified
        # cache (masked), so small packs waste less (0.5B capture: 139 tok/s at 4096, 207 at 512).
        self.n_batch = min(n_batch, n_ctx)
        self.n_seq_max = n_seq_max
        self.n_threads = n_threads or os.cpu_count() or 1
        self.metadata = self._model.metadata()
        self._formatter = None
        self._steering = steering.Steering()
        self._cvec_active = self._lora_active = False
        self._lora_adapters: dict[bytes, int] = {}  # directions -> llama_adapter_lora pointer

        self._hook = _lib.new_hook(self.n_embd) if hook else None
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx  # one llama_decode may span several ubatches
        cparams.n_ubatch = self.n_ubatch
        cparams.n_seq_max = n_seq_max
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.kv_unified = True
        # llama.cpp's default (auto: on where the backend has the kernel). Measured on Qwen 0.5B (2 CPU cores):
        # packed prompt evaluation +12%, batched generation +18%. It makes activations depend slightly on the
        # rest of the batch (tiny F32 models ~1e-3 of the scale, none without it), but on a Q4_K model the
        # quantized matmuls already do (16 prompts packed vs one at a time: largest row difference 2.5% of the
        # row's scale off, 3.3% on): exactness tests turn it off.
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.no_perf = True
        if self._hook is not None:
            # Addresses of C functions: these CFUNCTYPE objects own no thunk; kept for clarity of lifetime.
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._hook.callback_address)
            self._abort = llama_cpp.ggml_abort_callback(self._hook.abort_address)
            cparams.cb_eval, cparams.cb_eval_user_data = self._cb, self._hook.user_data
            cparams.abort_callback, cparams.abort_callback_data = self._abort, self._hook.user_data
        with suppress_stdout_stderr(disable=verbose):  # e.g. "n_ctx_seq > n_ctx_train" warnings
            self._ctx = llama_cpp.llama_init_from_model(m, cparams)
        if not self._ctx:
            self.close()
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={n_ctx}); try a smaller n_ctx")
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        if self._hook is not None and n_gpu_layers != 0 and _lib.cuda_kernels_usable():
            self._hook.use_cuda_kernels(True)

    # -- lifetime ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context, then adapters, then the model (if this object loaded it)."""
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
        self._ctx = None
        for adapter in getattr(self, "_lora_adapters", {}).values():
            llama_cpp.llama_adapter_lora_free(adapter)
        self._lora_adapters = {}
        if getattr(self, "_owns_model", False) and getattr(self, "_model", None) is not None:
            self._model.close()
        self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"<pysteer.Model {self.path.name} arch={self.arch} layers={self.n_layers} n_embd={self.n_embd}>"

    # -- text -------------------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_special, parse_special)

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (llama-cpp-python's LlamaModel.token_to_piece returns a padded buffer)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._model.detokenize(list(tokens)).decode("utf-8", errors="replace")

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def apply_chat_template(self, prompt: Prompt, *, template: str | None = None) -> str:
        """The prompt rendered with the GGUF's chat template, ending with the assistant's turn opening."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if template is None:
            if self._formatter is None:
                if not self.chat_template:
                    raise ValueError(f"{self.path.name} has no chat template; pass chat_template=False")
                self._formatter = self._make_formatter(self.chat_template)
            formatter = self._formatter
        else:
            formatter = self._make_formatter(template)
        return formatter(messages=messages).prompt

    def _make_formatter(self, template: str) -> Jinja2ChatFormatter:
        vocab = self._model.vocab

        def text(tok: int) -> str:
            return llama_cpp.llama_vocab_get_text(vocab, tok).decode("utf-8", "replace") if tok >= 0 else ""

        return Jinja2ChatFormatter(template, eos_token=text(llama_cpp.llama_vocab_eos(vocab)),
                                   bos_token=text(llama_cpp.llama_vocab_bos(vocab)))

    def encode(self, prompt: Prompt, *, chat_template: bool | str = True) -> list[int]:
        """Tokens for one prompt: templated (special tokens parsed, BOS from the template) or raw text."""
        if chat_template is False:
            if not isinstance(prompt, str):
                raise ValueError("chat messages need chat_template=True")
            return self.tokenize(prompt, add_special=True, parse_special=False)
        template = chat_template if isinstance(chat_template, str) else None
        return self.tokenize(self.apply_chat_template(prompt, template=template), add_special=False,
                             parse_special=True)

    # -- decoding ---------------------------------------------------------------------------------------------
    def _decode(self, seqs: Sequence[Sequence[int]], outputs: np.ndarray, *, start: int = 0) -> None:
        """Decode token lists as separate sequences (ids 0..n-1); ``outputs`` flags batch rows. From an empty
        cache, or with ``start`` > 0 on top of a prefix of that length shared by all (:meth:`_decode_prefix`)."""
        n = sum(len(s) for s in seqs)
        b = self._batch
        b.n_tokens = n
        tok = np.ctypeslib.as_array(b.token, shape=(n,))
        pos = np.ctypeslib.as_array(b.pos, shape=(n,))
        nsid = np.ctypeslib.as_array(b.n_seq_id, shape=(n,))
        logits = np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n,))
        tok[:] = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
        pos[:] = np.concatenate([np.arange(start, start + len(s), dtype=np.int32) for s in seqs])
        nsid[:] = 1
        logits[:] = 0
        logits[outputs] = 1
        i = 0
        for k, s in enumerate(seqs):
            for _ in range(len(s)):
                b.seq_id[i][0] = k
                i += 1
        if start == 0:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _decode_prefix(self, prefix: Sequence[int], n_seqs: int) -> None:
        """Decode ``prefix`` once, from an empty cache, and share its KV cells with sequences 0..n_seqs-1.

        Chat-templated prompts begin with the same system block (24 of a harmful prompt's 42 tokens on Qwen2.5),
        so this saves that much of every prompt evaluation. The cells are shared, not copied (unified cache)."""
        self._decode([prefix], np.array([len(prefix) - 1]))
        mem = llama_cpp.llama_get_memory(self._ctx)
        for k in range(1, n_seqs):
            llama_cpp.llama_memory_seq_cp(mem, 0, k, -1, -1)

    def _decode_step(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int]) -> None:
        """Decode one new token per sequence on top of the cache; every row is an output."""
        n = len(tokens)
        b = self._batch
        b.n_tokens = n
        for i in range(n):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tokens[i], positions[i], 1, True
            b.seq_id[i][0] = seq_ids[i]
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def _logits_row(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise RuntimeError(f"no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def capture(self, prompts, layers=None, points=("pre", "mid", "post"), positions: int = 1,
                chat_template: bool | str = True, *, return_logits: bool = False, progress: bool = False):
        """Residual activations ``[len(prompts), len(points), len(layers), positions, n_embd]`` (float32)
        at the last ``positions`` tokens of each prompt; see :func:`pysteer.capture.capture`."""
        from .capture import capture

        return capture(self, prompts, layers=layers, points=points, positions=positions,
                       chat_template=chat_template, return_logits=return_logits, progress=progress)

    def logits_batch(self, prompts, positions: int = 1, chat_template: bool | str = True, *,
                     progress: bool = False) -> np.ndarray:
        """Logits at the last ``positions`` tokens of many prompts, ``[len(prompts), positions, n_vocab]``,
        decoded together as :meth:`capture` decodes them."""
        from .capture import logits

        return logits(self, prompts, positions=positions, chat_template=chat_template, progress=progress)

    def logits(self, prompt: Prompt, chat_template: bool | str = True) -> np.ndarray:
        """Next-token logits after ``prompt`` (float32 ``[n_vocab]``)."""
        return self.logits_batch([prompt], chat_template=chat_template)[0, -1]


    # -- steering and generation -----------------------------------------------------------------------------
    @contextmanager
    def steer(self, *interventions, path: steering.Path = "auto") -> Iterator[steering.Steering]:
        """Within the block, capture / generate / logits run with ``interventions`` (and nothing else).

        ``path``: "auto" runs each intervention natively where that is exact (see pysteer.steering),
        "hook" forces the eval callback, "native" raises where no native path exists. The yielded
        :class:`~pysteer.steering.Steering` says which path each intervention took. On exit the previous
        steering is restored.
        """
        new = steering.plan(self, interventions, path)  # validates everything before changing anything
        previous = self._steering
        steering.install(self, new)
        try:
            yield new
        finally:
            steering.install(self, previous)

    def _lora_adapter(self, directions: np.ndarray):
        from . import lora

        key = np.ascontiguousarray(directions, dtype=np.float32).tobytes()
        if key not in self._lora_adapters:
            path = lora.adapter_path(self, directions)
            with suppress_stdout_stderr(disable=self.verbose):  # per-tensor buffer-type notes on stderr
                adapter = llama_cpp.llama_adapter_lora_init(self._model.model, str(path).encode())
            if not adapter:
                raise RuntimeError(f"llama.cpp could not load the ablation adapter {path}")
            self._lora_adapters[key] = adapter
        return self._lora_adapters[key]

    @property
    def steering(self) -> steering.Steering:
        """The interventions now installed and their paths."""
        return self._steering

    def generate(self, prompt: Prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: Sequence[str] = (), chat_template: bool | str = True,
                 stream: bool = False):
        """Continue ``prompt`` (text or chat messages); with ``stream=True`` an iterator of text pieces."""
        kw = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                  chat_template=chat_template)
        return generation.stream(self, prompt, **kw) if stream else generation.generate(self, prompt, **kw)

    def generate_batch(self, prompts, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int = 0, stop: Sequence[str] = (), chat_template: bool | str = True,
                       progress: bool = False, return_logits: bool = False):
        """Continue many prompts side by side; each prompt's sampling uses its own generator seeded ``seed``.
        With ``return_logits`` returns ``(texts, logits)``, the logits being the next-token logits after each
        prompt, ``[len(prompts), n_vocab]`` (what the first token was sampled from)."""
        first = np.empty((len(prompts), self.n_vocab), np.float32) if return_logits else None
        texts = generation.generate_batch(self, prompts, max_tokens=max_tokens, temperature=temperature,
                                          top_p=top_p, seed=seed, stop=stop, chat_template=chat_template,
                                          progress=progress, first_logits=first)
        return (texts, first) if return_logits else texts


def load(model, n_ctx: int = 4096, n_threads: int | None = None, n_gpu_layers: int = 0, **kwargs) -> Model:
    """A :class:`Model` from a GGUF path, a registry name (see ``pysteer models list``) or a ``llama_cpp.Llama``.

    With a ``Llama``, its loaded weights are shared and pysteer adds a context of its own (llama.cpp takes the
    eval callback only when a context is created).
    """
    if isinstance(model, llama_cpp.Llama):
        return Model(model.model_path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                     llama=model, **kwargs)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path, a registry name or a llama_cpp.Llama, not {type(model).__name__}")
    return Model(resolve_path(model), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, **kwargs)

"""The Model: a GGUF loaded by llama-cpp-python with one context whose eval callback is pysteer's hook.

Its public decode surface (prompts to tokens, packed decodes, logits rows, capture watches, steering) is what
capture, generation, judging and steering are built on; no other module touches the context or the hook.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import pathlib
import subprocess
import sys
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import jinja2
import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaModel
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from . import generation, hookpoints, lora, models, native, params, steering
from ._pypi import cache_root
from .gguf_io import Header, read_header
from .native import HookError

Message = dict
Prompt = Union[str, Sequence[Message]]
#: How a prompt becomes text, everywhere in pysteer: True or "chat" the GGUF's chat template; False or "none"
#: the raw text; "newline" the raw text and a newline; any other string a Jinja chat template.
Template = Union[bool, str]
TEMPLATE_NAMES = ("chat", "none", "newline")


def _messages(prompt) -> list[dict]:
    """A prompt as chat messages: a str is one user message; otherwise a list of {"role": str, "content": str}."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return list(prompt)
    raise ValueError(f"a prompt is a str or a non-empty list of {{'role': str, 'content': str}} messages, not "
                     f"{prompt!r:.80}")


def prompt_list(prompts, name: str = "prompts") -> list:
    """``prompts`` as a list: a bare str or chat (iterating it would make one prompt a character) is refused."""
    if isinstance(prompts, (str, bytes, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and all(isinstance(m, dict) for m in prompts)):
        raise ValueError(f"{name} must be a list of prompts; wrap a single prompt in a list (a chat too)")
    return list(prompts)


def paired_lists(prompts, answers) -> tuple[list, list[str]]:
    """Prompts and their answers as two lists of one length, every answer a str (a bare str is refused)."""
    prompts = prompt_list(prompts)
    if isinstance(answers, (str, bytes)):
        raise ValueError("answers must be a list of str; wrap a single answer in a list")
    answers = list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    bad = next((i for i, a in enumerate(answers) if not isinstance(a, str)), None)
    if bad is not None:
        raise ValueError(f"answer {bad} is a {type(answers[bad]).__name__}, not a str")
    return prompts, answers


def check_template(template: Template) -> Template:
    """The canonical form of ``template`` ("chat", "none", "newline" or a Jinja string)."""
    if template is True or template is False:
        return "chat" if template else "none"
    if isinstance(template, str) and (template in TEMPLATE_NAMES or "{{" in template or "{%" in template):
        return template
    raise ValueError(f"template must be True/'chat', False/'none', 'newline' or a Jinja chat template, "
                     f"not {template!r}")


class ModelLoadError(ValueError):
    """The file is not a GGUF model llama.cpp can load."""


#: llama.cpp's LLAMA_MAX_LAYERS.
MAX_LAYERS = 512
#: Largest context pysteer creates: llama.cpp keeps n_ctx in 32 bits, and the batch pysteer allocates holds
#: n_ctx tokens (21 bytes each).
MAX_CTX = 1 << 24


def _exclusive(method):
    """Run a Model method that decodes holding the model (see :meth:`Model.exclusive`)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.exclusive():
            return method(self, *args, **kwargs)
    return locked


def _locked(method):
    """Run a Model method that only reads the vocabulary: under the lock (so close() cannot race it) and open,
    but allowed while a stream is live."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            self._open()
            return method(self, *args, **kwargs)
    return locked


def _read_header(path: pathlib.Path, *, probe: bool = True) -> Header:
    """Keys and tensor infos of a GGUF model file, with clear errors for files that are not (whole) GGUF models
    or name no architecture; with ``probe``, llama.cpp tries the file in a child process first."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        header = read_header(path)
        arch = header.kv.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{path} has no general.architecture key")
        hookpoints.check_arch(arch)
        # llama.cpp asserts (aborting the process) on a layer count outside 1..LLAMA_MAX_LAYERS
        n_layers = header.kv.get(f"{arch}.block_count")
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= MAX_LAYERS:
            raise ModelLoadError(f"{path} declares {arch}.block_count = {n_layers!r}; a model has 1..{MAX_LAYERS}")
        bad = [k for k, v in header.kv.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:  # e.g. a NaN norm epsilon: llama.cpp asserts on it at the first decode
            raise ModelLoadError(f"{path} has non-finite values in {', '.join(bad)}")
        end = header.data_end()
    except (ModelLoadError, hookpoints.UnsupportedArchitectureError):
        raise
    except Exception as e:  # struct.error, ValueError, KeyError (unknown tensor type) on damaged files
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    if end > path.stat().st_size:
        raise ModelLoadError(f"{path} is truncated: tensor data ends at byte {end}, file has {path.stat().st_size}")
    if probe:
        _probe(path)
    return header


_PROBE = """
import sys, llama_cpp
quiet = llama_cpp.llama_log_callback(lambda *a: None)  # kept referenced: llama.cpp calls it later
llama_cpp.llama_log_set(quiet, None)
mp = llama_cpp.llama_model_default_params()
mp.n_gpu_layers, mp.use_extra_bufts = 0, False
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), mp)
if not model:
    sys.exit(3)
cp = llama_cpp.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = 16
cp.n_seq_max, cp.n_threads, cp.n_threads_batch = 1, 1, 1
ctx = llama_cpp.llama_init_from_model(model, cp)
if not ctx:
    sys.exit(3)
batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(0), 1)
sys.exit(0 if llama_cpp.llama_decode(ctx, batch) == 0 else 3)
"""


def _probe(path: pathlib.Path) -> None:
    """Let llama.cpp load the model, build a context and decode one token in a child process first: on metadata
    it cannot accept (an expert count without experts, an unknown rope scaling or tokenizer, ...) it aborts the
    whole process instead of returning an error, and that must not be ours. Done once per file (path, size,
    mtime), remembered under $PYSTEER_CACHE/probed; about 0.5 s on a tiny model, a few seconds on a large one."""
    st = path.stat()
    key = hashlib.sha256(f"v1|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    stamp = cache_root() / "probed" / key
    if stamp.is_file():
        return
    r = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True)
    if r.returncode not in (0, 3):  # 3: an ordinary load error, which the real load reports
        last = [line for line in r.stderr.strip().splitlines() if line.strip()]
        raise ModelLoadError(f"llama.cpp cannot use {path}: it aborted the process that tried "
                             f"({last[-1] if last else f'exit status {r.returncode}'})")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:  # a read-only cache only costs the probe next time
        pass


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


class _Claim:
    """A steer() block's or a stream's claim on a Model, held by the generator that owns it. The Model keeps only a
    weak reference: a claim whose release a Ctrl-C skipped dies with its generator and is dropped (_heal)."""


def _alive(ref):
    """The object behind a weak reference (None for none or a dead one)."""
    return ref() if ref is not None else None


class _Handles:
    """The llama.cpp objects one Model made (context, batch, LoRA adapters), freed once and before the weights
    they use: by the Model's close, or by a callback on the weights' own close. The callback holds this, not the
    Model: the cyclic GC may finalize the weights first (it clears weak references before finalizers), and a
    context or adapter freed after its model is a double free."""

    def __init__(self, lock):
        self.lock, self.ctx, self.batch, self.adapters = lock, None, None, None

    def free(self) -> None:
        with self.lock:
            if self.batch is not None:
                llama_cpp.llama_batch_free(self.batch)
                self.batch = None
            if self.ctx:
                llama_cpp.llama_free(self.ctx)
            self.ctx = None
            if self.adapters is not None:  # after the context that may use one
                self.adapters.close()
                self.adapters = None


class Model:
    """A GGUF model and one llama.cpp context whose eval callback is pysteer's hook.

    Build it with :func:`pysteer.load`. The context uses a unified KV cache so that prompts decoded together
    keep batch order in every ubatch (the hook maps rows to prompts from that order). ``n_ctx`` bounds one
    prompt (plus generated tokens); ``n_batch`` is the token budget for packing several prompts into one
    decode (a longer prompt is decoded alone); ``n_seq_max`` bounds prompts per decode. ``repack=True`` turns
    on llama.cpp's CPU weight repacking: off by default because it costs memory and slowed prompt evaluation
    on the machine measured; it did speed up decoding one sequence token by token (BENCHMARKS.md).

    States: open until :meth:`close` (then every call raises ValueError). One lock: calls from several threads
    are serialised (a capture, a batched generation or a steering change runs whole before the next starts),
    and while a ``stream=True`` generation is live, other calls that decode are refused with ValueError.
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
        self._lock = threading.RLock()
        self._h = _Handles(self._lock)
        self._stream = self._inside = None  # the live stream's claim (weak), and the one whose step is running
        self._depth = 0  # exclusive() blocks open (0: no call of this Model is running, so _heal may run)
        self._watching = False  # a capture's watch is on the hook
        self._callback: str | None = None  # the user callback running inside a decode sequence, if any
        n_ctx = params.integer("n_ctx", n_ctx, 1, MAX_CTX)
        for name, value in (("n_ubatch", n_ubatch), ("n_batch", n_batch), ("n_seq_max", n_seq_max)):
            params.integer(name, value, 1)
        if n_seq_max > 256:
            raise ValueError("n_seq_max must be at most 256 (llama.cpp's LLAMA_MAX_SEQ)")
        if n_threads is not None:
            params.integer("n_threads", n_threads, 1, 1024)
        params.integer("n_gpu_layers", n_gpu_layers, -1)
        self.path = pathlib.Path(path)
        # tensor layout, also for building LoRA adapters; a Llama given has already loaded the file: no probe
        self._header = _read_header(self.path, probe=llama is None)
        self.arch = self._header.kv["general.architecture"]
        native.set_verbose(verbose)
        self.verbose = verbose
        self._sha256: str | None = None
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
            if getattr(llama, "_model", None) is None or llama._model.model is None:
                raise ModelLoadError("this llama_cpp.Llama is closed")
            lm = llama._model.model
            loaded = getattr(llama._model, "path_model", None)  # relative to the cwd of its load: checked if found
            if loaded is not None and os.path.isfile(loaded) and not os.path.samefile(loaded, self.path):
                # the header read above (tensor layout, LoRA adapters) must be the loaded weights' own
                raise ValueError(f"this llama_cpp.Llama loaded {loaded}, not {self.path}; pass its own path (or use "
                                 "pysteer.load(llama))")
            if llama_cpp.llama_model_n_layer(lm) < 1 or llama_cpp.llama_model_n_embd(lm) < 1:
                raise ModelLoadError("this llama_cpp.Llama has no weights (vocab_only=True?): load it with its "
                                     "weights")
            self._model = llama._model
            self._llama = llama  # keep the Llama (and so its weights) alive as long as this context
        # whoever closes the weights (llm.close(), the GC) frees our context first, as llama-cpp-python does its own
        self._model._exit_stack.callback(self._h.free)
        m = self._model.model
        self.n_layers = int(llama_cpp.llama_model_n_layer(m))
        self.n_embd = int(llama_cpp.llama_model_n_embd(m))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._model.vocab))
        self.n_ctx = n_ctx
        self.n_ubatch = min(n_ubatch, n_ctx)
        # Token budget when packing prompts into one llama_decode: every prompt attends over the whole unified
        # cache (masked), so small packs waste less (0.5B capture: 139 tok/s at 4096, 207 at 512).
        self.n_batch = min(n_batch, n_ctx)
        # llama.cpp asserts when a context has more sequences than cells (n_ctx < n_seq_max aborted the process)
        self.n_seq_max = n_seq_max = min(n_seq_max, n_ctx)
        self.n_threads = n_threads or os.cpu_count() or 1
        try:
            self.metadata = self._model.metadata()
        except UnicodeDecodeError as e:
            self.close()
            raise ModelLoadError(f"{self.path} has metadata that is not UTF-8 ({e})") from None
        self._formatters: dict[str, Jinja2ChatFormatter] = {}
        self._steering = steering.Steering()
        self._steer_stack: list[tuple[weakref.ref, steering.Steering]] = []  # open steer() blocks, innermost last
        self._installed = True
        self._cvec_active = False
        self._track_rows = False  # a hook op needs each decode's output rows (BlockAblate)
        self._prefix = None  # the tokens whose KV cells decode_prefix left in the cache (None after any change)
        self._h.adapters = lora.Adapters(m, verbose=verbose)

        self._hook = native.Hook(self.n_embd) if hook else None
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
            self._hook.context_params(cparams)
        with suppress_stdout_stderr(disable=verbose):  # e.g. "n_ctx_seq > n_ctx_train" warnings
            self._h.ctx = llama_cpp.llama_init_from_model(m, cparams)
        if not self._ctx:
            self.close()
            raise ModelLoadError(f"llama.cpp could not create a context with n_ctx={n_ctx} (out of memory?); "
                                 "try a smaller n_ctx")
        self._h.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        if self._hook is not None and n_gpu_layers != 0 and native.cuda_kernels_usable():
            self._hook.use_cuda_kernels(True)

    # -- lifetime ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context, then adapters, then the model (if this object loaded it). Idempotent; afterwards
        every call raises ValueError."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            self._free()

    def _free(self) -> None:
        self._h.free()
        if getattr(self, "_owns_model", False) and getattr(self, "_model", None) is not None:
            self._model.close()
        self._model = None

    @property
    def _ctx(self):
        return self._h.ctx

    @property
    def _batch(self):
        return self._h.batch

    @property
    def _adapters(self):
        return self._h.adapters

    def _open(self):
        """The context, or a clear error once the model is closed."""
        if not getattr(self, "_ctx", None):
            raise ValueError(f"{self!r} is closed; load the model again")
        return self._ctx

    @property
    def closed(self) -> bool:
        return not getattr(self, "_ctx", None)

    @contextmanager
    def exclusive(self, stream=None) -> Iterator[None]:
        """Hold the model for a sequence of decodes (other threads wait; re-entrant in this thread). Refused
        while a stream is live, except for that stream's own steps (``stream`` = its token)."""
        with self._lock:
            self._open()
            if self._outermost():
                self._heal()
            if self._callback is not None:  # it would overwrite the KV cache and logits the caller still reads
                raise ValueError(f"{self._callback} may not decode or steer on the Model that calls it (use another "
                                 "Model)")
            live = _alive(self._stream)
            if live is not None and stream is not live and self._inside is not live:
                raise ValueError("a streaming generation is live on this Model: exhaust it or close() the "
                                 "generator first (or use another Model)")
            outer = self._inside
            try:
                self._depth += 1
                self._inside = stream if stream is not None else outer
                yield
            finally:
                self._depth -= 1
                self._inside = outer

    def _outermost(self) -> bool:
        """Whether no other block of this Model is open in this thread (the lock is held once, by the caller)."""
        count = getattr(self._lock, "_recursion_count", None)  # Python >= 3.11: cannot be left wrong by a Ctrl-C
        return count() == 1 if count is not None else self._depth <= 0

    def _heal(self) -> None:
        """Undo what a Ctrl-C between two bookkeeping statements of a block's exit left behind, before the next
        call (no block of this Model is open then): a capture's watch on the hook, a callback's mark, an
        installed steering that is not the open steer() blocks'."""
        self._depth, self._inside, self._callback = 0, None, None
        if _alive(self._stream) is None:
            self._stream = None
        self._steer_stack[:] = [e for e in self._steer_stack if _alive(e[0]) is not None]
        if self._watching:
            self._prefix = None  # a stopped capture left cells uncomputed
            self._hook.unwatch()
            self._watching = False
        self._settle()

    @contextmanager
    def callback(self, name: str) -> Iterator[None]:
        """Run a user callback (``name`` for the error) inside a decode sequence: it may tokenize, not decode or
        steer (entering steer() is refused; leaving a block, which cannot be, is found here and raised)."""
        with self._lock:
            outer, steering_before = self._callback, self._steering
            try:  # set inside: a Ctrl-C right after it must still be undone
                self._callback = name
                yield
            finally:
                self._callback = outer
            if self._steering is not steering_before:
                raise ValueError(f"{name} changed the steering of the Model that calls it (a steer() block ended "
                                 "inside it): the answers would mix two steerings")

    @contextmanager
    def streaming(self) -> Iterator[object]:
        """Claim the model's KV cache for one stream until the block ends; yields the token its steps pass to
        :meth:`exclusive`. A second live stream is refused."""
        token = _Claim()
        try:  # claimed inside: a Ctrl-C right after claiming must still release it
            with self.exclusive():
                self._stream = weakref.ref(token)
            yield token
        finally:
            if _alive(self._stream) is token:  # no lock needed: no other stream can claim the Model meanwhile
                self._stream = None

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
        state = " closed" if self.closed else ""
        return (f"<pysteer.Model {self.path.name} arch={getattr(self, 'arch', '?')} "
                f"layers={getattr(self, 'n_layers', '?')} n_embd={getattr(self, 'n_embd', '?')}{state}>")

    # -- the file ---------------------------------------------------------------------------------------------
    @property
    def header(self) -> Header:
        """Keys and tensor layout of the GGUF file, as read at load."""
        return self._header

    @property
    def sha256(self) -> str:
        """sha256 of the model file (from the registry's verified stamp when there is one), computed once."""
        if self._sha256 is None:
            self._sha256 = models.known_sha256(self.path) or _file_sha256(self.path)
        return self._sha256

    @property
    def llama_context(self) -> int:
        """The ``llama_context *`` (for calling llama.cpp directly, from the thread that uses the model)."""
        return self._open()

    @property
    def has_hook(self) -> bool:
        """Whether pysteer's hook is on the context (``hook=False`` at load leaves it off)."""
        return self._hook is not None

    @property
    def hook_stats(self) -> dict:
        """Running counts of the hook: rows edited, data callbacks, seconds inside them ({} without a hook)."""
        return self._hook.stats if self._hook is not None else {}

    @_exclusive
    def use_cuda_kernels(self, on: bool) -> None:
        """Edit device tensors with pysteer's CUDA kernels (on) or through ggml_backend_tensor_get/set and the
        CPU kernel (off); the default is on where both are available and layers are offloaded."""
        if self._hook is None:
            raise ValueError("this Model was created with hook=False")
        self._hook.use_cuda_kernels(on)

    # -- text -------------------------------------------------------------------------------------------------
    @_locked
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        data = text.encode("utf-8")
        # Sized by the text (a token covers at least one byte, plus BOS/EOS), not by the training context as
        # llama-cpp-python's tokenize does (a declared context of 2^31 broke it; 2^31-1 allocated 8 GB a call).
        n = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * n)()
            got = llama_cpp.llama_tokenize(self._model.vocab, data, len(data), buf, n, add_special, parse_special)
            if got >= 0:
                return list(buf[:got])
            if -got <= n:
                raise RuntimeError(f"llama_tokenize failed ({got})")
            n = -got

    def _check_tokens(self, tokens) -> np.ndarray:
        """Token ids as int32, each in [0, n_vocab) (llama.cpp's vocabulary lookups throw, ending the process)."""
        t = np.asarray(tokens)
        if t.size and (t.dtype.kind not in "iu" or t.min() < 0 or t.max() >= self.n_vocab):
            raise ValueError(f"token ids must be ints in [0, {self.n_vocab}), got {np.asarray(tokens).ravel()[:8]}")
        return t.astype(np.int32)

    @_locked
    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (llama-cpp-python's LlamaModel.token_to_piece returns a padded buffer)."""
        return self._piece(int(self._check_tokens([token])[0]), special)

    def _piece(self, token: int, special: bool = False) -> bytes:
        """:meth:`token_bytes` of a checked token, sized by what llama.cpp says it needs."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    @_locked
    def detokenize(self, tokens: Sequence[int]) -> str:
        # each piece whole: llama-cpp-python's detokenize reads pieces into 32 bytes and drops longer ones unsaid
        tokens = self._check_tokens(list(tokens)).tolist()
        out = b"".join(self._piece(t) for t in tokens)
        if tokens and tokens[0] == llama_cpp.llama_vocab_bos(self._model.vocab) and out[:1] == b" ":
            out = out[1:]  # llama-cpp-python's rule, kept: the space a BOS-led Llama-1 prompt gets
        return out.decode("utf-8", errors="replace")

    @_locked
    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @_locked
    def apply_chat_template(self, prompt: Prompt, *, template: str | None = None) -> str:
        """The prompt rendered with the GGUF's chat template (or a Jinja ``template``), ending with the
        assistant's turn opening."""
        messages = _messages(prompt)
        if template is None:
            if not self.chat_template:
                raise ValueError(f"{self.path.name} has no chat template; pass chat_template=False")
            template = self.chat_template
        try:
            if template not in self._formatters:
                self._formatters[template] = self._make_formatter(template)
            return self._formatters[template](messages=messages).prompt
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template cannot render this prompt ({type(e).__name__}: {e}); pass "
                             "chat_template=False for raw text, or a working Jinja template") from None

    def _make_formatter(self, template: str) -> Jinja2ChatFormatter:
        vocab = self._model.vocab

        def text(tok: int) -> str:
            return llama_cpp.llama_vocab_get_text(vocab, tok).decode("utf-8", "replace") if tok >= 0 else ""

        return Jinja2ChatFormatter(template, eos_token=text(llama_cpp.llama_vocab_eos(vocab)),
                                   bos_token=text(llama_cpp.llama_vocab_bos(vocab)))

    @_locked
    def encode(self, prompt: Prompt, *, chat_template: Template = True) -> list[int]:
        """Tokens for one prompt under the template vocabulary (:data:`Template`): templated (special tokens
        parsed, BOS from the template) or raw text (BOS added)."""
        template = check_template(chat_template)
        if template in ("none", "newline"):
            if not isinstance(prompt, str):
                raise ValueError(f"a raw-text prompt is a str, not {type(prompt).__name__} (chat messages need "
                                 "chat_template=True)")
            return self.tokenize(prompt + ("\n" if template == "newline" else ""), add_special=True,
                                 parse_special=False)
        text = self.apply_chat_template(prompt, template=None if template == "chat" else template)
        return self.tokenize(text, add_special=False, parse_special=True)

    @_locked
    def encode_prompts(self, prompts, *, chat_template: Template = True, min_tokens: int = 1,
                       room: int = 0) -> list[list[int]]:
        """Token lists for a list of prompts, each at least ``min_tokens`` long and leaving ``room`` tokens of
        the context free (for generation)."""
        prompts = prompt_list(prompts)
        if not prompts:
            raise ValueError("prompts is empty")
        tokens = [self.encode(p, chat_template=chat_template) for p in prompts]
        for i, t in enumerate(tokens):
            if len(t) < min_tokens:
                raise ValueError(f"prompt {i} has {len(t)} tokens, fewer than positions={min_tokens}")
            if len(t) + room > self.n_ctx:
                if room:
                    raise ValueError(f"prompt {i} ({len(t)} tokens) + max_tokens ({room}) exceed n_ctx={self.n_ctx}")
                raise ValueError(f"prompt {i} has {len(t)} tokens, longer than the context (n_ctx={self.n_ctx})")
        return tokens

    # -- decoding ---------------------------------------------------------------------------------------------
    @_exclusive
    def decode(self, seqs: Sequence[Sequence[int]], outputs: np.ndarray, *, start: int = 0,
               capture: tuple | None = None) -> None:
        """Decode token lists as separate sequences (ids 0..n-1); ``outputs`` flags batch rows whose logits
        are kept. From an empty cache, or with ``start`` > 0 on top of a prefix of that length shared by all
        (:meth:`decode_prefix`). ``capture = (cap_tok, cap_dst, out)``: the hook copies the watched tensors'
        rows of batch tokens ``cap_tok`` to element offsets ``cap_dst`` of ``out`` (see :meth:`watch`)."""
        ctx = self._open()
        n = sum(len(s) for s in seqs)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"a decode takes 1..n_ctx={self.n_ctx} tokens, not {n}")
        b = self._batch
        b.n_tokens = n
        tok = np.ctypeslib.as_array(b.token, shape=(n,))
        pos = np.ctypeslib.as_array(b.pos, shape=(n,))
        nsid = np.ctypeslib.as_array(b.n_seq_id, shape=(n,))
        logits = np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n,))
        tok[:] = self._check_tokens(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]))
        pos[:] = np.concatenate([np.arange(start, start + len(s), dtype=np.int32) for s in seqs])
        nsid[:] = 1
        logits[:] = 0
        logits[outputs] = 1
        i = 0
        for k, s in enumerate(seqs):
            for _ in range(len(s)):
                b.seq_id[i][0] = k
                i += 1
        if capture is not None and self._hook is None:
            raise ValueError("this Model was created with hook=False and cannot capture")
        if start == 0:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            self._prefix = None
        outputs = np.flatnonzero(logits).astype(np.int64)
        self._run(b, capture=(n, outputs, *capture) if capture else self._rows_only(n, outputs))

    @_exclusive
    def decode_prefix(self, prefix: Sequence[int], n_seqs: int) -> None:
        """Decode ``prefix`` once and share its KV cells with sequences 0..n_seqs-1; everything else in the cache
        is dropped.

        Chat-templated prompts begin with the same system block (24 of a harmful prompt's 42 tokens on Qwen2.5),
        so this saves that much of every prompt evaluation. The cells are shared, not copied (unified cache), and
        kept for the next call with the same prefix and the same steering (the next pack of a batch): then only
        the cells after the prefix are dropped."""
        if not 1 <= n_seqs <= self.n_seq_max:
            raise ValueError(f"n_seqs must be in [1, n_seq_max={self.n_seq_max}], not {n_seqs}")
        prefix = [int(t) for t in prefix]
        mem = llama_cpp.llama_get_memory(self._open())
        if self._prefix == prefix:
            llama_cpp.llama_memory_seq_rm(mem, -1, len(prefix), -1)  # every sequence's cells after the prefix
        else:
            self.decode([prefix], np.array([len(prefix) - 1]))
            self._prefix = prefix
        for k in range(1, n_seqs):
            llama_cpp.llama_memory_seq_cp(mem, 0, k, -1, -1)

    @_exclusive
    def decode_step(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int]) -> None:
        """Decode one new token per sequence on top of the cache; every row is an output."""
        n = len(tokens)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"a decode takes 1..n_ctx={self.n_ctx} tokens, not {n}")
        tokens = self._check_tokens(tokens)
        b = self._batch
        b.n_tokens = n
        for i in range(n):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tokens[i], positions[i], 1, True
            b.seq_id[i][0] = seq_ids[i]
        self._run(b, capture=self._rows_only(n, np.arange(n, dtype=np.int64)))

    def _rows_only(self, n: int, outputs: np.ndarray):
        """The plan of a decode that captures nothing: its output rows when an op needs them, else None."""
        if not self._track_rows:
            return None
        return (n, outputs, np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))

    def _run(self, batch, capture=None) -> None:
        """llama_decode (with the hook's capture plan ``(n_tokens, outputs, cap_tok, cap_dst, out)``), then the
        hook's verdict: its recorded error is raised, and the hook re-armed, even when the decode failed or was
        interrupted, so one failure never leaves the next decode aborted."""
        try:
            if capture:
                n, outputs, cap_tok, cap_dst, out = capture
                self._hook.start(n, self.n_ubatch, outputs, cap_tok, cap_dst, out)
            rc = llama_cpp.llama_decode(self._ctx, batch)
        finally:
            err = self._hook.finish() if self._hook is not None else ""
        if err:
            raise HookError(err)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    @_exclusive
    def logits_row(self, i: int) -> np.ndarray:
        """Logits of output row ``i`` of the last decode (a copy, float32 ``[n_vocab]``)."""
        ptr = llama_cpp.llama_get_logits_ith(self._open(), i)
        if not ptr:
            raise RuntimeError(f"no logits for batch row {i}")
        row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        if not (np.isfinite(row).all() and row.any()):  # overflowed activations give NaN or all-zero logits
            what = "all zero" if np.isfinite(row).all() else "not finite"
            raise FloatingPointError(f"the logits of decode row {i} are {what}: the activations overflowed float32 "
                                     f"under the steering {self._steering}; steer less (a smaller alpha or weight)")
        return row

    @contextmanager
    def watch(self, points: Sequence[str], layers: Sequence[int], sample: int, *,
              stop: bool = False) -> Iterator[None]:
        """Within the block (which holds the model), capturing decodes copy ``points`` x ``layers`` rows: (point
        p, layer l) of a token goes to element offset ``(p * len(layers) + l) * sample`` of its slot (one tensor
        may serve several). With ``stop`` every decode in the block computes nothing past the last of those
        tensors: logits are garbage, and so are the later layers' KV cells, which no decode after it reuses."""
        if self._hook is None:
            raise ValueError("this Model was created with hook=False and cannot capture")
        slots: dict[str, list[int]] = {}
        for p, point in enumerate(points):
            for l, layer in enumerate(layers):
                slots.setdefault(hookpoints.tensor_name(self.arch, point, layer), []).append(
                    (p * len(layers) + l) * sample)
        if not points or not layers:
            raise ValueError("watch needs at least one point and one layer")
        last = max(((point, layer) for point in points for layer in layers), key=hookpoints.graph_order)
        with self.exclusive():
            try:  # a Ctrl-C anywhere here leaves the watch flagged at worst, and _heal takes it off
                self._watching = True
                self._hook.watch(list(slots), list(slots.values()), hookpoints.embedding_name(self.arch),
                                 hookpoints.tensor_name(self.arch, *last) if stop else "")
                yield
            finally:
                if stop:
                    self._prefix = None  # its cells past the stop were never computed (first: nothing may skip it)
                self._hook.unwatch()
                self._watching = False

    def capture(self, prompts, layers=None, points=("pre", "mid", "post"), positions: int = 1,
                chat_template: Template = True, *, return_logits: bool = False, progress: bool = False):
        """Residual activations ``[len(prompts), len(points), len(layers), positions, n_embd]`` (float32)
        at the last ``positions`` tokens of each prompt; see :func:`pysteer.capture.capture`."""
        from .capture import capture

        return capture(self, prompts, layers=layers, points=points, positions=positions,
                       chat_template=chat_template, return_logits=return_logits, progress=progress)

    def logits_batch(self, prompts, positions: int = 1, chat_template: Template = True, *,
                     progress: bool = False) -> np.ndarray:
        """Logits at the last ``positions`` tokens of many prompts, ``[len(prompts), positions, n_vocab]``,
        decoded together as :meth:`capture` decodes them."""
        from .capture import logits

        return logits(self, prompts, positions=positions, chat_template=chat_template, progress=progress)

    def logits(self, prompt: Prompt, chat_template: Template = True) -> np.ndarray:
        """Next-token logits after ``prompt`` (float32 ``[n_vocab]``)."""
        return self.logits_batch([prompt], chat_template=chat_template)[0, -1]

    # -- steering and generation -----------------------------------------------------------------------------
    @contextmanager
    def steer(self, *interventions, path: steering.Path = "auto") -> Iterator[steering.Steering]:
        """Within the block, capture / generate / logits run with ``interventions`` (and nothing else).

        ``path``: "auto" runs each intervention natively where that is exact (see pysteer.steering),
        "hook" forces the eval callback, "native" raises where no native path exists. The yielded
        :class:`~pysteer.steering.Steering` says which path each intervention took. On exit the steering
        of the innermost block still open is restored (none once every block has exited, in whatever order).
        Refused while a stream is live (it would change the stream's answer midway).
        """
        entry, claim = None, _Claim()
        try:  # the block is on the stack only inside this try; _heal re-installs what a Ctrl-C cut short
            with self.exclusive():
                new = steering.plan(self, interventions, path)  # validates everything before changing anything
                entry = (weakref.ref(claim), new)
                self._steer_stack.append(entry)
                self._settle()
            yield new
        finally:
            if entry in self._steer_stack:  # first and without the lock: the fewer steps a Ctrl-C can skip
                self._steer_stack.remove(entry)
            with self._lock:
                if not self.closed:
                    self._settle()

    def _settle(self) -> None:
        """Install the steering of the innermost open steer() block (or none), whole: an interrupt in the middle
        of installing is answered by installing it again."""
        if not self._steer_stack and not self._steering.interventions and self._installed:
            return  # already none (a new empty Steering would look like a change to a live stream)
        target = self._steer_stack[-1][1] if self._steer_stack else steering.Steering()
        if target is self._steering and self._installed:
            return
        try:
            self._install(target)
        except BaseException:
            self._install(target)
            raise

    def _install(self, s: steering.Steering) -> None:
        """Make ``s`` the steering of the context: hook ops, control vector and LoRA replaced as a whole."""
        self._installed = False  # until the end: an install cut short is redone, never trusted
        self._prefix = None  # cells computed under other steering
        if self._hook is not None:
            rows = any(op.kind == native.ABLATE_DELTA for op in s.hook_ops)
            self._hook.set_ops([(op.name, op.kind, op.dirs, op.cos, op.sin, op.adaptive, op.slot) for op in s.hook_ops],
                               hookpoints.embedding_name(self.arch) if rows else "")
            self._track_rows = rows
        if s.cvec is not None:
            used = np.nonzero(np.abs(s.cvec).sum(1))[0]
            lo, hi = (int(used.min()), int(used.max())) if used.size else (1, 1)
            data = np.ascontiguousarray(s.cvec[1:].ravel())
            ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = llama_cpp.llama_set_adapter_cvec(self._ctx, ptr, data.size, self.n_embd, max(lo, 1), max(hi, 1))
            if rc != 0:
                raise RuntimeError(f"llama_set_adapter_cvec failed ({rc})")
        elif self._cvec_active:
            llama_cpp.llama_set_adapter_cvec(self._ctx, None, 0, self.n_embd, 0, 0)
        self._cvec_active = s.cvec is not None
        adapter = self._adapters.get(self, s.lora) if s.lora is not None else None
        self._adapters.activate(self._ctx, adapter)
        self._steering = s
        self._installed = True

    @property
    def steering(self) -> steering.Steering:
        """The interventions now installed and their paths."""
        return self._steering

    def generate(self, prompt: Prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: Sequence[str] = (), chat_template: Template = True,
                 stream: bool = False):
        """Continue ``prompt`` (text or chat messages); with ``stream=True`` an iterator of text pieces."""
        kw = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                  chat_template=chat_template)
        return generation.stream(self, prompt, **kw) if stream else generation.generate(self, prompt, **kw)

    def generate_batch(self, prompts, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                       seed: int = 0, stop: Sequence[str] = (), chat_template: Template = True,
                       progress: bool = False, return_logits: bool = False, until=None):
        """Continue many prompts side by side; each prompt's sampling uses its own generator seeded ``seed``.
        With ``return_logits`` returns ``(texts, logits)``, the logits being the next-token logits after each
        prompt, ``[len(prompts), n_vocab]`` (what the first token was sampled from). ``until(text)``: an answer
        ends as soon as this holds for its text so far."""
        prompts = prompt_list(prompts)  # once: a generator has no len() and would be spent by the count
        first = np.empty((len(prompts), self.n_vocab), np.float32) if return_logits else None
        texts = generation.generate_batch(self, prompts, max_tokens=max_tokens, temperature=temperature,
                                          top_p=top_p, seed=seed, stop=stop, chat_template=chat_template,
                                          progress=progress, first_logits=first, until=until)
        return (texts, first) if return_logits else texts


def _file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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

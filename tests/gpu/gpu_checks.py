"""GPU checks (run by tests/gpu/run.sh; not collected by the CPU suite): the model fully offloaded, device
tensors edited by pysteer's CUDA kernels."""

import math
import sys
import pathlib

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
import pysteer  # noqa: E402
from conftest import PROMPTS  # noqa: E402
from pysteer import _lib  # noqa: E402

E = 64


@pytest.fixture(scope="module", params=["tiny-llama.gguf", "tiny-qwen2.gguf", "tiny-gemma3.gguf"])
def gpu_model(request, tiny_dir):
    with pysteer.load(tiny_dir / request.param, n_ctx=512, n_gpu_layers=-1) as m:
        yield m


def test_cuda_is_in_use():
    assert pysteer._lib._core.CUDA_BUILT
    assert _lib.cuda_kernels_usable(), "llama-cpp-python has no CUDA backend: rebuild with -DGGML_CUDA=on"


def test_capture_on_gpu_matches_cpu(gpu_model):
    gpu = gpu_model.capture(PROMPTS, positions=3)
    with pysteer.load(gpu_model.path, n_ctx=512) as cpu_m:
        cpu = cpu_m.capture(PROMPTS, positions=3)
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=2e-2 * np.abs(cpu).max())
    assert np.array_equal(gpu[:, 0, 1:], gpu[:, 2, :-1])


@pytest.mark.parametrize("cuda_kernels", [True, False])
def test_ablation_on_gpu(gpu_model, cuda_kernels):
    gpu_model.use_cuda_kernels(cuda_kernels)  # False: ggml_backend_tensor_get/set + CPU kernel
    try:
        R = np.random.default_rng(0).standard_normal((3, E))
        with gpu_model.steer(pysteer.Ablate(R), path="hook"):
            acts = gpu_model.capture(PROMPTS, positions=4).astype(np.float64)
    finally:
        gpu_model.use_cuda_kernels(True)
    q = np.linalg.qr(R.T)[0].T
    assert (np.abs(acts @ q.T) / np.linalg.norm(acts, axis=-1, keepdims=True)).max() < 1e-5


def test_rotation_on_gpu(gpu_model):
    rng = np.random.default_rng(1)
    site = dict(layers=[2], points=["mid"])
    base = gpu_model.capture(PROMPTS, positions=5, **site).astype(np.float64)
    rot = pysteer.Rotate(rng.standard_normal(E), rng.standard_normal(E), 135, **site)
    with gpu_model.steer(rot):
        got = gpu_model.capture(PROMPTS, positions=5, **site).astype(np.float64)
    err = np.angle(np.exp(1j * (np.arctan2(got @ rot.b2, got @ rot.b1) - math.radians(135))))
    assert np.abs(err).max() < 1e-3
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(base, axis=-1), rtol=1e-5)
    adaptive = pysteer.Rotate(rot.b1, rot.b2, 135, adaptive=True, **site)
    with gpu_model.steer(adaptive):
        ad = gpu_model.capture(PROMPTS, positions=5, **site)
    neg = (base @ rot.b1) <= 0
    assert np.array_equal(ad[neg], base[neg].astype(np.float32))


def test_add_hook_vs_control_vector_and_restore(gpu_model):
    v = np.random.default_rng(2).standard_normal(E).astype(np.float32)
    base = gpu_model.logits_batch(PROMPTS)
    with gpu_model.steer(pysteer.Add(v, layers=[1, 3]), path="hook"):
        hook = gpu_model.logits_batch(PROMPTS)
    with gpu_model.steer(pysteer.Add(v, layers=[1, 3]), path="native"):
        cvec = gpu_model.logits_batch(PROMPTS)
    np.testing.assert_allclose(hook, cvec, rtol=0, atol=1e-3 * np.abs(cvec).max())
    assert not np.allclose(hook, base)
    assert np.array_equal(gpu_model.logits_batch(PROMPTS), base)

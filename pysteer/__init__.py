"""pysteer: read and steer the residual stream of quantized GGUF models inside llama.cpp.

    m = pysteer.load("qwen2.5-coder-0.5b-instruct")
    acts = m.capture(["How do I bake bread?"], positions=5)   # [prompts, points, layers, positions, n_embd]
"""

from . import models
from ._lib import BuildMismatchError, build_info
from .capture import HookError
from .hookpoints import POINTS, SUPPORTED_ARCHS, UnsupportedArchitectureError
from .interventions import Ablate, Add, Rotate
from .model import Model, ModelLoadError, load

__version__ = "0.1.0"
__all__ = [
    "load", "Model", "models", "Ablate", "Add", "Rotate", "POINTS", "SUPPORTED_ARCHS", "build_info",
    "BuildMismatchError", "HookError", "ModelLoadError", "UnsupportedArchitectureError",
]

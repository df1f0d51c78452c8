"""pysteer: read and steer the residual stream of quantized GGUF models inside llama.cpp.

    m = pysteer.load("qwen2.5-coder-0.5b-instruct")
    acts = m.capture(["How do I bake bread?"], positions=5)   # [prompts, points, layers, positions, n_embd]
"""

from . import datasets, models
from .direction import Direction, load_direction
from .extraction import ExtractResult, extract
from .hookpoints import POINTS, SUPPORTED_ARCHS, UnsupportedArchitectureError
from .interventions import Ablate, Add, BlockAblate, Rotate
from .native import BuildMismatchError, HookError, build_info
from .runtime import Model, ModelLoadError, load
from .selection import iterative_directions, rotation_plane, select_direction, transfer

__version__ = "0.1.0"
__all__ = [
    "load", "Model", "models", "datasets", "Ablate", "Add", "BlockAblate", "Rotate", "extract", "ExtractResult",
    "select_direction", "rotation_plane", "iterative_directions", "transfer", "Direction", "load_direction",
    "POINTS", "SUPPORTED_ARCHS", "build_info", "BuildMismatchError", "HookError", "ModelLoadError",
    "UnsupportedArchitectureError",
]

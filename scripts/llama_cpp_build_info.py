"""Prints 'VERSION;INCLUDE_DIR' of the installed llama-cpp-python without importing it (no libllama load)."""
import importlib.metadata
import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("llama_cpp")
if spec is None or spec.origin is None:
    sys.exit("llama_cpp is not importable")
include = pathlib.Path(spec.origin).resolve().parent.parent / "include"
if not (include / "ggml.h").is_file():
    sys.exit(f"{include}/ggml.h not found")
print(f"{importlib.metadata.version('llama-cpp-python')};{include}", end="")

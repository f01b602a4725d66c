#!/usr/bin/env bash
# The onnxruntime-web files the page loads (ort.wasm.min.js + its WebAssembly, ~15 MB), from the npm
# registry into demo/vendor/ (not committed). A static host can serve them from there, or point the
# <script> tag at a CDN copy of the same version instead.
set -euo pipefail
cd "$(dirname "$0")"
VERSION="${ORT_WEB_VERSION:-1.31.1}"
mkdir -p vendor && tmp="$(mktemp -d)"
(cd "$tmp" && npm pack --silent "onnxruntime-web@$VERSION" >/dev/null && tar xzf onnxruntime-web-*.tgz)
for f in ort.wasm.min.js ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm; do cp "$tmp/package/dist/$f" vendor/; done
rm -rf "$tmp"
echo "onnxruntime-web $VERSION -> $(pwd)/vendor"

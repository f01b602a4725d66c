# Offline install of Google's tokamax (0.0.17) on the GPU machine, from wheels we carry.
#
# On a machine with the package registry (builds .whl/tokamax, ~10 MiB, git-ignored):
#     bash benchmarks/peers/install_tokamax.sh build
# On the GPU machine (Python >= 3.12 with jax/jaxlib, numpy installed), from the repo root:
#     source benchmarks/peers/install_tokamax.sh    # installs and exports PYTHONPATH
#     bash benchmarks/peers/install_tokamax.sh      # installs and prints the export line
# Env: PYTHON (default python3), TOKAMAX_SITE (default /tmp/tokamax_site).
#
# The wheelhouse holds tokamax and its import-time dependencies only; jax, jaxlib,
# numpy, opt_einsum, ml_dtypes (and triton/torch) come from the GPU machine. Left out:
#   xprof       22 MiB; tokamax/_src/benchmarking.py imports
#               xprof.cli.tools.get_kernel_stats_tool at load time but calls it only
#               for the 'xprof'/'hermetic_xprof' timing methods (TPU default; GPU uses
#               'cupti'), so a stub that raises is written into the site dir instead.
#   tensorboardx, protobuf, packaging: only tokamax/benchmarks/* imports tensorboardX.
#   orbax-checkpoint, tensorstore: flax deps that flax.linen/nnx/struct (used by qwix)
#               don't import.

_TOKAMAX_WHEELS="tokamax==0.0.17 absl-py==2.5.1 einshape==1.0 jaxtyping==0.3.11
  wadler-lindig==0.1.8 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-extensions==4.16.0 typing-inspection==0.4.5 qwix==0.1.8 flax==0.12.12
  msgpack==1.2.4 optax==0.2.8 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
  pygments==2.21.0 pyyaml==6.0.4 treescope==0.1.10 tqdm==4.70.1 immutabledict==4.3.1"

_tokamax_build() (
  set -euo pipefail
  mkdir -p .whl/tokamax
  # shellcheck disable=SC2086
  python3 -m pip download $_TOKAMAX_WHEELS --no-deps --python-version 3.12 \
    --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d .whl/tokamax
  du -sh .whl/tokamax
)

_tokamax_install() (
  set -euo pipefail
  fail() { echo "install_tokamax: $*" >&2; exit 1; }
  py=${PYTHON:-python3}
  site=${TOKAMAX_SITE:-/tmp/tokamax_site}
  command -v "$py" >/dev/null || fail "no $py on PATH (set PYTHON=...)"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' \
    || fail "tokamax needs Python >= 3.12, $py is $("$py" -V 2>&1)"
  "$py" -c 'import jax, jaxlib' || fail "jax/jaxlib must already be installed for $py"
  ls .whl/tokamax/tokamax-*.whl >/dev/null 2>&1 \
    || fail "no .whl/tokamax/tokamax-*.whl under $PWD (run from the repo root; carry .whl/tokamax)"
  rm -rf "$site"
  "$py" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
    --target "$site" .whl/tokamax/*.whl || fail "pip install into $site failed"
  stub="$site/xprof/cli/tools"
  mkdir -p "$stub"
  touch "$site/xprof/__init__.py" "$site/xprof/cli/__init__.py" "$stub/__init__.py"
  cat >"$stub/get_kernel_stats_tool.py" <<'EOF'
"""Stub written by benchmarks/peers/install_tokamax.sh (xprof is not carried)."""


def compute_kernel_stats(*args, **kwargs):
  raise NotImplementedError("xprof is stubbed; use tokamax.benchmark(..., method='cupti').")
EOF
  PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$site" "$py" -c '
import sys, jax, tokamax
assert not jax.__file__.startswith(sys.argv[1]), "jax must come from the machine, not " + sys.argv[1]
print("install_tokamax: tokamax", tokamax.__version__, "with jax", jax.__version__, file=sys.stderr)
' "$site" || fail "import tokamax failed after install"
)

if [[ "${1:-}" == build ]]; then
  _tokamax_build; _tk_rc=$?
elif _tokamax_install; then
  _tk_rc=0
  if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}${TOKAMAX_SITE:-/tmp/tokamax_site}"
  else
    echo "export PYTHONPATH=\"\${PYTHONPATH:+\$PYTHONPATH:}${TOKAMAX_SITE:-/tmp/tokamax_site}\""
  fi
else
  _tk_rc=1; echo "install_tokamax: FAILED" >&2
fi
unset -f _tokamax_build _tokamax_install; unset _TOKAMAX_WHEELS
return $_tk_rc 2>/dev/null || exit $_tk_rc

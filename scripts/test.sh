#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine with Python 3.11,
# then run ruff, mypy and pytest. Exits non-zero if any of them fails.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

# Debian packages: redis-server for the service tests, chromium for the browser tests.
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v node >/dev/null || need_apt+=(nodejs npm)
python3.11 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3.11-venv)  # Debian splits venv out
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# Python environment. torch is pinned to the CPU wheel; a looser pin pulls CUDA.
[ -d .venv ] || python3.11 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[dev]"

# Front end (static assets shipped in the package) and the glTF validator, from the lockfile.
if [ -f web/package-lock.json ]; then
  (cd web && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
  export HEADFORGE_REQUIRE_BROWSER=1  # tests/browser fail, not skip, if chromium or the build is missing
fi
(cd tools/gltf && npm ci --no-audit --no-fund --loglevel=error)

# Missing tools, services or models fail their tests instead of skipping them (GPU tests still skip).
export HEADFORGE_STRICT_TESTS=1

# Default networks: fetched from the pinned mediapipe wheel, converted and exported to ONNX.
headforge models pull

ruff check .
ruff format --check .
mypy
pytest "$@"

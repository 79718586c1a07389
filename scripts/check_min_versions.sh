#!/usr/bin/env bash
# The declared lower bounds are true: a fresh venv with the oldest versions that
# pyproject.toml allows (jax, jaxlib, numpy, flax, optax, chex pinned `==` to their
# `>=` bounds) runs the test suite.
#
#   bash scripts/check_min_versions.sh                  # the whole suite, -n 2
#   bash scripts/check_min_versions.sh tests/test_core.py -x   # pytest arguments
#   MIN_VENV=/path/to/venv bash scripts/check_min_versions.sh  # reuse a venv
#
# The bounds were found by trying releases (issue 17); raise one here by raising
# it in pyproject.toml. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

py_host=${PYTHON:-python3}
if [ -n "${MIN_VENV:-}" ]; then
  venv=$MIN_VENV
else
  venv=$(mktemp -d)/venv
  trap 'rm -rf "$(dirname "$venv")"' EXIT
fi
[ -x "$venv/bin/python" ] || "$py_host" -m venv "$venv"
py="$venv/bin/python"

# The `>=` bounds of the libraries bnjax builds on, as `==` pins (jaxlib follows jax).
constraints=$(dirname "$venv")/min-constraints.txt
"$py" - > "$constraints" <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
wanted = ("jax", "numpy", "flax", "optax", "chex")
pins = {}
for req in project["dependencies"] + extras["flax"] + extras["training"] + extras["test"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9][^,;\s]*)", req.strip())
    if m and m.group(1).lower() in wanted:
        pins.setdefault(m.group(1).lower(), m.group(2))
missing = set(wanted) - set(pins)
assert not missing, f"no `>=` bound in pyproject.toml for {sorted(missing)}"
pins["jaxlib"] = pins["jax"]
print("\n".join(f"{k}=={v}" for k, v in sorted(pins.items())))
PY
echo "== the declared minimums:"; cat "$constraints"

"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -c "$constraints" -e ".[test]" || {
  echo "the declared minimums do not install together: raise a bound in pyproject.toml"; exit 1; }
"$py" -m pip check
echo "== installed:"
"$py" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|numpy|flax|optax|chex) '
"$py" - "$constraints" <<'PY'
import sys
from importlib.metadata import version
from packaging.version import Version
for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    have = version(name)
    assert Version(have) == Version(want), f"{name}: installed {have}, the minimum is {want}"
PY

echo "== tests with the minimum versions"
if [ $# -eq 0 ]; then set -- -n 2; fi
"$py" -m pytest -p no:cacheprovider "$@"

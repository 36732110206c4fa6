#!/usr/bin/env bash
# The one command that sets up and runs all tests of ComfyUI-NPO:
#
#     bash scripts/test.sh [extra pytest arguments]
#
# What it does:
# 1. A base virtual environment ($NPO_CACHE/venv, override with NPO_VENV) gets torch, torchvision and
#    torchaudio ($NPO_TORCH_SPEC), the pack's requirements.txt and scripts/requirements-test.txt
#    (pytest, hypothesis, ruff). `ruff check .` and the unit tier run in it.
# 2. The ComfyUI versions to test (the matrix):
#    - every tarball ComfyUI-v*.tar.gz in $NPO_COMFYUI_TARBALLS (default: ../shared/comfyui beside the
#      repository), unpacked once into $NPO_CACHE/comfy/<version>/ComfyUI (re-unpacked when the
#      tarball changes; the trees are never modified);
#    - plus the ComfyUI installed at $COMFYUI_PATH, else ~/comfy/ComfyUI, when there is one and its
#      version is not one a tarball already runs (a canary for a newer release); NPO_TEST_INSTALLED=1
#      adds it even then (~6 min more), NPO_TEST_INSTALLED=0 never adds it.
#    Each version gets its own venv, $NPO_CACHE/venv-comfy-<version>, holding ComfyUI's own
#    requirements.txt; torch and the test tools are shared with the base venv through a .pth file
#    (the venv's own packages come first), so the ~5 GB of torch is installed once.
#    A venv that already has everything is used as is (nothing is reinstalled).
#    Every venv also gets scripts/requirements-test.txt (pytest, ..., gguf for ComfyUI-GGUF).
# 3. Third-party custom node packs the host tier interoperates with: ComfyUI-GGUF-*.tar.gz in
#    $NPO_CUSTOM_NODE_TARBALLS (default: ../shared/custom_nodes) is unpacked once into
#    $NPO_CACHE/custom_nodes/<tarball name>/ComfyUI-GGUF (re-unpacked when the tarball changes; never
#    modified) and exported as COMFYUI_GGUF_PATH (a COMFYUI_GGUF_PATH already set is kept).
# 4. The host and e2e tiers run once per version, in that version's venv, with COMFYUI_PATH set to it.
#    Without any ComfyUI they skip, with one loud line in the summary. The e2e tier's generated model
#    files (~1 GB) go to $NPO_E2E_CACHE, default $NPO_CACHE (exported for the tests).
# 5. `ruff check .` and scripts/check_publish.py (what a Comfy Registry publish would ship and lack)
#    run first; either failing fails the run.
# 6. A summary line per run (version, passed, failed, skipped, seconds) and a last line naming the
#    ComfyUI versions that passed and failed. Any failure fails the whole run.
#
# Extra arguments go to every pytest run; arguments that name test paths replace the tiers (paths
# under tests/unit run once in the base venv, the others once per ComfyUI version).
# Knobs: NPO_CACHE (default ~/.cache/comfyui-npo), NPO_VENV, NPO_PYTHON (interpreter that creates
# the venvs, default python3), NPO_TORCH_SPEC, NPO_COMFYUI_TARBALLS, COMFYUI_PATH,
# NPO_COMFY_VERSIONS (space-separated subset of versions to run, e.g. "0.33.0"; default all),
# NPO_TEST_INSTALLED (1: test the installed ComfyUI even when the matrix runs its version; 0: never),
# NPO_CUSTOM_NODE_TARBALLS, COMFYUI_GGUF_PATH, NPO_E2E_CACHE (parent folder of the e2e assets).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CACHE="${NPO_CACHE:-$HOME/.cache/comfyui-npo}"
VENV="${NPO_VENV:-$CACHE/venv}"
BASE_PYTHON="${NPO_PYTHON:-python3}"
TORCH_SPEC="${NPO_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.1}"
TARBALLS="${NPO_COMFYUI_TARBALLS:-$ROOT/../shared/comfyui}"
ONLY_VERSIONS="${NPO_COMFY_VERSIONS:-}"
NODE_TARBALLS="${NPO_CUSTOM_NODE_TARBALLS:-$ROOT/../shared/custom_nodes}"
TEST_INSTALLED="${NPO_TEST_INSTALLED:-}"

say() { printf '[test.sh] %s\n' "$*"; }
die() { printf '[test.sh] ERROR: %s\n' "$*" >&2; exit 1; }
is_comfy() { [[ -n "$1" && -f "$1/main.py" && -d "$1/comfy" ]]; }
comfy_version() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null || true; }
[[ -z "$TEST_INSTALLED" || "$TEST_INSTALLED" == 0 || "$TEST_INSTALLED" == 1 ]] \
    || die "NPO_TEST_INSTALLED=$TEST_INSTALLED: use 1 (always test the installed ComfyUI), 0 (never) or leave it unset."

mkdir -p "$CACHE"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.test.lock"
    flock 9  # two runs never install into the same venvs or unpack the same trees at the same time
fi

# ---------------------------------------------------------------------------------------------
# virtual environments
# ---------------------------------------------------------------------------------------------
# make_venv DIR: creates DIR as a venv unless it already is one.
make_venv() {
    local dir="$1"
    if [[ -x "$dir/bin/python" ]] && "$dir/bin/python" -c 'import sys' >/dev/null 2>&1; then return; fi
    if [[ -e "$dir" && -n "$(ls -A "$dir" 2>/dev/null)" && ! -f "$dir/pyvenv.cfg" ]]; then
        die "$dir exists and is not a virtual environment; remove it or set NPO_CACHE/NPO_VENV to another path."
    fi
    command -v "$BASE_PYTHON" >/dev/null 2>&1 || die "$BASE_PYTHON not found; install Python >= 3.10 or set NPO_PYTHON."
    say "creating virtual environment $dir ($("$BASE_PYTHON" -V 2>&1))"
    "$BASE_PYTHON" -m venv --clear "$dir" || die "'$BASE_PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)."
    "$dir/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$dir has Python < 3.10; remove it or set NPO_PYTHON."
}

# ensure_requirements PYTHON REQFILE: pip-installs REQFILE unless everything in it is already there.
ensure_requirements() {
    local py="$1" req="$2" stamp key start
    stamp="$req.stamp"
    key="$( { "$py" -VV; cat "$req"; } | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && "$py" scripts/requirements_ok.py "$req"; then
        say "$(dirname "$(dirname "$py")") is up to date"
    elif "$py" scripts/requirements_ok.py "$req"; then
        say "$(dirname "$(dirname "$py")") already has every requirement; nothing to install"
        echo "$key" > "$stamp"
    else
        say "installing into $(dirname "$(dirname "$py")") (missing or outdated):"
        "$py" scripts/requirements_ok.py -v "$req" || true
        rm -f "$stamp"
        start=$SECONDS
        PIP_DISABLE_PIP_VERSION_CHECK=1 "$py" -m pip install --no-input -r "$req"
        "$py" scripts/requirements_ok.py -v "$req" || die "requirements of $req still unsatisfied after pip install (see above)."
        echo "$key" > "$stamp"
        say "installed in $((SECONDS - start)) s"
    fi
}

torch_lines() { for spec in $TORCH_SPEC; do echo "$spec"; done; }

make_venv "$VENV"
BASE_PY="$VENV/bin/python"
{
    echo "# generated by scripts/test.sh; do not edit"
    torch_lines
    grep -v '^[[:space:]]*-e' requirements.txt || true
    cat scripts/requirements-test.txt
} > "$VENV/npo-test-requirements.txt"
ensure_requirements "$BASE_PY" "$VENV/npo-test-requirements.txt"
BASE_SITE="$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# ---------------------------------------------------------------------------------------------
# the ComfyUI matrix: LABELS[i] is shown in the summary, TREES[i] is the ComfyUI folder
# ---------------------------------------------------------------------------------------------
LABELS=()
TREES=()
add_tree() {  # add_tree LABEL DIR (a tree already in the list is not added twice)
    local real t
    real="$(cd "$2" && pwd -P)"
    for t in "${TREES[@]+"${TREES[@]}"}"; do [[ "$(cd "$t" && pwd -P)" == "$real" ]] && return; done
    local v
    v="$(comfy_version "$2")"
    if [[ -n "$ONLY_VERSIONS" && " $ONLY_VERSIONS " != *" $v "* && " $ONLY_VERSIONS " != *" v$v "* ]]; then return; fi
    LABELS+=("$1")
    TREES+=("$2")
}

# unpack_cached TARBALL DEST FOLDER CHECK WHAT: DEST/FOLDER is TARBALL unpacked (again only when the
# tarball's sha256 changes or CHECK DEST/FOLDER fails); unpacked beside DEST and renamed, never edited.
unpack_cached() {
    local tarball="$1" dest="$2" folder="$3" check="$4" what="$5" sum tmp
    sum="$(sha256sum "$tarball" | cut -d' ' -f1)"
    if [[ -f "$dest/.tarball-sha256" && "$(cat "$dest/.tarball-sha256")" == "$sum" ]] && "$check" "$dest/$folder"; then
        return
    fi
    say "unpacking $(basename "$tarball") into $dest"
    tmp="$(dirname "$dest")/.unpack-$(basename "$dest").$$"
    rm -rf "$tmp" && mkdir -p "$tmp"
    tar -xzf "$tarball" -C "$tmp" || die "could not unpack $tarball"
    "$check" "$tmp/$folder" || die "$tarball does not unpack to $what"
    echo "$sum" > "$tmp/.tarball-sha256"
    rm -rf "$dest" && mv "$tmp" "$dest"
}

MATRIX_VERSIONS=()   # every tarball's version (the matrix proper), whichever NPO_COMFY_VERSIONS runs
if [[ -d "$TARBALLS" ]]; then
    shopt -s nullglob
    tarballs=("$TARBALLS"/ComfyUI-v*.tar.gz)
    shopt -u nullglob
    # oldest version first
    while IFS= read -r tarball; do
        [[ -n "$tarball" ]] || continue
        ver="$(basename "$tarball" .tar.gz)"
        ver="${ver#ComfyUI-}"
        dest="$CACHE/comfy/$ver"
        unpack_cached "$tarball" "$dest" ComfyUI is_comfy "a ComfyUI/ folder with main.py and comfy/"
        MATRIX_VERSIONS+=("${ver#v}")
        add_tree "$ver" "$dest/ComfyUI"
    done < <(printf '%s\n' "${tarballs[@]+"${tarballs[@]}"}" | sort -V)
fi

INSTALLED=""
for cand in "${COMFYUI_PATH:-}" "$HOME/comfy/ComfyUI"; do
    if is_comfy "$cand"; then INSTALLED="$(cd "$cand" && pwd)"; break; fi
done
if [[ -n "${COMFYUI_PATH:-}" && -z "$INSTALLED" ]]; then
    die "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI folder (no main.py and comfy/ there). Fix it or unset it."
fi
if [[ -n "$INSTALLED" ]]; then
    installed_ver="$(comfy_version "$INSTALLED")"
    if [[ "$TEST_INSTALLED" == 0 ]]; then
        say "not testing the ComfyUI at $INSTALLED (NPO_TEST_INSTALLED=0)"
    elif [[ "$TEST_INSTALLED" != 1 && " ${MATRIX_VERSIONS[*]+${MATRIX_VERSIONS[*]}} " == *" $installed_ver "* ]]; then
        say "not testing the ComfyUI at $INSTALLED: the matrix already runs v$installed_ver (NPO_TEST_INSTALLED=1 tests it too)"
    else
        add_tree "v$installed_ver at $INSTALLED" "$INSTALLED"
    fi
fi

# ---------------------------------------------------------------------------------------------
# third-party custom node packs (unmodified upstream source, ../shared/custom_nodes/README.md)
# ---------------------------------------------------------------------------------------------
is_gguf_pack() { [[ -f "$1/__init__.py" && -f "$1/ops.py" && -f "$1/nodes.py" ]]; }
if [[ -n "${COMFYUI_GGUF_PATH:-}" ]]; then
    is_gguf_pack "$COMFYUI_GGUF_PATH" || die "COMFYUI_GGUF_PATH=$COMFYUI_GGUF_PATH is not a ComfyUI-GGUF folder (no __init__.py, ops.py, nodes.py). Fix it or unset it."
    say "ComfyUI-GGUF: $COMFYUI_GGUF_PATH (COMFYUI_GGUF_PATH)"
else
    gguf_tarball="$(find "$NODE_TARBALLS" -maxdepth 1 -name 'ComfyUI-GGUF-*.tar.gz' 2>/dev/null | sort -V | tail -n 1)"
    if [[ -n "$gguf_tarball" ]]; then
        dest="$CACHE/custom_nodes/$(basename "$gguf_tarball" .tar.gz)"
        mkdir -p "$CACHE/custom_nodes"
        unpack_cached "$gguf_tarball" "$dest" ComfyUI-GGUF is_gguf_pack "a ComfyUI-GGUF/ folder with __init__.py, ops.py and nodes.py"
        export COMFYUI_GGUF_PATH="$dest/ComfyUI-GGUF"
        say "ComfyUI-GGUF: $COMFYUI_GGUF_PATH ($(cat "$COMFYUI_GGUF_PATH/.upstream_commit" 2>/dev/null || echo "commit unknown"))"
    else
        say "WARNING: no ComfyUI-GGUF-*.tar.gz in $NODE_TARBALLS: the GGUF host test will skip"
    fi
fi
# the e2e tier's generated model files (npo_headless.assets): under the cache unless NPO_E2E_CACHE says otherwise
export NPO_E2E_CACHE="${NPO_E2E_CACHE:-$CACHE}"

# One venv per ComfyUI version: ComfyUI's requirements.txt without torch/torchvision/torchaudio
# (those come from the base venv, and stay at TORCH_SPEC: nothing may pull a different torch).
PYS=()
for i in "${!TREES[@]}"; do
    tree="${TREES[$i]}"
    ver="$(comfy_version "$tree")"
    [[ -n "$ver" ]] || die "${TREES[$i]}: no __version__ in comfyui_version.py"
    venv="$CACHE/venv-comfy-$ver"
    make_venv "$venv"
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$BASE_SITE" > "$site/npo-shared-base.pth"
    {
        echo "# generated by scripts/test.sh for ComfyUI v$ver ($tree); do not edit"
        torch_lines
        grep -v '^[[:space:]]*-e' requirements.txt || true
        cat scripts/requirements-test.txt
        echo "# ComfyUI requirements ($tree/requirements.txt) without torch/torchvision/torchaudio"
        grep -Eiv '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[].*)?$' "$tree/requirements.txt" || true
        echo "# imported by ComfyUI's server (app/frontend_management.py) but missing from its list before v0.14"
        echo "requests"
    } > "$venv/npo-test-requirements.txt"
    ensure_requirements "$venv/bin/python" "$venv/npo-test-requirements.txt"
    PYS+=("$venv/bin/python")
done

# ---------------------------------------------------------------------------------------------
# Chromium for tests/e2e/test_browser.py (skips loudly without it). Installed from Debian's
# packages only in CI (CI=true, as root) or when NPO_INSTALL_CHROMIUM=1; never fatal.
# ---------------------------------------------------------------------------------------------
CHROMIUM="${NPO_E2E_CHROMIUM:-/usr/bin/chromium}"
want_chromium="${NPO_INSTALL_CHROMIUM:-}"
if [[ -z "$want_chromium" && -n "${CI:-}" && "${CI:-}" != "false" && "${CI:-}" != "0" ]]; then want_chromium=1; fi
if [[ ${#TREES[@]} -gt 0 && ! -x "$CHROMIUM" && "$want_chromium" == "1" ]]; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian's chromium for the browser tests"
        start=$SECONDS
        if DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >/dev/null &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium </dev/null >/dev/null; then
            say "chromium installed in $((SECONDS - start)) s"
        else
            say "WARNING: apt-get install chromium failed; the browser tests will skip"
        fi
    else
        say "WARNING: chromium missing and not installable here (needs root + apt-get); the browser tests will skip"
    fi
fi

# ---------------------------------------------------------------------------------------------
# lint + tests
# ---------------------------------------------------------------------------------------------
say "ruff check ."
"$VENV/bin/ruff" check .
say "check_publish.py (is the pack ready for the Comfy Registry? the owner's two values may still be unset)"
"$BASE_PY" scripts/check_publish.py --owner-fields pending --matrix "${MATRIX_VERSIONS[*]+${MATRIX_VERSIONS[*]}}"

for tier in tests/unit tests/host tests/e2e; do [[ -d "$tier" ]] || die "test folder $tier is missing."; done
UNIT_PATHS=(tests/unit)
COMFY_PATHS=(tests/host tests/e2e)
ARGS=()
named=0
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        if [[ $named -eq 0 ]]; then UNIT_PATHS=(); COMFY_PATHS=(); named=1; fi
        if [[ "$arg" == tests/unit* ]]; then UNIT_PATHS+=("$arg"); else COMFY_PATHS+=("$arg"); fi
    else
        ARGS+=("$arg")
    fi
done

REPORTS="$(mktemp -d "${TMPDIR:-/tmp}/npo-test-reports.XXXXXX")"
SUMMARY=()   # "label|junit xml|exit code|seconds"
run_pytest() {  # run_pytest LABEL PYTHON COMFYUI_PATH(or "") PATH...
    local label="$1" py="$2" comfy="$3" xml rc start
    shift 3
    xml="$REPORTS/run-${#SUMMARY[@]}.xml"
    say "pytest $* ${ARGS[*]+${ARGS[*]} }($label; $py)"
    start=$SECONDS
    set +e
    if [[ -n "$comfy" ]]; then
        COMFYUI_PATH="$comfy" "$py" -m pytest "$@" ${ARGS[@]+"${ARGS[@]}"} --junitxml="$xml"
    else
        env -u COMFYUI_PATH "$py" -m pytest "$@" ${ARGS[@]+"${ARGS[@]}"} --junitxml="$xml"
    fi
    rc=$?
    set -e
    SUMMARY+=("$label|$xml|$rc|$((SECONDS - start))")
}

if [[ ${#TREES[@]} -eq 0 ]]; then
    echo "!!!!!! ComfyUI NOT FOUND (no tarballs in $TARBALLS, nothing at \$COMFYUI_PATH or ~/comfy/ComfyUI): tests/host and tests/e2e are SKIPPED, only tests/unit runs !!!!!!"
    paths=("${UNIT_PATHS[@]+"${UNIT_PATHS[@]}"}" "${COMFY_PATHS[@]+"${COMFY_PATHS[@]}"}")
    [[ $named -eq 1 ]] || paths=(tests)
    run_pytest "no ComfyUI (host, e2e skipped)" "$BASE_PY" "" "${paths[@]}"
else
    say "ComfyUI matrix: ${LABELS[*]}"
    if [[ ${#UNIT_PATHS[@]} -gt 0 ]]; then run_pytest "unit (no ComfyUI)" "$BASE_PY" "" "${UNIT_PATHS[@]}"; fi
    if [[ ${#COMFY_PATHS[@]} -gt 0 ]]; then
        for i in "${!TREES[@]}"; do
            run_pytest "ComfyUI ${LABELS[$i]}" "${PYS[$i]}" "${TREES[$i]}" "${COMFY_PATHS[@]}"
        done
    fi
fi

"$BASE_PY" scripts/junit_summary.py "${SUMMARY[@]}"

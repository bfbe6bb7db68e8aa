#!/usr/bin/env bash
# Build the whole jerald-nbk stack into ./.venv from package registries only.
#
# Works offline (registries reachable, nothing else) and online; idempotent. Three packages
# download sources from the internet at build time (pfft-python, classylss) or need a system
# library (Corrfunc needs GSL); the recipe that avoids all of that is documented in
# docs/install.md. Built wheels are cached in $JERALD_CACHE (default ~/.cache/jerald-nbk) so
# that a second install on the same machine only copies wheels.
#
# The tested versions are pinned in constraints.txt (setup.cfg holds compatible ranges only); this
# script reads the pins from there and passes the file to pip with -c. The default install includes
# the `mpi-wheel` extra (the mpich wheel); JERALD_EXTRAS overrides the extras, e.g.
# JERALD_EXTRAS=test,dev,vmad (the extras installed into the venv only; see docs/install.md for a
# system MPI).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
CACHE=${JERALD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jerald-nbk}
PYTAG=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
WH=$CACHE/wheelhouse-$PYTAG
BUILDENV=$CACHE/buildenv-$PYTAG
WORK=$CACHE/build-$PYTAG
# Source carriers only (never installed): the PFFT+FFTW tarball ships inside pfft-python 0.1.12's
# sdist, the CLASS v3.3.1 sources inside the official classy 3.3.1.0 sdist.
PFFT_CARRIER=pfft-python==0.1.12
CLASS_CARRIER=classy==3.3.1.0

say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[install] error:\033[0m %s\n' "$*" >&2; exit 1; }

CONSTRAINTS=$ROOT/constraints.txt
EXTRAS=${JERALD_EXTRAS:-test,dev,vmad,mpi-wheel}

pin() {  # tested version of a package, read from constraints.txt
  local v
  v=$(sed -nE "s/^[[:space:]]*$1[[:space:]]*==[[:space:]]*([^[:space:];#]+).*/\1/Ip" "$CONSTRAINTS" | head -1)
  [ -n "$v" ] || die "no '$1==' pin in $CONSTRAINTS"
  echo "$v"
}

have_wheel() { compgen -G "$WH/$1-*.whl" >/dev/null; }

mkdir -p "$WH" "$WORK"
T0=$(date +%s)

# --- 1. system libraries --------------------------------------------------------------------
# Corrfunc (a hard requirement of nbodykit) links against GSL, at build and at run time.
if ! { command -v gsl-config >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep libgsl.so >/dev/null; }; then
  say "GSL not found; installing Debian package libgsl-dev (needed by Corrfunc, required by nbodykit)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get install -y -q libgsl-dev >/dev/null 2>&1 ||
      { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libgsl-dev >/dev/null 2>&1; } ||
      die "could not install libgsl-dev with apt-get (are you root or allowed 'sudo -n'?). Install GSL (headers + library, e.g. 'apt-get install libgsl-dev', 'dnf install gsl-devel', 'brew install gsl') and run 'make install' again."
  else
    die "GSL is missing and apt-get is not available: install GSL (headers and library, e.g. 'dnf install gsl-devel' or 'brew install gsl') and run 'make install' again."
  fi
fi

# --- 2. the build environment (only used to fetch and build the awkward wheels) --------------
need_build=0
for w in pfft_python pmesh classylss corrfunc fastpm bigfile nbodykit kdcount; do have_wheel "$w" || need_build=1; done
[ -f "$WH/.complete" ] || need_build=1
if [ $need_build = 1 ]; then
  if [ ! -x "$BUILDENV/bin/python" ]; then
    say "creating build environment $BUILDENV"
    "$PY" -m venv "$BUILDENV"
  fi
  BPIP=("$BUILDENV/bin/python" -m pip -q --disable-pip-version-check)
  "${BPIP[@]}" install "numpy==$(pin numpy)" setuptools wheel "cython<3" "mpich==$(pin mpich)" "mpi4py==$(pin mpi4py)"
  export PATH="$BUILDENV/bin:$PATH"   # the mpich wheel ships mpicc
  DL=$WORK/sdists; mkdir -p "$DL"
  fetch() {  # fetch an sdist without installing it
    local spec=$1; local stem
    stem=$(echo "${spec%%==*}" | tr '-' '_')
    if ! compgen -G "$DL/${stem}-${spec##*==}.tar.gz" >/dev/null && ! compgen -G "$DL/${spec%%==*}-${spec##*==}.tar.gz" >/dev/null; then
      say "downloading sdist $spec"
      "${BPIP[@]}" download --no-deps --no-binary=:all: --no-build-isolation -d "$DL" "$spec"
    fi
  }
  sdist() { ls "$DL"/"$1"-"$2".tar.gz "$DL"/"$(echo "$1" | tr '-' '_')"-"$2".tar.gz 2>/dev/null | head -1; }

  if ! have_wheel pfft_python; then
    V=$(pin pfft-python)
    fetch "pfft-python==$V"; fetch "$PFFT_CARRIER"
    rm -rf "$WORK/pfft" && mkdir -p "$WORK/pfft" && cd "$WORK/pfft"
    tar xzf "$(sdist pfft-python "$V")"; tar xzf "$(sdist pfft-python "${PFFT_CARRIER##*==}")"
    NEW=$(ls -d pfft?python-"$V"); OLD=$(ls -d pfft?python-"${PFFT_CARRIER##*==}")
    mkdir repack && tar xzf "$OLD"/depends/pfft-1.0.8-alpha2-fftw3.tar.gz -C repack
    mv repack/* repack/pfft-1.0.8-alpha3-fftw3-2don2d
    mkdir -p "$NEW/depends"
    tar czf "$NEW/depends/pfft-1.0.8-alpha3-fftw3-2don2d.tar.gz" -C repack pfft-1.0.8-alpha3-fftw3-2don2d
    say "building pfft-python $V (FFTW + PFFT, double and single precision: ~6-10 min on 2 cores)"
    MPICC="$BUILDENV/bin/mpicc" CC="$BUILDENV/bin/mpicc" MAKEFLAGS="-j$(nproc)" \
      "${BPIP[@]}" wheel --no-deps --no-build-isolation -w "$WH" "./$NEW"
    cd "$ROOT"
  fi

  if ! have_wheel classylss; then
    V=$(pin classylss)
    fetch "classylss==$V"; fetch "$CLASS_CARRIER"
    rm -rf "$WORK/classylss" && mkdir -p "$WORK/classylss" && cd "$WORK/classylss"
    tar xzf "$(sdist classylss "$V")"; tar xzf "$(sdist classy "${CLASS_CARRIER##*==}")"
    NEW=$(ls -d classylss-"$V")
    mv classy-"${CLASS_CARRIER##*==}" class_public-3.3.1
    mkdir -p "$NEW/depends" && tar czf "$NEW/depends/class-v3.3.1.tar.gz" class_public-3.3.1
    say "building classylss $V with the CLASS v3.3.1 sources (~3 min)"
    "${BPIP[@]}" wheel --no-deps --no-build-isolation -w "$WH" "./$NEW"
    cd "$ROOT"
  fi

  # Everything else nbodykit and fastpm pull in, as wheels: several of their dependencies (kdcount,
  # mpsort, sharedmem, ...) are sdists whose setup.py imports Cython/numpy/mpi4py, so they build
  # here, without isolation. Corrfunc's Makefile is not safe under a parallel make: no MAKEFLAGS.
  say "building the wheels of nbodykit, fastpm and their dependencies"
  "${BPIP[@]}" wheel --no-build-isolation --find-links "$WH" -w "$WH" \
    "pmesh==$(pin pmesh)" "bigfile==$(pin bigfile)" "corrfunc==$(pin corrfunc)" \
    "fastpm==$(pin fastpm)" "nbodykit==$(pin nbodykit)" "classylss==$(pin classylss)" \
    "pfft-python==$(pin pfft-python)"
  touch "$WH/.complete"
fi

# --- 3. the project environment --------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
"${VPIP[@]}" install --upgrade "pip>=24" setuptools wheel >/dev/null
say "installing the stack and jerald_nbk (editable, with its C++ extension)"
# The requirements first, at the versions of constraints.txt (from the wheelhouse where we built
# them): the editable build of the C++ extension runs without isolation and needs JAX's XLA FFI
# headers and pybind11 in place.
mapfile -t REQS < <("$PY" - "$ROOT/setup.cfg" "$EXTRAS" <<'PYEOF'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
lines = cfg["options"]["install_requires"].splitlines()
for extra in filter(None, sys.argv[2].split(",")):
    lines += cfg["options.extras_require"][extra.strip()].splitlines()
for line in lines:
    if line.strip() and not line.strip().startswith("#"):
        print(line.strip())
PYEOF
)
"${VPIP[@]}" install -c "$CONSTRAINTS" --find-links "$WH" setuptools wheel pybind11 "${REQS[@]}"
"${VPIP[@]}" install -c "$CONSTRAINTS" --find-links "$WH" --no-build-isolation -e "$ROOT[$EXTRAS]"

# --- 4. smoke check ---------------------------------------------------------------------------
"$VENV/bin/python" - <<'PYEOF'
import jax, pmesh, nbodykit, mpi4py, bigfile, optax, fastpm
from jerald_nbk import _cic
print(f"[install] ok: jax {jax.__version__}, pmesh {pmesh.__version__}, nbodykit {nbodykit.__version__}, "
      f"mpi4py {mpi4py.__version__}, C++ kernels with {_cic.max_threads()} threads")
PYEOF
say "done in $(( $(date +%s) - T0 )) s; activate with 'source .venv/bin/activate'"

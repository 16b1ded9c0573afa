#!/usr/bin/env bash
# Prepare a machine to run cdcengine and its tests. Idempotent; safe to run on every CI build.
#
#   1. PostgreSQL server binaries (initdb/pg_ctl/postgres): the tests and `cdcengine demo`
#      start throwaway servers from them. Installed with apt when none are found.
#      OpenSSH's sshd (openssh-server, with ssh-keygen): the SSH tunnel tests start one.
#   2. .venv with Python >= 3.11.
#   3. `pip install -e ".[test,bench]"` into it -- skipped when pyproject.toml is unchanged since
#      the last successful install and the packages still import.
#   4. Byte code of src/ and adapters/ (compileall), so engine processes start without compiling.
#
# Works as root or as a user with sudo, on a fresh Debian/Ubuntu machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  SUDO=()
fi

apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* with your package manager"
  if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
    die "need root or sudo to install $*"
  fi
  say "installing $* (apt-get)"
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# --- 1. PostgreSQL server binaries -------------------------------------------------------
have_pg_server() {
  if [ -n "${CDCENGINE_PG_BINDIR:-}" ] && [ -x "${CDCENGINE_PG_BINDIR}/initdb" ]; then
    return 0
  fi
  command -v initdb >/dev/null 2>&1 && return 0
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if have_pg_server; then
  say "PostgreSQL server binaries: found"
else
  apt_install postgresql
  have_pg_server || die "postgresql installed but no initdb found"
fi

# --- 1b. OpenSSH server: the SSH tunnel tests (tests/sshd.py) start a throwaway sshd ------
if [ -x /usr/sbin/sshd ] || command -v sshd >/dev/null 2>&1; then
  say "OpenSSH server (sshd): found"
else
  apt_install openssh-server
fi

# --- 2. Python >= 3.11 and .venv ---------------------------------------------------------
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

if [ -x .venv/bin/python ] && python_ok .venv/bin/python; then
  say ".venv: exists ($(.venv/bin/python -V 2>&1))"
else
  PY=""
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      PY=$(command -v "$candidate")
      break
    fi
  done
  [ -n "$PY" ] || die "Python >= 3.11 not found (Debian 12+: apt-get install python3)"
  rm -rf .venv
  say "creating .venv with $PY ($("$PY" -V 2>&1))"
  if ! "$PY" -m venv .venv >/dev/null 2>&1; then
    # Debian splits ensurepip into python3-venv.
    rm -rf .venv
    apt_install python3-venv
    "$PY" -m venv .venv
  fi
fi

# --- 3. The project and its test dependencies --------------------------------------------
stamp=.venv/.cdcengine-setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
  && .venv/bin/python -c 'import cdcengine, cdcengine_postgres, pytest, matplotlib, psutil, paramiko' >/dev/null 2>&1; then
  say "cdcengine: installed (pyproject.toml unchanged)"
else
  say "installing cdcengine + test and bench extras into .venv (pip install -e .[test,bench])"
  rm -f "$stamp"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
  echo "$want" >"$stamp"
fi
# --- 4. Byte code of the project's own modules --------------------------------------------
# An editable install runs from this checkout; where PYTHONDONTWRITEBYTECODE is set (CI machines
# often do) nothing would ever be cached, and every engine process the tests start would compile
# ~130 modules from source first (~0.15 s each start). Stale files are ignored by Python.
.venv/bin/python -m compileall -q src adapters >/dev/null
say "done"

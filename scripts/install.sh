#!/usr/bin/env bash
# Installs what pgsplit, its tests and its benchmarks need on a fresh Debian machine:
# PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_basebackup), psql and pgbench,
# openssl (test certificates), promtool (checks deploy/'s alert rules; Debian's prometheus
# package), gcc and the Python headers (pip compiles the hot path with Cython), and the
# Python package with its test extras.
# Idempotent: a second run installs nothing. Pass "bench" to add pgbouncer, pgpool2 and
# the plotting/profiling Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_packages+=(postgresql postgresql-contrib)
command -v pgbench >/dev/null 2>&1 || apt_packages+=(postgresql-contrib)
command -v psql >/dev/null 2>&1 || apt_packages+=(postgresql-client)
command -v openssl >/dev/null 2>&1 || apt_packages+=(openssl)
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
command -v gcc >/dev/null 2>&1 || apt_packages+=(gcc)
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || apt_packages+=(python3-dev)
if [ "${1:-}" = "bench" ]; then
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || apt_packages+=(pgbouncer)
  command -v pgpool >/dev/null 2>&1 || [ -x /usr/sbin/pgpool ] || apt_packages+=(pgpool2)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${apt_packages[*]} ..."
  $sudo apt-get update -qq
  # The packages' own services are not wanted: pgsplit runs its own sandbox servers.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi
# PostgreSQL refuses to run as root: the sandbox runs servers as the postgres OS user.
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home /var/lib/postgresql --shell /bin/bash postgres
fi

extras="test"
[ "${1:-}" = "bench" ] && extras="test,bench"
python3 -m pip install -q --disable-pip-version-check -e ".[${extras}]"

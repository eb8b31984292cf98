#!/usr/bin/env bash
# Real services for the tests that need them, from Debian's packages:
#   PostgreSQL on 127.0.0.1:5432 with database/user "autoprune" (multi-worker storage tests),
#   Chromium (headless browser test of the dashboard).
# Prints "export AUTOPRUNE_TEST_POSTGRES=..." on success; a failure leaves those tests skipped, loudly.
set -uo pipefail
log=${TMPDIR:-/tmp}/autoprune-ci-services.log
sudo=""; as_postgres="runuser -u postgres --"
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; as_postgres="sudo -u postgres"; fi
need=()
command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "services: installing ${need[*]} from Debian" >&2
  if ! ($sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}") >>"$log" 2>&1; then
    echo "services: WARNING: apt-get install ${need[*]} failed (see $log); those tests will skip" >&2
  fi
fi
if command -v pg_ctlcluster >/dev/null 2>&1; then
  ver=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)
  if [ -n "$ver" ]; then
    $sudo pg_ctlcluster "$ver" main start >>"$log" 2>&1 || true
    for _ in $(seq 30); do pg_isready -h 127.0.0.1 -q && break; sleep 1; done
    if pg_isready -h 127.0.0.1 -q; then
      $as_postgres psql -q -v ON_ERROR_STOP=0 >>"$log" 2>&1 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'autoprune') THEN
    CREATE ROLE autoprune LOGIN PASSWORD 'autoprune';
  END IF;
END $$;
SQL
      $as_postgres createdb -O autoprune autoprune >>"$log" 2>&1 || true
      echo "export AUTOPRUNE_TEST_POSTGRES=postgresql://autoprune:autoprune@127.0.0.1:5432/autoprune"
    else
      echo "services: WARNING: PostgreSQL did not start (see $log); its tests will skip" >&2
    fi
  fi
fi

#!/usr/bin/env bash
# Builds and tests the TypeScript client SDK (sdk/client): install from the lockfile,
# typecheck, bundle, then unit tests and integration tests against real routers.
# The router binary is $SWITCHYARD_BIN, else target/debug/switchyard (build it first);
# the cluster test needs etcd on PATH (or $SWITCHYARD_ETCD_BIN) and is skipped without it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${SWITCHYARD_BIN:-}" ]]; then
  SWITCHYARD_BIN="$(cd "$(dirname "$SWITCHYARD_BIN")" && pwd)/$(basename "$SWITCHYARD_BIN")"
  export SWITCHYARD_BIN
fi
bin="${SWITCHYARD_BIN:-$root/target/debug/switchyard}"
if [[ ! -x "$bin" ]]; then
  echo "[sdk] router binary $bin not found: run 'cargo build -p switchyard' or set SWITCHYARD_BIN" >&2
  exit 1
fi

cd "$root/sdk/client"
echo "[sdk] npm ci"
npm ci --no-audit --no-fund --loglevel=error
echo "[sdk] typecheck"
npm run --silent typecheck
echo "[sdk] build"
npm run --silent build
echo "[sdk] test (router: $bin)"
npm test
echo "[sdk] ok"

#!/usr/bin/env bash
# Stop the detached local SuperLink that `flwr run .` started, by its PID.
# Usage: scripts/stop-local-superlink.sh [PORT]   (default: $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT or 39091)
set -euo pipefail
case "${1:-}" in -h|--help) sed -n 2,3p "$0" | cut -c3-; exit 0 ;; esac
port=${1:-${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}}
pid=$(ss -ltnpH "sport = :$port" | grep -oE 'pid=[0-9]+' | head -n 1 | cut -d= -f2 || true)
if [ -z "$pid" ]; then
  echo "no process listens on port $port: nothing to stop" >&2
  exit 0
fi
if ! tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q flower-superlink; then
  echo "port $port belongs to PID $pid, which is not a flower-superlink: not stopping it" >&2
  exit 1
fi
kill -TERM "$pid"
for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { echo "stopped SuperLink PID $pid"; exit 0; }; sleep 0.2; done
echo "SuperLink PID $pid did not stop within 10 s" >&2
exit 1

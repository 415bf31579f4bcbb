#!/usr/bin/env bash
# Starts the edge service and runs the device runtime against it on localhost with the
# default model pair: dssd beside edge-only and device-only, same prompt, same seed.
set -euo pipefail
PY=${1:-python}
PORT=${DEMO_PORT:-8765}
PROMPT=${DEMO_PROMPT:-"Explain in two sentences why the sky is blue."}
LOG=$(mktemp -d)
"$PY" -m edge_service --port "$PORT" --threads 1 >"$LOG/edge.out" 2>"$LOG/edge.err" &
EDGE=$!
trap 'kill $EDGE 2>/dev/null; wait $EDGE 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  grep -q ready "$LOG/edge.out" 2>/dev/null && break
  kill -0 $EDGE 2>/dev/null || { cat "$LOG/edge.err" >&2; exit 1; }
  sleep 1
done
grep -q ready "$LOG/edge.out" || { echo "edge did not start; see $LOG/edge.err" >&2; exit 1; }
cat "$LOG/edge.out"
for MODE in dssd edge-only device-only; do
  echo
  echo "=== mode $MODE ==="
  "$PY" -m device_runtime --edge "ws://127.0.0.1:$PORT" --threads 1 --mode "$MODE" \
    --chat "$PROMPT" --max-new-tokens 96 --temperature 0 2>&1
done

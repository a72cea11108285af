#!/usr/bin/env bash
# Start this site's Flower SuperNode for a fedsynth federation. Edit, then run as the service user.
#
# By default the SuperNode runs with --isolation process beside one long-lived fedsynth site worker
# (the site's ClientApp): the engine, data and state stay in memory across rounds. If either process
# exits, the other is stopped and the script exits non-zero, so a service manager can restart both.
# ISOLATION=subprocess keeps Flower's default (a fresh ClientApp process for every message).
set -euo pipefail
SUPERLINK=${SUPERLINK:-agg.example.org:9092}      # the aggregator's Fleet API
CERTS=${CERTS:-/etc/fedsynth}                     # ca.crt and this site's <site>.auth (0600)
SITE=${SITE:-site1}
DATA_CONFIG=${DATA_CONFIG:-/data/fedsynth/data.yaml}   # absolute path
APPIO=${APPIO:-127.0.0.1:9094}                    # the SuperNode's ClientAppIo API (this host only)
ISOLATION=${ISOLATION:-process}
export FLWR_TELEMETRY_ENABLED=0
# fedsynth-supernode = flwr's flower-supernode with a 0.25 s idle poll instead of 3 s (same arguments)
supernode=(fedsynth-supernode
  --superlink "$SUPERLINK"
  --root-certificates "$CERTS/ca.crt"
  --auth-supernode-private-key "$CERTS/$SITE.auth"
  --clientappio-api-address "$APPIO"
  --node-config "data-config=\"$DATA_CONFIG\"")
if [ "$ISOLATION" = subprocess ]; then
  exec "${supernode[@]}"
fi
"${supernode[@]}" --isolation process &
SUPERNODE=$!
fedsynth federate flower-site-worker --clientappio-api-address "$APPIO" --supernode-pid "$SUPERNODE" &
WORKER=$!
trap 'kill "$SUPERNODE" "$WORKER" 2>/dev/null || true' EXIT INT TERM
wait -n "$SUPERNODE" "$WORKER"

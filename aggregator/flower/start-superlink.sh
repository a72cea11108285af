#!/usr/bin/env bash
# Start the Flower SuperLink for a fedsynth federation (TLS + SuperNode authentication).
# Set the variables (or edit their defaults), then run as the service user. Only FLEET (9092)
# must be reachable by the hospitals; keep SERVERAPPIO and CONTROL on 127.0.0.1.
set -euo pipefail
CERTS=${CERTS:-/etc/fedsynth}                      # ca.crt, server.crt, server.key (0600)
STATE=${STATE:-/srv/fedsynth}                      # SuperLink database
FLEET=${FLEET:-0.0.0.0:9092}                       # the address hospitals connect to
SERVERAPPIO=${SERVERAPPIO:-127.0.0.1:9091}         # ServerAppIo API (this host only)
CONTROL=${CONTROL:-127.0.0.1:9093}                 # Control API: the flwr CLI (this host only)
export FLWR_TELEMETRY_ENABLED=0
mkdir -p "$STATE"
cd "$STATE"
exec flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" \
  --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key" \
  --fleet-api-address "$FLEET" \
  --serverappio-api-address "$SERVERAPPIO" \
  --control-api-address "$CONTROL" \
  --enable-supernode-auth \
  --database "$STATE/superlink.db"

#!/usr/bin/env bash
# Start this site's Flower SuperNode for a fedsynth federation. Edit, then run as the service user.
set -euo pipefail
SUPERLINK=${SUPERLINK:-agg.example.org:9092}      # the aggregator's Fleet API
CERTS=${CERTS:-/etc/fedsynth}                     # ca.crt and this site's <site>.auth (0600)
SITE=${SITE:-site1}
DATA_CONFIG=${DATA_CONFIG:-/data/fedsynth/data.yaml}   # absolute path
export FLWR_TELEMETRY_ENABLED=0
exec flower-supernode \
  --superlink "$SUPERLINK" \
  --root-certificates "$CERTS/ca.crt" \
  --auth-supernode-private-key "$CERTS/$SITE.auth" \
  --clientappio-api-address 127.0.0.1:9094 \
  --node-config "data-config=\"$DATA_CONFIG\""

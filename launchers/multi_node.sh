#!/usr/bin/env bash
# Several machines with torchrun's c10d rendezvous. Run the same command on every node:
#   HEAD=10.0.0.1 NNODES=2 NPROC=1 launchers/multi_node.sh configs/quickstart.yaml
# HEAD must be a private address reachable from every node (see docs/distributed.md: there is no
# authentication or encryption). Rank 0 (the server) lands on one of the nodes.
# To pin RPC traffic to a private interface, also export TP_SOCKET_IFNAME=<iface> (and GLOO_SOCKET_IFNAME).
set -euo pipefail
config=${1:?usage: $0 CONFIG [fedpeft options]}; shift
: "${HEAD:?set HEAD to the rendezvous host (a private address)}"
exec torchrun \
  --nnodes="${NNODES:-2}" --nproc-per-node="${NPROC:-1}" \
  --rdzv-backend=c10d --rdzv-endpoint="${HEAD}:${PORT:-29500}" --rdzv-id="${JOB_ID:-fedpeft}" \
  -m lightning_fedpeft fit --config "$config" "$@"

#!/usr/bin/env bash
# Edge boards over ssh, one process per board, no torchrun: a board that dies or hangs only loses its
# own client (torchrun would tear down every worker it manages). This machine runs rank 0 (the server).
#   SERVER=192.168.1.10 BOARDS="pi1 pi2 nano1" REPO=~/lightning-fedpeft launchers/edge_ssh.sh configs/quickstart.yaml --federation.mode=real --data.num_clients=4
# With --federation.mode=real each rank is one client (client id = rank) training on its own data;
# set data.num_clients to the number of ranks (boards + 1), or point each board at its own files.
# Requires: passwordless ssh to each board, the repo installed there, SERVER a private address.
set -euo pipefail
config=${1:?usage: $0 CONFIG [fedpeft options]}; shift
: "${SERVER:?set SERVER to this machine's private address}" "${BOARDS:?set BOARDS to the board hostnames}"
read -r -a boards <<< "$BOARDS"
world=$(( ${#boards[@]} + 1 ))
port=${PORT:-29500}
common="WORLD_SIZE=$world MASTER_ADDR=$SERVER MASTER_PORT=$port OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}"
for i in "${!boards[@]}"; do
  rank=$(( i + 1 ))
  ssh "${boards[$i]}" "cd ${REPO:-~/lightning-fedpeft} && env RANK=$rank LOCAL_RANK=0 $common fedpeft fit --config $config $*" \
    > "edge-rank$rank.log" 2>&1 &
done
env RANK=0 LOCAL_RANK=0 WORLD_SIZE="$world" MASTER_ADDR="$SERVER" MASTER_PORT="$port" fedpeft fit --config "$config" "$@"
wait || true  # a board that failed is already recorded as missing by the server

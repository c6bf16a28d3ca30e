#!/usr/bin/env bash
# Edge boards over ssh, one process per board, no torchrun: a board that dies or hangs only loses its
# own client (torchrun would tear down every worker it manages). This machine runs rank 0 (the server).
#   SERVER=192.168.1.10 BOARDS="pi1 pi2 nano1" REPO=~/lightning-fedpeft launchers/edge_ssh.sh configs/quickstart.yaml
#     --federation.mode=real --federation.clients_per_round=4 --data.corpus=null --data.train_file=local.csv --data.num_clients=1
# With --federation.mode=real each rank is one client (client id = rank) training on all of its own data
# (data.num_clients=1, each board its own local.csv); every rank trains every round, so
# clients_per_round is the number of ranks (boards + 1).
# Requires: passwordless ssh to each board, the repo installed there, SERVER a private address.
set -euo pipefail
config=${1:?usage: $0 CONFIG [fedpeft options]}; shift
: "${SERVER:?set SERVER to the private address of this machine}" "${BOARDS:?set BOARDS to the board hostnames}"
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

#!/bin/bash
# Prepare a dataset on a Slurm cluster: the tokenizer and the KG index once, the join as an array job of
# SHARDS tasks (each joins its share of the chunks on its own node), the merge once every task succeeded.
#
#   launcher/slurm/data_prep.sh 16 --corpus /shared/raw/wiki --kg /shared/kg/wikidata5m.tsv \
#       --aliases /shared/kg/aliases.tsv --output /shared/data/wiki --seq_len 2048
#
# Run it from the repository root with the Python environment active (sbatch passes the environment on).
# Every argument after SHARDS goes to each stage: data_prep requires the same config on every machine.
# The output and its <output>.parts and <output>.kgindex folders must be on a filesystem every node shares:
# the first job writes the tokenizer and the KG index there, each join task reads them (the index is
# memory-mapped, so a node's workers share one copy) and writes its chunks, the merge packs them.
#
# Variables (optional):
#   SBATCH_ARGS  options for all three submissions, e.g. "--partition=cpu --time=04:00:00 --account=x"
#   JOIN_CPUS    cores of each join task, its --workers (default 8)
#   PYTHON       the interpreter the jobs run (default: python)
#
# Prints the three job ids. The merge depends on every join task (afterok) and is cancelled if one fails
# (--kill-on-invalid-dep); chunks already joined are kept, so submitting again redoes only what is missing.
set -euo pipefail

shards="${1:?usage: launcher/slurm/data_prep.sh SHARDS <data_prep options, as for python -m data_prep run>}"
shift
if ! [[ "$shards" =~ ^[1-9][0-9]*$ ]]; then
    echo "data_prep.sh: SHARDS must be a positive number of join tasks, not '$shards'" >&2
    exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
read -r -a extra <<< "${SBATCH_ARGS:-}"
cpus="${JOIN_CPUS:-8}"

tok=$(sbatch --parsable "${extra[@]}" --cpus-per-task="$cpus" "$here/data_prep.sbatch" tokenizer "$@")
join=$(sbatch --parsable "${extra[@]}" --dependency="afterok:$tok" --kill-on-invalid-dep=yes \
    --array="0-$((shards - 1))" --cpus-per-task="$cpus" "$here/data_prep.sbatch" join "$@")
merge=$(sbatch --parsable "${extra[@]}" --dependency="afterok:$join" --kill-on-invalid-dep=yes \
    --cpus-per-task="$cpus" "$here/data_prep.sbatch" merge "$@")
echo "data_prep.sh: tokenizer job $tok, join array job $join ($shards tasks), merge job $merge"

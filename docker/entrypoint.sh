#!/usr/bin/env bash
# Entry point of the sparsexpert images (docker/Dockerfile.gpu, docker/Dockerfile.cpu).
#
#   (no arguments)            deepspeed launcher/pretrain.py --ds_config $SPARSEXPERT_DS_CONFIG
#   --train.max_steps=20 ...  the same, with these arguments appended
#   pretrain ARGS...          deepspeed launcher/pretrain.py --ds_config $SPARSEXPERT_DS_CONFIG ARGS...
#   finetune ARGS...          deepspeed launcher/finetune.py --ds_config $SPARSEXPERT_DS_CONFIG ARGS...
#   evaluate ARGS...          deepspeed launcher/evaluate.py ARGS...
#   ablate ARGS...            python launcher/ablate.py --ds_config $SPARSEXPERT_DS_CONFIG ARGS...
#   compare ARGS...           python launcher/compare.py --ds_config $SPARSEXPERT_DS_CONFIG ARGS...
#                             (these two start deepspeed themselves)
#   anything else             run as given: bash, tensorboard ..., python -m data_prep ...,
#                             python -m pytest -q, deepspeed --num_gpus 4 launcher/pretrain.py ...
#
# The launcher forms run from the repository root, use every GPU of the container and take the
# image's DeepSpeed config unless ARGS give another --ds_config (the last one wins; evaluate takes
# none). For --num_gpus, a hostfile, or --no_ssh on several nodes, call deepspeed yourself (the
# last form).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ds_config="${SPARSEXPERT_DS_CONFIG:-ds_configs/moe_z2.json}"

if [[ $# -eq 0 || "$1" == -* ]]; then
    set -- pretrain "$@"
fi

case "$1" in
    pretrain)
        shift
        cd "$repo"
        exec deepspeed launcher/pretrain.py --ds_config "$ds_config" "$@"
        ;;
    finetune)
        shift
        cd "$repo"
        exec deepspeed launcher/finetune.py --ds_config "$ds_config" "$@"
        ;;
    evaluate)
        shift
        cd "$repo"
        exec deepspeed launcher/evaluate.py "$@"
        ;;
    ablate)
        shift
        cd "$repo"
        exec python launcher/ablate.py --ds_config "$ds_config" "$@"
        ;;
    compare)
        shift
        cd "$repo"
        exec python launcher/compare.py --ds_config "$ds_config" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac

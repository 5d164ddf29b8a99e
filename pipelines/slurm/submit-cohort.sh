#!/usr/bin/env bash
# Submit the whole cohort workflow to SLURM as four dependent jobs (docs/clusters.md):
#
#   1. preprocess: participant.sbatch as a job array, one participant a task
#   2. train:      train.sbatch (group --train), after every task of 1 succeeded
#   3. harmonize:  participant.sbatch --target-site TARGET_SITE as a job array, after 2
#   4. group:      group.sbatch (group QC), after every task of 3 succeeded
#
#   pipelines/slurm/submit-cohort.sh BIDS_DIR OUTPUT_DIR TARGET_SITE
#
# and prints the four job ids (preprocess=... train=... harmonize=... group=...). Step 3 reuses
# step 1's preprocessing when IHF_BIDS_WORK_ROOT is on a file system all nodes share.
#
# Environment (besides those of the job scripts: IHF_BIDS_IMAGE, IHF_BIDS_WORK_ROOT...):
#   IHF_BIDS_PARTICIPANT_ARGS  extra ihf-bids options of both participant steps (e.g. "--registration syn")
#   IHF_BIDS_TRAIN_ARGS        extra options of group --train (e.g. "--train-preset preset.toml")
#   IHF_BIDS_GROUP_ARGS        extra options of the group QC step
#   IHF_BIDS_SBATCH_ARGS       extra sbatch options of every job (e.g. "--partition=short --account=lab")
#   IHF_BIDS_TRAIN_SBATCH_ARGS extra sbatch options of the training job (e.g. "--gres=gpu:4",
#                              or "--gres=none" on a cluster without GPUs)
#   IHF_BIDS_ARRAY_LIMIT       array tasks running at once (default 50)
#   IHF_BIDS_LOG_DIR           job logs (default OUTPUT_DIR/logs/slurm)
# The *_ARGS values are split on white space (no quoting inside them).
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 BIDS_DIR OUTPUT_DIR TARGET_SITE" >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bids_dir=$(cd "$1" && pwd)
mkdir -p "$2"
out_dir=$(cd "$2" && pwd)
target=$3
log_dir=${IHF_BIDS_LOG_DIR:-$out_dir/logs/slurm}
mkdir -p "$log_dir"

if [ -n "${IHF_BIDS_PARTICIPANTS:-}" ]; then
    n=$(grep -cv '^[[:space:]]*$' "$IHF_BIDS_PARTICIPANTS")
else
    n=$(awk -F'\t' 'NR > 1 && $1 != ""' "$bids_dir/participants.tsv" | wc -l)
fi
[ "$n" -gt 0 ] || { echo "no participants listed in $bids_dir/participants.tsv" >&2; exit 2; }
array="1-$n%${IHF_BIDS_ARRAY_LIMIT:-50}"

read -r -a sbatch_args <<< "${IHF_BIDS_SBATCH_ARGS:-}"
read -r -a train_sbatch_args <<< "${IHF_BIDS_TRAIN_SBATCH_ARGS:-}"
read -r -a participant_args <<< "${IHF_BIDS_PARTICIPANT_ARGS:-}"
read -r -a train_args <<< "${IHF_BIDS_TRAIN_ARGS:-}"
read -r -a group_args <<< "${IHF_BIDS_GROUP_ARGS:-}"

submit() { sbatch --parsable "${sbatch_args[@]}" "$@" | cut -d';' -f1; }

preprocess=$(submit --array="$array" --job-name=ihf-preprocess -o "$log_dir/preprocess-%A_%a.out" \
    "$here/participant.sbatch" "$bids_dir" "$out_dir" "${participant_args[@]}")
train=$(submit --dependency="afterok:$preprocess" --job-name=ihf-train -o "$log_dir/train-%j.out" \
    "${train_sbatch_args[@]}" "$here/train.sbatch" "$bids_dir" "$out_dir" "${train_args[@]}")
harmonize=$(submit --array="$array" --dependency="afterok:$train" --job-name=ihf-harmonize \
    -o "$log_dir/harmonize-%A_%a.out" \
    "$here/participant.sbatch" "$bids_dir" "$out_dir" --target-site "$target" "${participant_args[@]}")
group=$(submit --dependency="afterok:$harmonize" --job-name=ihf-group -o "$log_dir/group-%j.out" \
    "$here/group.sbatch" "$bids_dir" "$out_dir" "${group_args[@]}")
echo "preprocess=$preprocess train=$train harmonize=$harmonize group=$group"

#!/usr/bin/env bash
# Show a SLURM job's state and follow its log:  IDUN/watch_job.sh JOBID
set -euo pipefail
if [ $# -ne 1 ]; then echo "usage: $0 JOBID" >&2; exit 2; fi
job=$1
command -v squeue >/dev/null || { echo "error: squeue not found (run this on the cluster login node)" >&2; exit 2; }
squeue -j "$job" -o "%.10i %.20j %.8T %.10M %.6D %R" 2>/dev/null || sacct -j "$job" --format=JobID,JobName,State,Elapsed
log=$(scontrol show job "$job" 2>/dev/null | sed -n 's/.*StdOut=\([^ ]*\).*/\1/p')
if [ -n "$log" ] && [ -f "$log" ]; then tail -n 40 -f "$log"; else echo "no log file yet for job $job"; fi

#!/usr/bin/env bash
# `cdm bench` on a lent GPU machine, inside one time-limited call: the backbone's transformer on the GPU,
# the parts in parallel processes (CPU side: 16 cores there), one results directory per backbone.
#
#   bash benchmarks/full_on_gpu.sh RUNS_DIR NAME=BACKBONE [NAME=BACKBONE ...]
#
# Per backbone, chain A runs paragon, table1, memorization, cost, forget, continual (each needs the one before
# it or its stores); chain B runs two_domain and dp, then attribution once table1 has written the 2-way store.
# Parts are cached (RUNS_DIR/NAME/parts/*.json), so a run stopped at DEADLINE seconds keeps what finished and
# resumes anywhere. Environment: PROFILE (full), DEVICE (cuda), THREADS (CPU threads per process, 3),
# DEADLINE (seconds, 480).
set -u
RUNS=${1:?usage: full_on_gpu.sh RUNS_DIR NAME=BACKBONE ...}
shift
PROFILE=${PROFILE:-full}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-3}
DEADLINE=${DEADLINE:-480}
START=$(date +%s)
mkdir -p "$RUNS"

bench() {  # bench OUT BACKBONE PARTS
    python3 -m cdm bench --profile "$PROFILE" --device "$DEVICE" --threads "$THREADS" --out "$1" --backbone "$2" \
        --parts "$3"
}

pids=()
for spec in "$@"; do
    name=${spec%%=*}
    bb=${spec#*=}
    out="$RUNS/$name"
    mkdir -p "$out"
    (bench "$out" "$bb" paragon,table1,memorization,cost,forget,continual) >"$RUNS/$name-A.log" 2>&1 &
    apid=$!
    pids+=($apid)
    (bench "$out" "$bb" two_domain,dp
     while [ ! -f "$out/parts/table1.json" ] && kill -0 $apid 2>/dev/null; do sleep 5; done
     bench "$out" "$bb" attribution) >"$RUNS/$name-B.log" 2>&1 &
    pids+=($!)
done

while :; do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    if [ $(( $(date +%s) - START )) -ge "$DEADLINE" ]; then
        echo "deadline ${DEADLINE}s reached: stopping the parts still running"
        for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; done
        sleep 2
        break
    fi
    sleep 5
done
echo "elapsed $(( $(date +%s) - START )) s"
for spec in "$@"; do
    name=${spec%%=*}
    echo "== $name: parts done: $(ls "$RUNS/$name/parts" 2>/dev/null | tr '\n' ' ')"
done

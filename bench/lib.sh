# Sourced by bench/run.sh and bench/memory.sh: one memory-limited run of a benchmark command
# under the cgroup v1 memory controller (needs root), page cache dropped first (it counts
# against the limit). Set before sourcing: CG (the cgroup's path, made and removed per run);
# optional RUNS (names to run, space-separated; default all), TIMEOUT (seconds, default 1800),
# RUN_FIELDS (JSON fields, each followed by ", ", put into every line).

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# run LIMIT|none NAME CMD...: one JSON line with the limit, the cgroup's peak and OOM kills
# and the command's own JSON output.
run() {
    local limit=$1 name=$2; shift 2
    case " ${RUNS:-$name} " in *" $name "*) ;; *) return 0 ;; esac
    drop_caches
    mkdir -p "$CG"
    if [ "$limit" != none ]; then echo "$limit" > "$CG/memory.limit_in_bytes"; fi
    local out rc=0 err="/tmp/$(basename "$CG").err"
    out=$(timeout "${TIMEOUT:-1800}" sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG" "$@" 2>"$err") || rc=$?
    local peak oom
    peak=$(cat "$CG/memory.max_usage_in_bytes")
    oom=$(awk '/^oom_kill /{print $2}' "$CG/memory.oom_control")
    rmdir "$CG"
    [ -n "$out" ] || out=null
    echo "{\"run\": \"$name\", ${RUN_FIELDS:-}\"limit\": \"$limit\", \"cgroup_peak\": $peak, \"oom_kills\": ${oom:-0}, \"exit\": $rc, \"result\": $out}"
    if [ "$rc" != 0 ]; then tail -3 "$err" >&2; fi
    rm -f "$err"
}

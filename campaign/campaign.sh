#!/usr/bin/env bash
# The paper-scale study on CPUs, run a few hours at a time until it is done.
#
#   bash campaign/campaign.sh start [PART ...]  # resume unfinished parts (all, or those
#                                               # named) in the background
#   bash campaign/campaign.sh stop [PART ...]   # SIGTERM, wait for the resume line (commit
#                                               # after)
#   bash campaign/campaign.sh status   # models finished, CPU time, last lines
#   bash campaign/campaign.sh collect  # once all are done: docs/full/, the paper-scale
#                                      # results JSON, figures and claims table, from
#                                      # committed records
#
# Each line of campaign/pins.txt is one part: a name, the commit whose code runs it, its
# experiments and the settings (--set NAME=VALUE) it runs with, if any. A part always runs from a git worktree at its commit, so later changes
# to the script never mix into its numbers; its records, snapshots, log and (once done)
# results JSON and figures are under campaign/<name>/. A stopped part resumes from its
# records and from the snapshot of the group it was training.
#
# While a part runs, it holds campaign/<name>/log.txt open: a `git stash`, `checkout` or
# `reset` that rewrites that file leaves the run writing into the old, deleted one (its
# lines are then only in /proc/<pid>/fd/1 until it ends). Commit after `stop`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
trees=${CAMPAIGN_TREES:-/tmp/ncc-campaign}
preset=${CAMPAIGN_PRESET:-full}  # another preset only to try this script out quickly
mkdir -p "$trees"

# the parts of pins.txt, or of those the command line names ($chosen)
parts() {
    grep -v '^#' "$root/campaign/pins.txt" | awk -v chosen="$chosen" '
        BEGIN { n = split(chosen, names, " "); for (i = 1; i <= n; i++) want[names[i]] = 1 }
        NF >= 3 && (n == 0 || $1 in want)'
}
# the --set arguments of a part's settings ("REPLICATES=3 ..." -> --set REPLICATES=3 ...)
sets() { local s; for s in $1; do printf -- '--set\n%s\n' "$s"; done; }
pid_of() { cat "$trees/$1.pid" 2>/dev/null || true; }
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
# CPU time of a run and its worker processes, in hours: the run's own, its live workers',
# and (cutime + cstime in /proc/<pid>/stat) that of workers which have already exited
cpu_hours() {
    local reaped
    reaped=$(awk -v hz="$(getconf CLK_TCK)" '{sub(/^.*\) /, ""); print ($14 + $15) / hz}' \
             "/proc/$1/stat" 2>/dev/null || echo 0)
    ps -eo pid,ppid,times | awk -v p="$1" -v r="$reaped" '$1 == p || $2 == p {s += $3}
                                  END {printf "%.2f", (s + r) / 3600}'
}

# Every part running at once trains as many groups as their workers, and each stop's
# commit then stores a new snapshot of each (about 1 MB): naming one part to start keeps
# the repository's growth to its groups' snapshots, at the same speed on a 2-core machine.
command=${1:-status}
shift || true
chosen="$*"
[ "$command" = collect ] && chosen=""  # collect always takes every part
case "$command" in
start)
    parts | while read -r name commit experiments settings; do
        pid=$(pid_of "$name")
        if alive "$pid"; then echo "$name: running (pid $pid)"; continue; fi
        # a finished part's results would be rewritten with the wall time of a rerun
        # that only reads its records
        if [ -f "$root/campaign/$name/neural_collapse_cka_results.json" ]; then
            echo "$name: finished"; continue
        fi
        tree="$trees/$commit"
        [ -d "$tree" ] || git -C "$root" worktree add --detach "$tree" "$commit" >/dev/null
        out="$root/campaign/$name"
        mkdir -p "$out"
        {
            echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') start: commit $commit," \
                 "$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
        } >> "$out/log.txt"
        mapfile -t extra < <(sets "$settings")
        (cd "$tree" && exec nohup nice -n 19 python neural_collapse_cka.py --preset "$preset" \
            --device cpu --experiments "$experiments" --set PROGRESS_SECONDS=600 \
            "${extra[@]}" --out "$out" >> "$out/log.txt" 2>&1) &
        echo $! > "$trees/$name.pid"
        echo "$name: started (pid $!, commit $commit, experiments $experiments${settings:+, $settings})"
    done
    ;;
stop)
    parts | while read -r name commit experiments settings; do
        pid=$(pid_of "$name")
        alive "$pid" || { echo "$name: not running"; continue; }
        cpu=$(cpu_hours "$pid")
        kill -TERM "$pid"  # the parent alone: it stops its workers and saves what it can
        for _ in $(seq 600); do alive "$pid" || break; sleep 0.5; done
        if alive "$pid"; then echo "$name: still running after 300 s (pid $pid)"; continue; fi
        echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') stopped after $cpu CPU-hours" \
            >> "$root/campaign/$name/log.txt"
        echo "$name: stopped after $cpu CPU-hours (the run and its workers)"
    done
    ;;
status)
    parts | while read -r name commit experiments settings; do
        pid=$(pid_of "$name")
        state=$(alive "$pid" && echo "running (pid $pid)" || echo "not running")
        models=$(find "$root/campaign/$name/records" -name '*.json' ! -name '.*' \
                 ! -name 'shards_*' 2>/dev/null | wc -l || true)
        alive "$pid" && state="$state, $(cpu_hours "$pid") CPU-hours this stretch"
        total=$({ grep -o 'after [0-9.]* CPU-hours' "$root/campaign/$name/log.txt" || true; } |
                awk '{s += $2} END {printf "%.2f", s}')
        echo "$name ($experiments, commit ${commit:0:7}): $state, $models models finished," \
             "$total CPU-hours in stretches before"
        tail -n 3 "$root/campaign/$name/log.txt" 2>/dev/null | sed 's/^/    /'
    done
    ;;
collect)
    # Each experiment comes from the last part that runs it. Each such part's results from
    # its own records by its own commit (record names depend on the code), then one merged
    # results JSON, its per-model table and its figures, made by this checkout.
    declare -A supplier
    while read -r name commit experiments settings; do
        for e in ${experiments//,/ }; do supplier[$e]=$name; done
    done < <(parts)
    files=()
    merge=$(mktemp -d)
    trap 'rm -rf "$merge"' EXIT
    while read -r name commit experiments settings; do
        supplies=()
        for e in ${experiments//,/ }; do
            [ "${supplier[$e]}" = "$name" ] && supplies+=("$e")
        done
        [ ${#supplies[@]} -gt 0 ] || continue
        tree="$trees/$commit"
        [ -d "$tree" ] || git -C "$root" worktree add --detach "$tree" "$commit" >/dev/null
        mapfile -t extra < <(sets "$settings")
        (cd "$tree" && python neural_collapse_cka.py --preset "$preset" --device cpu \
            --experiments "$experiments" --set PROGRESS_SECONDS=600 "${extra[@]}" \
            --out "$root/campaign/$name" --collect) | tail -n 1
        # what the results cannot know: the machines that trained the part (a collect
        # notes only its own) and their CPU time, from its log; and its commit, which code
        # older than the provenance in every results file did not note
        python - "$root/campaign/$name/neural_collapse_cka_results.json" "$commit" \
            "$root/campaign/$name/log.txt" <<'PY'
import json, re, sys
path, commit, log = sys.argv[1:]
results = json.load(open(path))
provenance = results["env"].setdefault("provenance", {})
provenance["git_commit"] = provenance.get("git_commit") or commit
text = open(log).read()
starts = {}
for cpu in re.findall(r"^=== .* start: commit \w+, \d+ cores, (.*)$", text, re.M):
    starts[cpu] = starts.get(cpu, 0) + 1
results["env"]["campaign"] = {
    "starts_by_cpu": starts,
    "cpu_hours": round(sum(map(float, re.findall(r"after ([0-9.]+) CPU-hours", text))), 2)}
json.dump(results, open(path, "w"), indent=1)
PY
        # the experiments this part supplies, when a later part reruns some of its own
        part="$root/campaign/$name/neural_collapse_cka_results.json"
        if [ "${supplies[*]}" != "${experiments//,/ }" ]; then
            mkdir -p "$merge/$name"  # the part's model table beside it, for the merge
            cp "$root/campaign/$name/neural_collapse_cka_models.csv" "$merge/$name/" \
                2>/dev/null || true
            python - "$part" "$merge/$name/neural_collapse_cka_results.json" \
                "${supplies[@]}" <<'PY'
import json, sys
path, out, *keep = sys.argv[1:]
results = json.load(open(path))
for number in results["config"]["experiments"]:
    if str(number) not in keep:
        results.pop(f"exp{number}", None)
results["config"]["experiments"] = [int(n) for n in keep]
json.dump(results, open(out, "w"), indent=1)
PY
            part="$merge/$name/neural_collapse_cka_results.json"
        fi
        files+=("$part")
    done < <(parts)
    python "$root/neural_collapse_cka.py" --plot-only "${files[@]}" --out "$root/docs/full"
    # the claims table seed by seed, in full (the README shows its --brief form)
    {
        echo "# The seed study's claims at paper scale, seed by seed"
        echo
        echo "Made by \`python tools/claims.py docs/full/neural_collapse_cka_results.json\`;"
        echo "its rules are in that script's docstring."
        echo
        python "$root/tools/claims.py" "$root/docs/full/neural_collapse_cka_results.json"
    } > "$root/docs/full/claims.md"
    ;;
*)
    echo "usage: bash campaign/campaign.sh start|stop|status|collect" >&2
    exit 2
    ;;
esac

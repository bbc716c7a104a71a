#!/usr/bin/env bash
# Regenerates crates/node/link/startup.order: the functions an idle manager and an idle worker
# execute, which the release build of `starling` lays out first and together in its .text
# (build.rs passes the file to the linker). A process's RSS counts every page of the binary it
# has mapped, and the kernel maps the 64 KiB around each page a process touches: scattered over
# 13 MiB of code, the few MiB an idle node runs kept ~10 MiB of it resident.
#
# How: a release build, a manager (`init`) and a worker (`join`) on loopback, one of them
# under valgrind's callgrind (which records every function that ran), 40 s idle, then the
# functions of the `starling` binary in the order callgrind wrote them: the worker's first,
# then the manager's others. Needs valgrind and python3. Run it after a dependency or
# toolchain upgrade: symbol names carry a hash of their crate's build metadata (which takes in
# the rustc version), and a few carry LTO's numbering, so they drift; names the binary no
# longer has are skipped by the linker, so a stale file only costs memory, never a build
# (`starling-bench memory` reports how many names the binary has). Under valgrind, ring picks
# its AES-NI/AVX routines; a CPU with VAES runs others natively, which stay where they are.
#
# Usage: crates/node/link/regenerate.sh [path/to/release/starling], on an otherwise idle machine
# (under valgrind a node runs ~50 times slower; with other load, `init` can time out).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
bin="${1:-$root/target/release/starling}"
[ -x "$bin" ] || { echo "no binary at $bin: cargo build --release -p starling-node first" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
bin="$(readlink -f "$bin")"
work="$(mktemp -d /tmp/starling-order.XXXX)"
pids=()
# Stops a child process and reaps it: SIGTERM, then SIGKILL if it still runs after 30 s.
stop() {
    kill "$1" 2>/dev/null || true
    for _ in $(seq 1 300); do
        state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1 || true)"
        [ -n "$state" ] && [ "$state" != Z ] || break
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
cleanup() {
    local status=$?
    for p in ${pids[@]+"${pids[@]}"}; do stop "$p"; done
    rm -f "$here/startup.order.new"
    # The nodes' and valgrind's logs stay for a failed run.
    if [ "$status" = 0 ]; then rm -rf "$work"; else echo "logs kept in $work" >&2; fi
}
trap cleanup EXIT
# The daemon sets this tunable by executing itself again; valgrind would not follow that.
export GLIBC_TUNABLES=glibc.malloc.tcache_count=256

# Polls a command until it succeeds; fails when the deadline (seconds) passes or one of the
# nodes started has exited.
wait_for() {
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out: $*" >&2; return 1; }
        for p in "${pids[@]}"; do
            kill -0 "$p" 2>/dev/null || { echo "a node exited while waiting for: $*" >&2; return 1; }
        done
        sleep 0.5
    done
}
two_ready() { [ "$("$bin" node ls --data-dir "$1" 2>/dev/null | grep -c Ready)" = 2 ]; }

profile() { # $1 = manager | worker: which one runs under callgrind
    local role=$1 dir="$work/$1" m w
    mkdir -p "$dir"
    local vg=(valgrind --tool=callgrind --demangle=no --log-file="$dir/valgrind.log"
              --callgrind-out-file="$dir/callgrind.out")
    local init=("$bin" init --data-dir "$dir/m" --listen 127.0.0.1:47191 --dns-listen off)
    if [ "$role" = manager ]; then "${vg[@]}" "${init[@]}" >"$dir/m.log" 2>&1 &
    else "${init[@]}" >"$dir/m.log" 2>&1 & fi
    m=$!; pids+=("$m")
    # valgrind reads the binary's debug information first: a minute or more.
    wait_for 600 "$bin" node ls --data-dir "$dir/m"
    local token
    token="$("$bin" join-token --quiet --data-dir "$dir/m" worker)"
    local join=("$bin" join --data-dir "$dir/w" --listen 127.0.0.1:47192 --dns-listen off
                --token "$token" --manager 127.0.0.1:47191)
    if [ "$role" = worker ]; then "${vg[@]}" "${join[@]}" >"$dir/w.log" 2>&1 &
    else "${join[@]}" >"$dir/w.log" 2>&1 & fi
    w=$!; pids+=("$w")
    wait_for 600 two_ready "$dir/m"
    echo "$role: both nodes ready; idle for 40 s" >&2
    sleep 40
    stop "$w"; stop "$m"
    pids=()
    [ -s "$dir/callgrind.out" ] || { echo "callgrind wrote nothing (see $dir/valgrind.log)" >&2; exit 1; }
}
profile worker
profile manager

python3 - "$bin" "$work/worker/callgrind.out" "$work/manager/callgrind.out" >"$here/startup.order.new" <<'PY'
import re, sys
binary, files = sys.argv[1], sys.argv[2:]
line_re = re.compile(r"^(ob|cob|fn|cfn)=\((\d+)\)(?: (.*))?$")
order, seen = [], set()
for path in files:
    objects, names, current = {}, {}, None
    with open(path, errors="replace") as f:
        for line in f:
            m = line_re.match(line.rstrip("\n"))
            if not m:
                continue
            kind, ident, name = m.groups()
            table = objects if kind.endswith("ob") else names
            if name is not None:
                table[ident] = name
            if kind == "ob":
                current = objects.get(ident)
            elif kind == "fn" and current == binary:
                symbol = re.sub(r"'\d+$", "", names.get(ident, ""))  # callgrind's recursion marks
                if symbol.startswith(("_ZN", "_R")) or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", symbol):
                    if symbol not in seen:
                        seen.add(symbol)
                        order.append(symbol)
print("# The functions an idle worker, then an idle manager, run: laid out first in the release")
print("# build's .text (see regenerate.sh, which wrote this file, and build.rs).")
print("\n".join(order))
PY
count=$(grep -vc '^#' "$here/startup.order.new" || true)
# An idle node runs a few thousand of the binary's functions; far fewer means callgrind's
# record did not name this binary as expected.
[ "$count" -ge 1000 ] || { echo "only $count functions recorded: startup.order left as it was" >&2; exit 1; }
mv "$here/startup.order.new" "$here/startup.order"
echo "wrote $(grep -vc '^#' "$here/startup.order") symbols to $here/startup.order" >&2

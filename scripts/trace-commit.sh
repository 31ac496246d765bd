#!/usr/bin/env bash
# Where one Raft commit's time goes on a 3-node cluster at one client: runs
# `wafer-bench commit --clients 1` (no etcd), records only the `sendto`, `recvfrom` and
# `fdatasync` syscalls of the whole machine for a few seconds (cheap enough not to
# change what it measures, unlike a trace of every syscall), and prints the p50 of each
# step of a commit. Not part of the test suite; see docs/benchmarks.md.
# Usage: scripts/trace-commit.sh [SECONDS]   (root, or perf allowed for your user)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { printf 'trace-commit: %s\n' "$*" >&2; }
# shellcheck source=lib.sh
. "$root/scripts/lib.sh"

seconds="${1:-2}"
install_packages linux-perf python3 iproute2
cargo build --release --quiet -p wafer --bin wafer
cargo build --release --quiet -p wafer-bench
wafer="$root/target/release/wafer"
work="$(mktemp -d)"
bench_pid=""
cleanup() {
    # The load generator and the servers it started share its process group.
    [ -z "$bench_pid" ] || kill -- -"$bench_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The one-node round comes first; the three-node round runs long enough to trace.
WAFER_BIN="$wafer" setsid "$root/target/release/wafer-bench" commit --clients 1 \
    --commit-seconds $((seconds + 8)) --etcd /nonexistent >"$work/bench.txt" 2>&1 &
bench_pid=$!
node_pid() { pgrep -f -- "$wafer server --id $1 " | head -n1; }
deadline=$((SECONDS + 120))
until [ -n "$(node_pid 3)" ]; do
    [ $SECONDS -lt $deadline ] || { log "no three-node cluster after 120 s"; exit 1; }
    kill -0 "$bench_pid" 2>/dev/null || { cat "$work/bench.txt" >&2; exit 1; }
    sleep 0.2
done
sleep 3 # joins and warm-up
# Node 1 bootstraps the cluster and leads it (the load generator proposes to it).
leader="$(node_pid 1)"
followers="$(node_pid 2) $(node_pid 3)"
# The leader's end of the load generator's connection: the socket on the leader's
# `--listen` address whose peer is one of wafer-bench's sockets.
listen="$(tr '\0' '\n' </proc/"$leader"/cmdline | grep -A1 -x -- --listen | tail -n1)"
client_fd="$(ss -tnpH | python3 -c '
import re, sys
leader, bench, listen = sys.argv[1], sys.argv[2], sys.argv[3]
socks = []
for line in sys.stdin:
    f = line.split()
    m = re.search(r"pid=(\d+),fd=(\d+)", line)
    if len(f) >= 5 and m:
        socks.append((f[3], f[4], m.group(1), m.group(2)))
bench_addrs = {local for local, _, pid, _ in socks if pid == bench}
for local, peer, pid, fd in socks:
    if pid == leader and local == listen and peer in bench_addrs:
        print(fd)
        break
' "$leader" "$bench_pid" "$listen")"
[ -n "$client_fd" ] || { log "did not find the load generator's connection"; exit 1; }
log "tracing ${seconds} s: leader $leader (client fd $client_fd), followers $followers"
perf record -a -q -o "$work/perf.data" \
    -e syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom \
    -e syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync -- sleep "$seconds" >/dev/null
perf script -i "$work/perf.data" -F comm,pid,time,event,trace 2>/dev/null >"$work/trace.txt"
wait "$bench_pid" || true
bench_pid=""
grep '^| 3 ' "$work/bench.txt" >&2 || true

python3 - "$work/trace.txt" "$leader" "$client_fd" $followers <<'EOF'
"""Per-step p50s of the commits in a syscall trace (see trace-commit.sh)."""
import bisect
import re
import statistics
import sys

path, leader, client_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
followers = {int(p) for p in sys.argv[4:]}
EAGAIN = "0xfffffffffffffff5"
LINE = re.compile(r"\s*(\S+)\s+(\d+)\s+([\d.]+):\s+syscalls:(\S+):(.*)")
events = []
for line in open(path):
    m = LINE.match(line)
    if m:
        comm, pid, t, name, rest = m.groups()
        events.append((float(t) * 1e6, comm, int(pid), name, rest.strip()))


def arg(rest, key):
    m = re.search(key + r": (0x[0-9a-f]+)", rest)
    return int(m.group(1), 16) if m else None


steps = {k: [] for k in ("hb", "pre", "fsync_f", "post", "fsync_l", "out", "tail", "period", "turn")}
follower = {}  # pid -> (stage, time) of the entry being appended
last_recv = {}  # pid -> fd of its last recvfrom
proposal = entry_out = None
acks, flushes, answers = [], [], []
flush_start = client_seen = None
for t, comm, pid, name, rest in events:
    if name == "sys_enter_recvfrom":
        last_recv[pid] = arg(rest, "fd")
    got = None
    if name == "sys_exit_recvfrom" and not rest.endswith(EAGAIN):
        got = int(rest.split()[-1], 16)
    if pid in followers:
        stage = follower.get(pid)
        if got is not None:
            # An append with an entry is larger than one that only carries a commit.
            follower[pid] = ("entry", t) if got >= 400 else ("commit", t)
        elif name == "sys_enter_fdatasync" and stage and stage[0] == "entry":
            steps["pre"].append(t - stage[1])
            follower[pid] = ("fsync", t)
        elif name == "sys_exit_fdatasync" and stage and stage[0] == "fsync":
            steps["fsync_f"].append(t - stage[1])
            follower[pid] = ("synced", t)
        elif name == "sys_enter_sendto" and stage:
            if stage[0] == "synced":
                steps["post"].append(t - stage[1])
                acks.append(t)
            elif stage[0] == "commit":
                steps["hb"].append(t - stage[1])
            follower[pid] = None
    elif pid == leader:
        if got is not None and last_recv.get(pid) == client_fd:
            proposal, entry_out = t, None
        elif name == "sys_enter_sendto":
            fd, size = arg(rest, "fd"), arg(rest, "len")
            if fd == client_fd:
                answers.append(t)
                proposal = None
            elif proposal is not None and entry_out is None and size and size >= 400:
                entry_out = t
                steps["out"].append(t - proposal)
        elif name == "sys_enter_fdatasync":
            flush_start = t
        elif name == "sys_exit_fdatasync" and flush_start is not None:
            steps["fsync_l"].append(t - flush_start)
            flushes.append(t)
    elif comm == "wafer-bench":
        if got is not None:
            client_seen = t
        elif name == "sys_enter_sendto":
            steps["period"].append(t)
            if client_seen is not None:
                steps["turn"].append(t - client_seen)
                client_seen = None
# From the later of the first follower's answer and the leader's own flush (both are
# needed before the leader applies) to the leader's answer to its client.
for before, answer in zip(answers, answers[1:]):
    ack = acks[bisect.bisect_left(acks, before) : bisect.bisect_left(acks, answer)]
    flush = flushes[bisect.bisect_left(flushes, before) : bisect.bisect_left(flushes, answer)]
    if ack and flush:
        steps["tail"].append(answer - max(ack[0], flush[-1]))
steps["period"] = [b - a for a, b in zip(steps["period"], steps["period"][1:])]

rows = [
    ("period", "client: one commit (send to next send)"),
    ("out", "leader: proposal received -> entry sent to the first follower"),
    ("fsync_l", "leader: fdatasync of its flush"),
    ("pre", "follower: entry received -> fdatasync starts"),
    ("fsync_f", "follower: fdatasync"),
    ("post", "follower: fdatasync done -> answer sent"),
    ("hb", "follower: commit-only append received -> answer sent"),
    ("tail", "leader: first follower answer and own flush -> answer to client"),
    ("turn", "client: answer received -> next proposal sent"),
]
print("| step | count | p50 | mean |")
print("|---|---:|---:|---:|")
for key, label in rows:
    v = steps[key]
    if v:
        print(f"| {label} | {len(v)} | {statistics.median(v):.0f} µs | {statistics.mean(v):.0f} µs |")
    else:
        print(f"| {label} | 0 | - | - |")
EOF

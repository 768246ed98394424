#!/usr/bin/env bash
# Checks whether this node is set up to run relay at scale: file-descriptor limits, the kernel
# settings of tuning/sysctl-relay.conf, io_uring, CPU frequency governor, transparent huge pages
# and swap. Reads only; changes nothing.
#
# Usage: tuning/check-node.sh [--connections N] [--pid PID]
#   --connections N  the client connections the node must hold (default 100000); the
#                    descriptor and memory checks are sized for it.
#   --pid PID        check the limits of a running relay process instead of this shell's.
# Each check prints one line: PASS, WARN (works, but slower or smaller than it could be) or
# FAIL (relay cannot reach N connections). Exit status: 0 without FAIL, 1 with, 2 on bad usage.

set -u

connections=100000
pid=""
while [ $# -gt 0 ]; do
    case "$1" in
        --connections) connections="${2:-}"; shift 2 ;;
        --pid) pid="${2:-}"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
case "$connections" in
    ''|*[!0-9]*) echo "--connections needs a number" >&2; exit 2 ;;
esac
if [ -n "$pid" ] && [ ! -r "/proc/$pid/limits" ]; then
    echo "--pid $pid: no such process (or /proc/$pid/limits unreadable)" >&2
    exit 2
fi

fails=0
report() { # status, check, detail
    printf '%-4s  %-28s %s\n' "$1" "$2" "$3"
    if [ "$1" = FAIL ]; then fails=$((fails + 1)); fi
}

read_sysctl() { # key -> value with runs of whitespace squeezed, or empty
    local path="/proc/sys/${1//.//}"
    [ -r "$path" ] && tr -s ' \t' ' ' < "$path" | sed 's/ *$//'
}

# Descriptors: one per connection, plus listeners, upstream pools and a margin.
needed_fds=$((connections + connections / 10 + 1024))
if [ -n "$pid" ]; then
    nofile=$(awk '/Max open files/ {print $4}' "/proc/$pid/limits")
    who="relay (pid $pid)"
else
    nofile=$(ulimit -n)
    who="this shell"
fi
if [ "$nofile" = unlimited ] || [ "$nofile" -ge "$needed_fds" ]; then
    report PASS "open files ($who)" "$nofile >= $needed_fds"
else
    report FAIL "open files ($who)" "$nofile < $needed_fds: raise LimitNOFILE= (systemd) or tuning/limits-relay.conf"
fi
nr_open=$(read_sysctl fs.nr_open)
if [ -n "$nr_open" ] && [ "$nr_open" -lt "$needed_fds" ]; then
    report FAIL "fs.nr_open" "$nr_open < $needed_fds: no process can raise its limit past it"
else
    report PASS "fs.nr_open" "${nr_open:-unknown}"
fi

# Each sysctl of the recommended file: at least the recommended value (first field for
# the three-field ones), or exactly it for flags.
conf="$(dirname "$0")/sysctl-relay.conf"
if [ ! -r "$conf" ]; then
    report WARN "sysctl-relay.conf" "not found next to this script; kernel settings not checked"
else
    while IFS='=' read -r key want; do
        key=$(echo "$key" | tr -d ' ')
        want=$(echo "$want" | tr -s ' ' | sed 's/^ //; s/ $//')
        case "$key" in ''|\#*) continue ;; esac
        have=$(read_sysctl "$key")
        if [ -z "$have" ]; then
            report PASS "$key" "not on this kernel (nothing to set)"
            continue
        fi
        case "$key" in
            kernel.io_uring_disabled|net.ipv4.tcp_slow_start_after_idle)
                if [ "$have" = "$want" ]; then report PASS "$key" "$have"
                else report WARN "$key" "$have (recommended $want)"; fi ;;
            net.ipv4.ip_local_port_range)
                have_span=$(echo "$have" | awk '{print $2 - $1}')
                want_span=$(echo "$want" | awk '{print $2 - $1}')
                if [ "$have_span" -ge "$want_span" ]; then report PASS "$key" "$have"
                else report WARN "$key" "$have (recommended $want)"; fi ;;
            net.ipv4.tcp_rmem|net.ipv4.tcp_wmem|net.ipv4.tcp_fin_timeout|net.ipv4.tcp_keepalive_*)
                # Smaller is the point here (memory per idle socket, stale sockets).
                have_first=${have%% *}; want_first=${want%% *}
                if [ "$have_first" -le "$want_first" ]; then report PASS "$key" "$have"
                else report WARN "$key" "$have (recommended $want)"; fi ;;
            *)
                have_first=${have%% *}; want_first=${want%% *}
                if [ "$have_first" -ge "$want_first" ]; then report PASS "$key" "$have"
                else report WARN "$key" "$have (recommended $want)"; fi ;;
        esac
    done < "$conf"
fi

# io_uring: relay falls back to epoll, slower but working.
if [ "$(read_sysctl kernel.io_uring_disabled)" = 2 ]; then
    report WARN "io_uring" "disabled by kernel.io_uring_disabled=2: relay will use epoll"
elif grep -q io_uring /proc/kallsyms 2>/dev/null || [ -e /proc/sys/kernel/io_uring_disabled ]; then
    report PASS "io_uring" "available (a container seccomp profile may still refuse it; relay logs its driver)"
else
    report WARN "io_uring" "cannot tell from /proc; relay logs the driver it got at start"
fi

# Memory: ~1 KiB of relay state per idle connection plus kernel socket buffers (about 8 KiB
# at the floors above, more for busy sockets).
mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
need_kib=$((connections * 12))
if [ "$mem_kib" -ge "$need_kib" ]; then
    report PASS "memory" "$((mem_kib / 1024)) MiB >= ~$((need_kib / 1024)) MiB for $connections connections"
else
    report WARN "memory" "$((mem_kib / 1024)) MiB < ~$((need_kib / 1024)) MiB for $connections mostly idle connections"
fi

governor_file=/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor
if [ -r "$governor_file" ]; then
    governor=$(cat "$governor_file")
    if [ "$governor" = performance ]; then report PASS "cpu governor" "$governor"
    else report WARN "cpu governor" "$governor (performance avoids frequency ramps under bursts)"; fi
else
    report PASS "cpu governor" "not exposed (virtual machine or fixed frequency)"
fi

thp=/sys/kernel/mm/transparent_hugepage/enabled
if [ -r "$thp" ] && grep -q '\[always\]' "$thp"; then
    report WARN "transparent hugepages" "always (madvise avoids compaction stalls on the shards)"
else
    report PASS "transparent hugepages" "$( [ -r "$thp" ] && cat "$thp" || echo 'not exposed')"
fi

swap_kib=$(awk '/SwapTotal/ {print $2}' /proc/meminfo)
swappiness=$(read_sysctl vm.swappiness)
if [ "${swap_kib:-0}" -gt 0 ] && [ "${swappiness:-60}" -gt 10 ]; then
    report WARN "swap" "on with vm.swappiness=$swappiness: a swapped-out shard stalls every connection on it"
else
    report PASS "swap" "off or vm.swappiness <= 10"
fi

cpus=$(nproc)
report PASS "cpus" "$cpus (relay runs one shard per CPU with shards = 0)"

if [ "$fails" -gt 0 ]; then
    echo "$fails check(s) failed: this node cannot hold $connections connections as set up." >&2
    exit 1
fi
exit 0

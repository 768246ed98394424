#!/usr/bin/env bash
# Builds relay with profile-guided optimisation (PGO): an instrumented relay is driven on
# loopback by relay-loadgen through every scenario (many channels, fan-out, latency, HTTP and
# WebSocket ingest, SSE, handshakes), and the release build is then laid out by what it
# recorded. On the build machine it cut relay's instructions per event by 18% and its CPU time
# in `channels` by 10%; ingest rose 16-21% (docs/performance.md, the census round).
#
# Usage: deploy/pgo-build.sh [--out PATH] [--listen ADDR] [--shards N]
#   --out PATH     where the optimised binary goes (default: $CARGO_TARGET_DIR/pgo/relay,
#                  CARGO_TARGET_DIR defaulting to target)
#   --listen ADDR  loopback address the training relay listens on (default 127.0.0.1:18004)
#   --shards N     shards of the training relay (default 0: one per CPU, so the cross-shard
#                  paths are trained too)
#   --print-scenarios  print the relay-loadgen arguments of each training step, and exit
# Needs llvm-profdata of the toolchain's own LLVM: `rustup component add llvm-tools`.
# Takes three release builds and about a minute of training; contacts nothing but ADDR.
# Exit status: 0 built, 1 a step failed (named on stderr), 2 bad usage.

set -euo pipefail

# Sizes fit a 1,024-descriptor limit; rates stay below what an instrumented shard sustains,
# so the profile is of the normal paths, not of overload.
scenarios=(
    "channels --subscribers 500 --channels 500 --rate 5000 --duration-s 6"
    "latency --duration-s 5"
    "fanout --subscribers 500 --rate 500 --duration-s 5"
    "ingest --batch 100 --duration-s 4"
    "ingest --publish-via ws --batch 1 --duration-s 4"
    "sse --subscribers 100 --duration-s 4"
    "connect --ramp 1:16:4 --step-s 2"
)

out=""
print_scenarios=""
listen="127.0.0.1:18004"
shards=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:-}"; [ -n "$out" ] || { echo "--out needs a path" >&2; exit 2; }; shift 2 ;;
        --listen) listen="${2:-}"; shift 2 ;;
        --shards) shards="${2:-}"; shift 2 ;;
        --print-scenarios) print_scenarios=1; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
case "$listen" in
    127.*:[0-9]*) ;;
    *) echo "--listen must be a loopback address with a port (127.x.y.z:PORT), not '$listen'" >&2; exit 2 ;;
esac
case "$shards" in
    ''|*[!0-9]*) echo "--shards needs a number" >&2; exit 2 ;;
esac

if [ -n "$print_scenarios" ]; then printf '%s\n' "${scenarios[@]}"; exit 0; fi

fail() { echo "pgo-build: $*" >&2; exit 1; }

cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
[ -n "$out" ] || out="$target/pgo/relay"

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || fail "no $profdata: run 'rustup component add llvm-tools' (it must be the LLVM of this rustc)"

work=$(mktemp -d)
relay_pid=""
cleanup() {
    if [ -n "$relay_pid" ]; then kill "$relay_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== 1/4 relay-loadgen (release)"
cargo build --release --locked -p relay-loadgen --bin relay-loadgen
loadgen="$target/release/relay-loadgen"

echo "== 2/4 instrumented relay"
# A target dir of its own: the instrumented flags would otherwise rebuild target/release.
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$work/profiles" \
    cargo build --release --locked -p relay --bin relay --target-dir "$target/pgo-generate"
# Build scripts ran instrumented too; only the relay's own run belongs in the profile.
rm -rf "$work/profiles"

echo "== 3/4 training on $listen"
if (exec 3<> "/dev/tcp/${listen%:*}/${listen##*:}") 2> /dev/null; then
    fail "something already listens on $listen: pick another with --listen"
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$target/pgo-generate/release/relay" --listen "$listen" --shards "$shards" --log warn \
    > "$work/relay.log" 2>&1 &
relay_pid=$!
ready=""
for _ in $(seq 1 100); do
    kill -0 "$relay_pid" 2>/dev/null || fail "the training relay exited: $(tail -3 "$work/relay.log")"
    if (exec 3<> "/dev/tcp/${listen%:*}/${listen##*:}") 2> /dev/null; then ready=1; break; fi
    sleep 0.1
done
[ -n "$ready" ] || fail "the training relay did not listen on $listen within 10 s"
for s in "${scenarios[@]}"; do
    echo "   relay-loadgen $s"
    # shellcheck disable=SC2086 # each scenario is a list of words on purpose
    "$loadgen" $s --target "$listen" -q > "$work/loadgen.log" 2>&1 \
        || fail "training step '$s' failed: $(tail -3 "$work/loadgen.log")"
done
# SIGTERM drains and exits normally, which is when the profile is written.
kill -TERM "$relay_pid"
wait "$relay_pid" || fail "the training relay did not exit cleanly: $(tail -3 "$work/relay.log")"
relay_pid=""
ls "$work"/profiles/*.profraw > /dev/null 2>&1 || fail "the training run wrote no profile"
"$profdata" merge -o "$work/relay.profdata" "$work"/profiles/*.profraw

echo "== 4/4 relay laid out by the profile"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$work/relay.profdata" \
    cargo build --release --locked -p relay --bin relay --target-dir "$target/pgo-use"
install -D -m 0755 "$target/pgo-use/release/relay" "$out"
echo "built $out"

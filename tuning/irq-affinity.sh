#!/usr/bin/env bash
# Spreads a NIC's interrupt queues and receive packet steering over chosen CPUs, so the packets
# of a connection are handled on the CPU whose relay shard owns it instead of piling onto CPU 0.
#
# Usage: tuning/irq-affinity.sh IFACE [--cpus LIST] [--apply]
#   IFACE        the network interface clients arrive on (e.g. eth0, ens5).
#   --cpus LIST  CPUs to use, in the kernel's list format (default: every online CPU, the same
#                set relay's shards use with shards = 0).
#   --apply      write the settings (needs root). Without it, prints what it would write.
# Queue i of the interface gets CPU i modulo the list (one queue per CPU when the NIC has as
# many); each receive queue's rps_cpus gets the whole list. Stop irqbalance first, or it undoes
# this: `systemctl disable --now irqbalance`.

set -eu

iface=""
cpus=""
apply=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cpus) cpus="${2:-}"; shift 2 ;;
        --apply) apply=1; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option: $1 (try --help)" >&2; exit 2 ;;
        *) iface="$1"; shift ;;
    esac
done
if [ -z "$iface" ]; then
    echo "name the interface, e.g. $0 eth0 (try --help)" >&2
    exit 2
fi
if [ ! -d "/sys/class/net/$iface" ]; then
    echo "no interface $iface (see: ls /sys/class/net)" >&2
    exit 2
fi
if [ -z "$cpus" ]; then
    cpus=$(cat /sys/devices/system/cpu/online)
fi

# Expands "0-3,6" into "0 1 2 3 6".
expand() {
    local out="" part
    for part in ${1//,/ }; do
        case "$part" in
            *-*) out="$out $(seq "${part%-*}" "${part#*-}" | tr '\n' ' ')" ;;
            *) out="$out $part" ;;
        esac
    done
    echo $out
}
cpu_list=($(expand "$cpus"))
if [ "${#cpu_list[@]}" -eq 0 ]; then
    echo "--cpus $cpus names no CPU" >&2
    exit 2
fi

# The hex mask of the whole list, for rps_cpus.
mask=0
for c in "${cpu_list[@]}"; do mask=$((mask | (1 << c))); done
mask_hex=$(printf '%x' "$mask")

set_value() { # path value
    if [ "$apply" = 1 ]; then
        echo "$2" > "$1"
        echo "wrote $2 to $1"
    else
        echo "would write $2 to $1"
    fi
}

# IRQs of the interface, in queue order, from /proc/interrupts (virtio, mlx, ixgbe... name
# their queues after the interface or its PCI device).
device=$(basename "$(readlink -f "/sys/class/net/$iface/device" 2>/dev/null || echo none)")
irqs=$(awk -v i="$iface" -v d="$device" '$0 ~ i || (d != "none" && $0 ~ d) {sub(":", "", $1); print $1}' /proc/interrupts)
n=0
for irq in $irqs; do
    cpu=${cpu_list[$((n % ${#cpu_list[@]}))]}
    if [ -w "/proc/irq/$irq/smp_affinity_list" ] || [ "$apply" = 0 ]; then
        set_value "/proc/irq/$irq/smp_affinity_list" "$cpu"
    fi
    n=$((n + 1))
done
if [ "$n" = 0 ]; then
    echo "no interrupt of $iface found in /proc/interrupts (a virtual interface?): RPS only"
fi
for rx in /sys/class/net/"$iface"/queues/rx-*; do
    [ -e "$rx/rps_cpus" ] && set_value "$rx/rps_cpus" "$mask_hex"
done

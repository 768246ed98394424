#!/usr/bin/env python3
"""Cache lines per event from a callgrind dump of relay (the census round of docs/performance.md).

Usage: tools/callgrind-census.py DUMP [--per FUNCTION | --events N] [--sort EVENT] [--top N]

DUMP is a file written by `valgrind --tool=callgrind --simulate-cache=yes` (or its
`callgrind_control -d` window). Events are counted as the calls to FUNCTION (default the shard's
`relay::shard::Shard::publish_start`, one per published event), or given with --events. Prints
the window's totals per event (Ir, I1mr, D1mr, D1mw, DLmr, DLmw...), then the functions with the
largest self cost of EVENT per event (default DLmr, the misses that go to DRAM).

It reads the dump itself because callgrind_annotate 3.19 charges a thread's whole cost to
`clone` for these dumps. Inlined code is charged to the function it was inlined into (monoio's
`raw::poll` holds each task's future).
"""

import argparse
import collections
import re
import sys

NAME = re.compile(r"(c?fn|fl|fi|fe|ob|cob|cfi|cfl)=\((\d+)\)(?: (.*))?$")


def read(path):
    """Returns (event names, self cost per function, call count per callee)."""
    names = {}
    events = []
    self_cost = collections.defaultdict(lambda: [0] * len(events))
    calls = collections.Counter()
    current = None
    callee = None
    next_line_is_call_cost = False
    with open(path, encoding="utf-8", errors="replace") as dump:
        for line in dump:
            line = line.rstrip("\n")
            if line.startswith("events:"):
                events = line.split()[1:]
                continue
            m = NAME.match(line)
            if m:
                kind, ident, name = m.groups()
                if kind in ("fn", "cfn"):
                    if name:
                        names[ident] = name
                    if kind == "fn":
                        current = names.get(ident, ident)
                    else:
                        callee = names.get(ident, ident)
                continue
            if line.startswith("calls="):
                calls[callee] += int(line.split()[0][len("calls="):])
                # The line after `calls=` is the callee's inclusive cost, not this function's.
                next_line_is_call_cost = True
                continue
            if line and (line[0].isdigit() or line[0] in "+-*"):
                if next_line_is_call_cost:
                    next_line_is_call_cost = False
                    continue
                values = [int(v) for v in line.split()[1:]]
                cost = self_cost[current]
                for k, v in enumerate(values):
                    cost[k] += v
    return events, self_cost, calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump")
    parser.add_argument("--per", default="relay::shard::Shard::publish_start")
    parser.add_argument("--events", type=int)
    parser.add_argument("--sort", default="DLmr")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()

    events, self_cost, calls = read(args.dump)
    if not events:
        sys.exit(f"{args.dump}: no 'events:' line; not a callgrind dump")
    if args.sort not in events:
        sys.exit(f"--sort {args.sort}: the dump has {' '.join(events)}")
    n = args.events or sum(c for f, c in calls.items() if f and f.endswith(args.per))
    if n == 0:
        sys.exit(f"no calls to {args.per} in the window: pass --per or --events")

    totals = [sum(cost[k] for cost in self_cost.values()) for k in range(len(events))]
    print(f"{n} events")
    print("per event: " + "  ".join(f"{e} {t / n:,.1f}" for e, t in zip(events, totals)))
    key = events.index(args.sort)
    print(f"\nlargest self cost of {args.sort} per event:")
    ranked = sorted(self_cost.items(), key=lambda item: -item[1][key])
    for function, cost in ranked[: args.top]:
        print(f"{cost[key] / n:10.2f}  {function[:140]}")


if __name__ == "__main__":
    main()

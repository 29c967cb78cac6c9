#!/usr/bin/env python3
"""The namespace home's ceiling: creates/s and stats/s that one home
sustains with P client processes spread over the given mounts (each
process its own directory), for docs/scaling.md.

    bench/ns-ceiling.py --procs 1,4,16 --files 2000 --home-pid PID M1 [M2 ...]

Mount with -o attr_timeout=0,entry_timeout=0 so every stat reaches the
namespace (otherwise the kernel answers from its cache). Prints one line
per process count: creates/s, stats/s, unlinks/s, and the home IOM's CPU
share during each phase (from /proc/PID/stat) when --home-pid is given.
"""
import argparse
import multiprocessing as mp
import os
import time


def cpu_seconds(pid):
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / ticks


def worker(args):
    phase, d, n = args
    if phase == "create":
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            fd = os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
    elif phase == "stat":
        for i in range(n):
            os.stat(f"{d}/f{i}")
    elif phase == "unlink":
        for i in range(n):
            os.unlink(f"{d}/f{i}")
        os.rmdir(d)
    return n


def run(mounts, procs, files, home_pid, tag):
    dirs = [f"{mounts[k % len(mounts)]}/ns-{tag}-{procs}-{k}" for k in range(procs)]
    per = files // procs
    out = {}
    with mp.Pool(procs) as pool:
        for phase in ["create", "stat", "unlink"]:
            c0, t0 = cpu_seconds(home_pid), time.monotonic()
            done = sum(pool.map(worker, [(phase, d, per) for d in dirs]))
            dt = time.monotonic() - t0
            cpu = (cpu_seconds(home_pid) - c0) / dt if home_pid else float("nan")
            out[phase] = (done / dt, cpu)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mounts", nargs="+")
    ap.add_argument("--procs", default="1,4,16")
    ap.add_argument("--files", type=int, default=2000, help="files per run, split over the processes")
    ap.add_argument("--home-pid", type=int, default=0)
    a = ap.parse_args()
    tag = f"{os.getpid()}"
    print("procs  creates/s (home CPU)  stats/s (home CPU)  unlinks/s (home CPU)")
    for p in [int(x) for x in a.procs.split(",")]:
        r = run(a.mounts, p, a.files, a.home_pid, tag)
        cells = "  ".join(f"{r[k][0]:9.0f} ({r[k][1]*100:3.0f}%)" for k in ["create", "stat", "unlink"])
        print(f"{p:5d}  {cells}", flush=True)


if __name__ == "__main__":
    main()

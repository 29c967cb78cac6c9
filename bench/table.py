#!/usr/bin/env python3
"""Prints the bench/run results file as markdown tables (medians over runs).

Lines are `LABEL metric value unit`. For the fsbench workloads it prints one
column per system and the ratios iomfs / better of GlusterFS and MooseFS and
iomfs / passthrough FUSE (for times, the ratio is inverted so that > 1 always
means iomfs is better).
"""
import collections
import statistics
import sys

vals = collections.defaultdict(list)
units = {}
order = []
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) != 4:
        continue
    label, metric, value, unit = p
    try:
        v = float(value)
    except ValueError:
        continue
    if metric not in order:
        order.append(metric)
    vals[(label, metric)].append(v)
    units[metric] = unit


def med(label, metric):
    v = vals.get((label, metric))
    return statistics.median(v) if v else None


def fmt(v):
    if v is None:
        return "-"
    return "%.0f" % v if v >= 100 else "%.2f" % v if v < 10 else "%.1f" % v


ROWS = [
    ("seqwrite_1M", "seq write 1 MiB"),
    ("seqread_1M", "seq read 1 MiB"),
    ("randwrite_4k_fsync", "rand write 4 KiB + fsync"),
    ("randwrite_4k_nofsync", "rand write 4 KiB, no fsync"),
    ("randread_4k", "rand read 4 KiB"),
    ("small_create_rate", "small files create"),
    ("small_stat_rate", "small files stat"),
    ("small_read_rate", "small files read"),
    ("small_delete_rate", "small files delete"),
    ("cp_a_tree", "cp -a tree"),
    ("diff_r_tree", "diff -r tree"),
    ("rm_rf_tree", "rm -rf tree"),
]
SYSTEMS = ["local", "passthrough_ll", "gluster_ec4+1", "moosefs_goal2", "iomfs"]
present = [s for s in SYSTEMS if any(k[0] == s for k in vals)]
if "iomfs" in present:
    runs = max(len(v) for k, v in vals.items() if k[0] == "iomfs")
    print("\n## fsbench (median of %d run%s)\n" % (runs, "s" if runs > 1 else ""))
    head = ["workload", "unit"] + present
    if "gluster_ec4+1" in present or "moosefs_goal2" in present:
        head.append("iomfs / best of Gluster, MooseFS")
    if "passthrough_ll" in present:
        head.append("iomfs / passthrough")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for key, name in ROWS:
        metric = next((m for m in order if m.startswith(key)), None)
        if metric is None:
            continue
        lower_better = units[metric] == "s"
        cells = [name + (" (%s)" % metric.split("tree_")[1] if key == "cp_a_tree" else ""), units[metric]]
        cells += [fmt(med(s, metric)) for s in present]
        mine = med("iomfs", metric)
        if len(head) > len(cells):
            best = [med(s, metric) for s in ("gluster_ec4+1", "moosefs_goal2") if med(s, metric)]
            if "gluster_ec4+1" in present or "moosefs_goal2" in present:
                if best and mine:
                    b = min(best) if lower_better else max(best)
                    cells.append("%.2f×" % ((b / mine) if lower_better else (mine / b)))
                else:
                    cells.append("-")
            if "passthrough_ll" in present:
                pt = med("passthrough_ll", metric)
                cells.append("%.2f×" % ((pt / mine) if lower_better else (mine / pt)) if pt and mine else "-")
        print("| " + " | ".join(cells) + " |")


other = [(k, v) for k, v in vals.items() if k[0] not in SYSTEMS]
if other:
    print("\n## other measurements (median)\n")
    print("| group | metric | value | unit |")
    print("| --- | --- | --- | --- |")
    for (label, metric), v in other:
        print("| %s | %s | %s | %s |" % (label, metric, fmt(statistics.median(v)), units[metric]))

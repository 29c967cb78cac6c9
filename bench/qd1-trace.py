#!/usr/bin/env python3
"""Where one request's time goes at queue depth 1 (issue 15's trace).

Usage: bench/qd1-trace.py MOUNT CLIENT_METRICS IOM_METRICS... [--n N]

MOUNT is an iomfs mount made with `-o metrics=CLIENT_METRICS`; the IOMs
have their endpoints (`iomfs init --metrics-port P`: 127.0.0.1:P+i). For
each operation (4 KiB write and read of an `atomic` file, create, unlink)
the script runs N of them one at a time, timing each system call, and
reads the metrics before and after: the time the client spent per FUSE
request (FUSE thread to reply), per RPC (sent to answered), the IOMs'
time per request (frame read to reply written) and, inside a write, the
data IOM's wait for its parity IOM (a6 to b4) and the fdatasyncs. Prints
the mean of each stage per operation, in microseconds.
"""
import mmap
import os
import random
import sys
import time
import urllib.request


def scrape(url):
    """{(name, labels-without-iom/mount): value} of every _sum and _count."""
    out = {}
    with urllib.request.urlopen(f"http://{url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name_labels, value = line.rsplit(" ", 1)
            if "{" in name_labels:
                name, labels = name_labels.split("{", 1)
                labels = ",".join(
                    l for l in labels.rstrip("}").split(",") if not l.startswith(("iom=", "mount="))
                )
            else:
                name, labels = name_labels, ""
            if name.endswith(("_sum", "_count")) or name.endswith("_total"):
                out[(name, labels)] = out.get((name, labels), 0.0) + float(value)
    return out


def scrape_all(urls):
    total = {}
    for u in urls:
        for k, v in scrape(u).items():
            total[k] = total.get(k, 0.0) + v
    return total


def mean_us(before, after, name, labels):
    s = after.get((name + "_sum", labels), 0) - before.get((name + "_sum", labels), 0)
    c = after.get((name + "_count", labels), 0) - before.get((name + "_count", labels), 0)
    return (s / c * 1e6, c) if c else (None, 0)


def run(label, fn, n, client, ioms, rows):
    cb, ib = scrape(client), scrape_all(ioms)
    t = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        t.append(time.perf_counter() - t0)
    time.sleep(1.5)  # the IOMs publish some series every second
    ca, ia = scrape(client), scrape_all(ioms)
    t.sort()
    rows.append((label, "application: system call (median)", t[len(t) // 2] * 1e6, n))
    rows.append((label, "application: system call (mean)", sum(t) / n * 1e6, n))
    for (name, labels) in sorted(set(ca) | set(cb)):
        if not name.endswith("_count"):
            continue
        base = name[: -len("_count")]
        m, c = mean_us(cb, ca, base, labels)
        if m is not None and c >= n / 2:
            rows.append((label, f"client: {base.replace('iomfs_client_', '')} {{{labels}}}", m, c))
    for (name, labels) in sorted(set(ia) | set(ib)):
        if not name.endswith("_count"):
            continue
        base = name[: -len("_count")]
        m, c = mean_us(ib, ia, base, labels)
        if m is not None and c >= n / 2 and "Ping" not in labels:
            rows.append((label, f"IOMs: {base.replace('iomfs_iom_', '')} {{{labels}}}", m, c))


def main():
    args = [a for a in sys.argv[1:]]
    n = 1000
    if "--n" in args:
        i = args.index("--n")
        n = int(args[i + 1])
        del args[i : i + 2]
    mnt, client, ioms = args[0], args[1], args[2:]
    d = os.path.join(mnt, "qd1")
    os.makedirs(d, exist_ok=True)
    size = 64 << 20
    path = os.path.join(d, "data")
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    rows = []
    buf = os.urandom(4096)
    fd = os.open(path, os.O_WRONLY)
    offs = [random.randrange(size >> 12) << 12 for _ in range(n)]
    run("4 KiB write (atomic)", lambda i: os.pwrite(fd, buf, offs[i]), n, client, ioms, rows)
    os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    m = mmap.mmap(-1, 4096)
    run("4 KiB read (O_DIRECT)", lambda i: os.preadv(fd, [m], offs[i]), n, client, ioms, rows)
    os.close(fd)
    names = [os.path.join(d, f"f{i}") for i in range(n)]
    run("create (open O_CREAT + close)", lambda i: os.close(os.open(names[i], os.O_CREAT | os.O_WRONLY, 0o644)),
        n, client, ioms, rows)
    run("unlink", lambda i: os.unlink(names[i]), n, client, ioms, rows)
    os.unlink(path)
    os.rmdir(d)
    last = None
    for (op, stage, us, c) in rows:
        if op != last:
            print(f"\n## {op}  (n = {n})")
            print("| stage | mean µs | count |")
            print("| --- | ---: | ---: |")
            last = op
        print(f"| {stage} | {us:.0f} | {c:.0f} |")


if __name__ == "__main__":
    main()

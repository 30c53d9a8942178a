#!/usr/bin/env python3
"""bench/report.py RESULTS.txt OUT.md [PLOT.png] [--summary DOC.md]: turns the RESULT lines of
bench/run.sh into markdown tables (fdcast / other ratios next to every rate) and, when matplotlib
is there, the plot of deliveries/s against N. Targets are docs/performance.md's; a ratio under
its target is marked ✗. With --summary, also rewrites DOC.md's summary of the run (between its
SUMMARY_BEGIN and SUMMARY_END lines) from the same rows, so that it never drifts from them."""
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict


def parse(path):
    rows = []
    for line in open(path, encoding="utf-8"):
        if line.startswith("RESULT "):
            rows.append(dict(f.split("=", 1) for f in line.split()[1:]))
    return rows


def mps(v):  # deliveries/s as millions
    return f"{float(v) / 1e6:.2f}"


def ratio(a, b, target=None):
    if not a or not b or float(b) == 0:
        return "–"
    r = float(a) / float(b)
    mark = "" if target is None else (" ✓" if r >= target else " ✗")
    return f"{r:.2f}{mark}"


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    redis = next((w[2:] for w in redis if w.startswith("v=")), "?")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} × {cpu}, Linux {platform.release()}, Redis {redis}, "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load average at the end {load}")


def fanout_section(rows):
    fan = defaultdict(dict)
    for r in rows:
        if r["part"] == "fanout":
            fan[(r["transport"], int(r["s"]), int(r["n"]))][r["contender"]] = r
    out = ["## 1. Fan-out against the physical limit\n",
           "Deliveries/s in millions (messages × fds / s, median of the runs; the clock stops at the "
           "last byte received). `loop`: one `send` per message per fd; `coalesce`: K messages per "
           "`send` (one contiguous buffer); `coalesce-iov`: K messages per `sendmsg` of K iovecs (what a `writev` flush costs the kernel); `raw`/`ws`/`sse`: `fdcast_publish` immediate; `corked`: fdcast corked, "
           "`fdcast_flush` every K. Targets: raw ≥ 0.95× loop and ws, sse ≥ 0.9× loop at N ≥ 100; "
           "corked ≥ 0.9× coalesce.\n"]
    for transport in ("unix", "tcp"):
        for s in (64, 1024):
            keys = sorted(n for (t, ss, n) in fan if t == transport and ss == s)
            if not keys:
                continue
            k = next(iter(fan[(transport, s, keys[0])].values()))["k"]
            body = []
            for n in keys:
                c = fan[(transport, s, n)]
                rate = lambda name: c[name]["rate"] if name in c else None
                tgt = lambda t: t if n >= 100 else None
                body.append([n, *(mps(rate(x)) if rate(x) else "–" for x in
                                  ("loop", "coalesce", "coalesce-iov", "raw", "ws", "sse", "corked")),
                             ratio(rate("raw"), rate("loop"), tgt(0.95)),
                             ratio(rate("ws"), rate("loop"), tgt(0.9)),
                             ratio(rate("sse"), rate("loop"), tgt(0.9)),
                             ratio(rate("corked"), rate("coalesce"), 0.9),
                             ratio(rate("corked"), rate("coalesce-iov")),
                             c.get("loop", {}).get("m", "")])
            out.append(f"### {transport}, S = {s} bytes, K = {k}\n")
            out.append(table(["N", "loop", "coalesce", "coalesce-iov", "raw", "ws", "sse", "corked",
                              "raw/loop", "ws/loop", "sse/loop", "corked/coalesce",
                              "corked/coalesce-iov", "M msgs"], body))
            cpu_body = []
            for n in keys:
                c = fan[(transport, s, n)]
                cpu = lambda name: c[name].get("cpu_ns") if name in c else None
                cpu_body.append([n, *(f"{float(cpu(x)):.0f}" if cpu(x) else "–" for x in
                                      ("loop", "raw", "ws", "sse", "coalesce", "corked")),
                                 ratio(cpu("raw"), cpu("loop")), ratio(cpu("ws"), cpu("loop")),
                                 ratio(cpu("sse"), cpu("loop")), ratio(cpu("corked"), cpu("coalesce"))])
            if any(r[1] != "–" for r in cpu_body):
                out.append("Sending thread's CPU time (user + system) per delivery, ns, and its ratio "
                           "fdcast / other (lower is cheaper; 1.05 matches the 0.95× target):\n")
                out.append(table(["N", "loop", "raw", "ws", "sse", "coalesce", "corked", "raw/loop",
                                  "ws/loop", "sse/loop", "corked/coalesce"], cpu_body))
    return "\n".join(out), fan


def option_section(rows, part, option, title, text):
    """A table of raw and corked without and with one option (`<mode>-<option>` contenders)."""
    runs = defaultdict(dict)
    for r in rows:
        if r["part"] == part:
            runs[(r["transport"], int(r["s"]), int(r["n"]))][r["contender"]] = r
    if not runs:
        return ""
    with_raw, with_corked = f"raw-{option}", f"corked-{option}"
    body = []
    for (transport, s, n), c in sorted(runs.items()):
        rate = lambda name: c[name]["rate"] if name in c else None
        cpu = lambda name: c[name].get("cpu_ns") if name in c else None
        body.append([transport, s, n,
                     *(mps(rate(x)) if rate(x) else "–"
                       for x in ("raw", with_raw, "corked", with_corked)),
                     ratio(rate(with_raw), rate("raw"), 0.95),
                     ratio(rate(with_corked), rate("corked"), 0.95),
                     ratio(cpu(with_raw), cpu("raw")),
                     ratio(cpu(with_corked), cpu("corked"))])
    return "\n".join([title + "\n", text + "\n",
        table(["transport", "S", "N", "raw", with_raw, "corked", with_corked,
               "raw rate ratio", "corked rate ratio", "raw CPU ratio", "corked CPU ratio"], body)])


def fd_check_section(rows):
    return option_section(
        rows, "fdcheck", "checked", "## 1b. The fd identity check (`fdcast_set_fd_check`)",
        "Deliveries/s in millions, immediate (`raw`) and corked, without and with an `fstat` "
        "before each write (immediate: per delivery; corked: per fd per flush). Target for "
        "making the check the default: checked ≥ 0.95× unchecked at N = 100 and 1000. CPU: "
        "the sending thread's time per delivery, checked / unchecked (lower is cheaper).")


def history_section(rows):
    return option_section(
        rows, "history", "history", "## 1c. Publishing with history on (`fdcast_set_history`)",
        "Deliveries/s in millions, immediate (`raw`) and corked, without and with a history of "
        "1000 messages per topic (each payload kept once, an id per publish). Target: with "
        "history ≥ 0.95× without, at N = 100 and 1000. CPU: the sending thread's time per "
        "delivery, with / without.")


def pubsub_section(rows):
    ps = defaultdict(dict)
    for r in rows:
        if r["part"] == "pubsub":
            ps[int(r["n"])][r["contender"]] = r
    if not ps:
        return "", ps
    any_row = next(iter(next(iter(ps.values())).values()))
    body = []
    for n in sorted(ps):
        c = ps[n]
        rate = lambda name: c[name]["rate"] if name in c else None
        body.append([n, mps(rate("redis")), mps(rate("fdcast")), mps(rate("fdcast-server")),
                     ratio(rate("fdcast"), rate("redis"), 2.0),
                     ratio(rate("fdcast-server"), rate("redis"), 2.0), c["redis"]["m"]])
    return ("## 2. Against Redis pub/sub\n\n"
            f"Unix sockets for all; S = {any_row['s']} bytes; batches of {any_row['k']}: Redis's "
            "publisher pipelines PUBLISH in batches (at most two unanswered), `fdcast` publishes "
            "in-process corked with `fdcast_flush` per batch, `fdcast-server` is "
            "bench/fdcast_server.c fed by a publisher process over a Unix socket. Deliveries/s in "
            "millions. Target: fdcast ≥ 2× Redis.\n\n"
            + table(["N", "redis", "fdcast", "fdcast-server", "fdcast/redis", "server/redis",
                     "M msgs"], body)), ps


def registry_section(rows):
    out = ["## 3. Registry costs\n"]
    reg = {r["metric"]: r for r in rows if r["part"] == "registry"}
    if reg:
        sub, unsub = reg["subscribe_per_s"], reg["unsubscribe_per_s"]
        out.append(table(["operation", "per second", "µs each"], [
            ["subscribe (new (topic, fd))", f"{float(sub['value']):,.0f}", f"{1e6 / float(sub['value']):.2f}"],
            ["unsubscribe (by id)", f"{float(unsub['value']):,.0f}", f"{1e6 / float(unsub['value']):.2f}"]]))
    ufd = defaultdict(dict)
    for r in rows:
        if r["part"] == "unsubscribe_fd":
            ufd[int(r["k"])][int(r["t"])] = float(r["ns"])
    if ufd:
        ts = sorted({t for d in ufd.values() for t in d})
        out.append("\n`unsubscribe_fd` of an fd with k topics, median µs, in registries of T topics "
                   "(target: flat in T; last column: largest T against smallest):\n")
        out.append(table(["k"] + [f"T = {t:,}" for t in ts] + [f"T={ts[-1]:,} / T={ts[0]}"],
                         [[k] + [f"{ufd[k][t] / 1000:.2f}" for t in ts] + [ratio(ufd[k][ts[-1]], ufd[k][ts[0]])]
                          for k in sorted(ufd)]))
    mem = [r for r in rows if r["part"] == "memory"]
    if mem:
        out.append("\nMemory per subscription: RSS growth / subscriptions, topic bytes subtracted "
                   "(target ≤ 100 bytes):\n")
        out.append(table(["subscriptions", "topics × subscribers each", "RSS growth MiB",
                          "bytes / subscription", "target"],
                         [[f"{int(r['subscriptions']):,}", f"{int(r['topics']):,} × {r['per_topic']}",
                           f"{int(r['rss_delta']) / 2**20:.1f}", r["bytes_per_sub"],
                           "✓" if float(r["bytes_per_sub"]) <= 100 else "✗"] for r in mem]))
    return "\n".join(out)


def contention_section(rows):
    out = ["## 4. Contention\n"]
    con = {(int(r["threads"]), int(r["subscribers"]), r.get("control", "false")): float(r["rate"])
           for r in rows if r["part"] == "contention"}
    if con:
        out.append("Publishes/s (64 bytes) from 1 and 2 threads, each to its own topic; subscribers "
                   "are /dev/null fds (a cheap `write`, no reader). The control row does the same "
                   "writes without fdcast: its 2/1 ratio is what this machine allows.\n")
        keys = sorted({(s, c) for _, s, c in con}, key=lambda k: (k[1] == "true", k[0]))
        out.append(table(["subscribers per topic", "1 thread", "2 threads", "2 threads / 1"],
                         [[f"{s}{' (control: plain write, no fdcast)' if c == 'true' else ''}",
                           f"{con[(1, s, c)]:,.0f}", f"{con[(2, s, c)]:,.0f}",
                           ratio(con[(2, s, c)], con[(1, s, c)])] for s, c in keys]))
    lat = {r["churn"]: r for r in rows if r["part"] == "latency"}
    if lat:
        base = lat["none"]
        out.append("\nPublish latency (64 bytes to 10 /dev/null subscribers) while another thread "
                   "subscribes and unsubscribes in a loop:\n")
        out.append(table(["churn", "p50 µs", "p99 µs", "p50 / no churn", "p99 / no churn"],
                         [[name.replace("_", " "), f"{int(r['p50_ns']) / 1000:.2f}", f"{int(r['p99_ns']) / 1000:.2f}",
                           ratio(r["p50_ns"], base["p50_ns"]), ratio(r["p99_ns"], base["p99_ns"])]
                          for name, r in lat.items()]))
    return "\n".join(out)


def slow_section(rows):
    sl = {r["contender"]: r for r in rows if r["part"] == "slow"}
    if not sl:
        return ""
    body = []
    for mode in ("immediate", "corked"):
        a, s = sl.get(f"{mode}-all"), sl.get(f"{mode}-slow")
        if not a or not s:
            continue
        body.append([mode, mps(a["rate"]), mps(s["rate"]), ratio(s["rate"], a["rate"]),
                     f"{int(s['queued_bytes']) / 2**20:.1f}", f"{int(s['rss_delta']) / 2**20:.1f}",
                     f"{int(s['dropped']):,}"])
    r = next(iter(sl.values()))
    return ("## 5. Slow consumers\n\n"
            f"N = {r['n']} Unix connections, {sl[next(k for k in sl if k.endswith('slow'))]['slow']} of them "
            f"never read while publishing; {r['m']} messages of {r['s']} bytes, outbox limit 1 MiB, "
            "FDCAST_DROP_MESSAGE. Deliveries/s (millions) to the readers with everyone reading "
            "(`all`) and with the slow ones (`slow`); memory when the readers are done: queued_bytes "
            "(each fd's share) and this process's RSS growth (frames are shared, so far less).\n\n"
            + table(["mode", "all", "slow", "slow / all", "queued MiB", "RSS growth MiB", "dropped frames"], body))


def plot(fan, ps, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib missing, no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, transport in zip(axes, ("unix", "tcp")):
        ns = sorted(n for (t, s, n) in fan if t == transport and s == 64)
        for name, label, style in (("loop", "send() loop", "o-"), ("coalesce", "send() loop, 16 coalesced", "s-"),
                                   ("raw", "fdcast immediate (RAW)", "^-"),
                                   ("corked", "fdcast corked, flush every 16", "v-")):
            pts = [(n, float(fan[(transport, 64, n)][name]["rate"])) for n in ns if name in fan[(transport, 64, n)]]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        if transport == "unix" and ps:
            batch = next(iter(next(iter(ps.values())).values()))["k"]
            for name, label, style in (("redis", f"Redis pub/sub, pipelined by {batch}", "D--"),
                                       ("fdcast", f"fdcast corked, flush every {batch}", "P--"),
                                       ("fdcast-server", f"fdcast server process, batches of {batch}", "X--")):
                pts = [(n, float(c[name]["rate"])) for n, c in sorted(ps.items()) if name in c]
                if pts:
                    ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N subscriber fds")
        ax.set_title(f"{'Unix sockets' if transport == 'unix' else 'TCP loopback'}, 64-byte messages")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("deliveries / s (messages × fds / s)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


SUMMARY_BEGIN = "<!-- summary of the last full run: written by bench/report.py --summary -->"
SUMMARY_END = "<!-- end of the summary -->"


def summary(fan, ps):
    """docs/performance.md's summary: part 1 over Unix sockets at S = 64, and part 2."""
    keys = sorted(n for (t, s, n) in fan if t == "unix" and s == 64)
    if not keys:
        return None
    k = next(iter(fan[("unix", 64, keys[0])].values()))["k"]
    body = []
    for n in keys:
        c = fan[("unix", 64, n)]
        rate = lambda name: c[name]["rate"] if name in c else None
        body.append([n, *(mps(rate(x)) if rate(x) else "–" for x in
                          ("loop", "coalesce", "raw", "ws", "sse", "corked")),
                     ratio(rate("raw"), rate("loop")), ratio(rate("ws"), rate("loop")),
                     ratio(rate("sse"), rate("loop")), ratio(rate("corked"), rate("coalesce"))])
    out = [f"Run of {time.strftime('%Y-%m-%d')} (Unix socketpairs, 64-byte messages, K = {k}, "
           "M deliveries/s, median of 5;\n"
           "bench/results.md has every table):\n",
           table(["N", "send loop", f"coalesce ×{k}", "fdcast RAW", "WS", "SSE", "fdcast corked",
                  "RAW / loop", "WS / loop", "SSE / loop", "corked / coalesce"], body)]
    if ps:
        ns = sorted(ps)
        rate = lambda n, name: ps[n][name]["rate"] if name in ps[n] else None
        rates = [" / ".join(mps(rate(n, x)) if rate(n, x) else "–"
                            for x in ("redis", "fdcast", "fdcast-server")) for n in ns]
        ratios = [" / ".join(f"{float(rate(n, x)) / float(rate(n, 'redis')):.1f}"
                             if rate(n, x) and rate(n, "redis") else "–"
                             for x in ("fdcast", "fdcast-server")) for n in ns]
        s = next(iter(ps[ns[0]].values()))["s"]
        out.append(table([f"Redis pub/sub against fdcast corked (Unix, S = {s})",
                          *(f"N = {n}" for n in ns)],
                         [["Redis / fdcast in-process / fdcast server process, M deliveries/s",
                           *rates],
                          ["fdcast ÷ Redis (in-process / server process)", *ratios]]))
    return "\n".join(out)


def write_summary(doc, text):
    old = open(doc, encoding="utf-8").read()
    begin, end = old.index(SUMMARY_BEGIN), old.index(SUMMARY_END)
    new = old[:begin] + SUMMARY_BEGIN + "\n\n" + text.rstrip("\n") + "\n" + old[end:]
    open(doc, "w", encoding="utf-8").write(new)


def main():
    args = sys.argv[1:]
    doc = None
    if "--summary" in args:
        at = args.index("--summary")
        doc = args[at + 1]
        del args[at:at + 2]
    sys.argv[1:] = args
    rows = parse(sys.argv[1])
    fan_md, fan = fanout_section(rows)
    ps_md, ps = pubsub_section(rows)
    png = sys.argv[3] if len(sys.argv) > 3 else None
    have_plot = png and plot(fan, ps, png)
    md = ["# fdcast benchmarks\n",
          f"Machine: {machine()}. Reproduce: `bench/run.sh` (or `make bench`). Each program runs "
          "its contenders alternating, several times, and verifies at the receivers that every "
          "byte arrived; rates are medians.\n"]
    if have_plot:
        md.append(f"![deliveries/s against N]({os.path.basename(png)})\n")
    md += [fan_md, fd_check_section(rows), history_section(rows), ps_md, registry_section(rows), contention_section(rows), slow_section(rows)]
    text = "\n".join(x for x in md if x)
    open(sys.argv[2], "w", encoding="utf-8").write(text)
    print(text)
    if doc:
        text = summary(fan, ps)
        if text:
            write_summary(doc, text)


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmark harnesses: sizes, statistics, the result row, the table.

Units as in nccl-tests: sizes in bytes (64M is 64 MiB), GB/s = 1e9 bytes/s,
algbw = size / time and, for all-reduce, busbw = algbw * 2(n-1)/n.
"""

import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE = re.compile(r"^(\d+)([KMG]?)$", re.IGNORECASE)

# One result: one system at one message size. Every harness writes these keys, in this order;
# None where a figure does not apply (the link figures on loopback, for instance).
ROW_KEYS = (
    "system",  # "collectives", "gloo", "mpi"
    "algorithm",  # "ring", "reduction_server", ... for collectives; the system's name otherwise
    "transport",  # "loopback" (one host), "emulated" (the emulated cluster) or "network"
    "hosts",  # worker hosts (allreduce.py writes its ranks; the testbed harnesses the layout's hosts)
    "reducers",
    "rate_gbps",  # the link rate set by tc, Gbit/s
    "goodput_GBps",  # the link's measured TCP goodput B, GB/s
    "tc",  # tc settings, the burst included
    "bytes",
    "count",
    "dtype",
    "op",
    "iters",  # collectives per timed sample
    "rounds",  # timed samples
    "time_s",  # median per-collective time
    "time_p90_s",  # 90th percentile of the per-sample times
    "times_s",  # the raw per-collective times, one per sample
    "algbw_GBps",
    "busbw_GBps",
    "bound_fraction",  # algbw / the algorithm's bound at B
    "speedup_vs_gloo",  # median over rounds of t_gloo / t_this
    "speedup_vs_mpi",  # median over rounds of t_mpi / t_this
    "wrong",  # wrong elements over all timed collectives
    "link_bytes",
    "cpu_util",
    "cpu_bound",
    "commit",
    "name",  # the system's name in its run's table ("collectives-ring" where several algorithms ran)
    "ranks",  # worker ranks (hosts x per_host)
    "per_host",  # ranks per worker host (K)
    "racks",  # worker hosts per rack, e.g. [4, 4]; None without racks
    "plan",  # what ran, as the link models name it: "ring:rank-order", "hierarchical:host+rack", "gloo", ...
    "speedups",  # {system: median over rounds of t_system / t_this}, against every other system of the run
)


def row(**fields):
    """A result row with every key of ROW_KEYS (None where not given)."""
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"not result row keys: {', '.join(sorted(unknown))}")
    return {key: fields.get(key) for key in ROW_KEYS}


def parse_size(text):
    """'8', '512K', '64M', '1G' (binary units) -> bytes."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size; write e.g. 8, 512K, 64M or 1G")
    return int(match.group(1)) * _SUFFIXES[match.group(2).upper()]


def sizes(smallest, largest, factor):
    """largest, largest/factor, ... down to smallest (which is always included), ascending.

    Counting down from the largest size means it is always measured, and with the defaults
    (8 B to 256M, factor 4) so is 64M.
    """
    found = []
    size = largest
    while size >= smallest:
        found.append(size)
        size //= factor
    if smallest not in found:
        found.append(smallest)
    return sorted(found)


def median(values):
    return statistics.median(values)


def percentile(values, q):
    """The q-th percentile of values (linear between the closest ranks, as numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_ratio(numerators, denominators):
    """The median over rounds of numerators[i] / denominators[i]."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def allreduce_bandwidths(nbytes, seconds, ranks):
    """(algbw, busbw) in GB/s for an all-reduce of nbytes over `ranks` ranks."""
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * 2 * (ranks - 1) / ranks


def link_counters(ifname):
    """(bytes sent, bytes received) so far on this host's interface (on an emulated host, its
    own: the testbed's hosts see their network namespace's /sys)."""
    stats = f"/sys/class/net/{ifname}/statistics"
    with open(f"{stats}/tx_bytes") as tx, open(f"{stats}/rx_bytes") as rx:
        return int(tx.read()), int(rx.read())



class LinkTimeline:
    """When this host's link carried a step's bulk traffic, read from its counters every
    `period_s` by a thread between start() and stop(): out_s, when the bytes sent since start()
    first passed `threshold` (a barrier's or an acknowledgement's few bytes do not count),
    out_end_s and in_s, the end of the last period in which more than `threshold_in` bytes went
    out and came in (a final control message does not count); seconds after start(), None where
    it never happened."""

    def __init__(self, ifname, period_s=0.001, threshold=64 << 10, threshold_in=4 << 10):
        self._ifname, self._period, self._threshold, self._threshold_in = ifname, period_s, threshold, threshold_in
        self._thread = None
        self._stopping = threading.Event()
        self.out_s = self.out_end_s = self.in_s = None

    def start(self):
        self.out_s = self.out_end_s = self.in_s = None
        self._stopping.clear()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="link-timeline", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        self._thread.join()
        return self

    def _run(self):
        first_tx, last_rx = link_counters(self._ifname)
        last_tx = first_tx
        while True:
            stopping = self._stopping.wait(self._period)
            tx, rx = link_counters(self._ifname)
            now = time.perf_counter() - self._started
            if self.out_s is None and tx - first_tx > self._threshold:
                self.out_s = now
            if tx - last_tx > self._threshold_in:
                self.out_end_s = now
            if rx - last_rx > self._threshold_in:
                self.in_s = now
            last_tx, last_rx = tx, rx
            if stopping:
                return


def git_commit():
    """The commit of the checkout these benchmarks live in, or None."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip() or None


class Table:
    """nccl-tests-style text table: size, count, type, redop, then a column group per system
    (time, algbw, busbw, #wrong), then the paired speed-ups of `subject` against each peer.
    """

    _LEAD = (("size", "(B)", 12), ("count", "(elements)", 12), ("type", "", 8), ("redop", "", 6))
    _GROUP = (
        ("time", "(us)", 10), ("algbw", "(GB/s)", 8), ("busbw", "(GB/s)", 8), ("#wrong", "", 7)
    )
    _RATIO = 9

    def __init__(self, systems, subject=None):
        self.systems = list(systems)
        self.subject = subject if subject in self.systems else None
        self.peers = [s for s in self.systems if self.subject and s != self.subject]

    def header(self):
        """The header lines, each starting with '#'."""
        lead = sum(width for _, _, width in self._LEAD)
        group = sum(width for _, _, width in self._GROUP)
        titles = " " * lead + "".join(f"{name:>{group}}" for name in self.systems)
        names = self._cells(self._LEAD, 0) + self._cells(self._GROUP, 0) * len(self.systems)
        units = self._cells(self._LEAD, 1) + self._cells(self._GROUP, 1) * len(self.systems)
        if self.peers:
            titles += f"{'speed-up':>{self._RATIO * len(self.peers)}}"
            names += "".join(f"{'vs ' + peer:>{self._RATIO}}" for peer in self.peers)
        return ["#" + line[1:].rstrip() for line in (titles, names, units)]

    def line(self, nbytes, count, dtype, op, results, ratios):
        """results: system -> (seconds, algbw, busbw, wrong); ratios: peer -> speed-up."""
        widths = [width for _, _, width in self._LEAD]
        lead = (nbytes, count, dtype, op)
        text = "".join(f"{value:>{width}}" for value, width in zip(lead, widths))
        for system in self.systems:
            seconds, algbw, busbw, wrong = results[system]
            text += f"{seconds * 1e6:>10.1f}{algbw:>8.3f}{busbw:>8.3f}{wrong:>7}"
        for peer in self.peers:
            text += f"{ratios[peer]:>{self._RATIO - 1}.2f}x"
        return text

    @staticmethod
    def _cells(columns, which):
        return "".join(f"{column[which]:>{column[2]}}" for column in columns)

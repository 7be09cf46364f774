"""An emulated cluster on one machine: hosts as namespaces on a bridge, each link limited by tc.

    python benchmarks/testbed.py --hosts N --rate 500mbit [--burst 256kb] [--loss 0.1%]
        [--delay 50us] [--tcp-cc cubic] [--per-host K] [--racks R --uplink-rate RATE]
        [--summary F] -- COMMAND...

Each emulated host hN is a network namespace with its own UTS (hostname hN), IPC and mount
namespace: its /dev/shm is a tmpfs of its own, so POSIX and System V shared memory of one
host are invisible to every other, and its /etc/hosts names every host. Hosts share the
rest of the file system (like a cluster's shared home) and the process-id space. Host hN
has one interface, eth0, with the (N+1)th address of 198.18.0.0/15 (the RFC 2544
benchmarking range: h0 is 198.18.0.1),
cabled by a veth pair to a Linux bridge in a "switch" namespace of the run's own: nothing
touches the machine's own network. Each link is limited in both directions by tc tbf (rate,
burst and a queue of TBF_LATENCY): on eth0 (the host's upload) and on the switch port
(its download). --loss drops that fraction of the packets arriving at each host (nftables,
random drop, so each direction of a link loses it). This kernel has no netem, so --delay
stops with an error unless the kernel has it. Every host's TCP uses the congestion control
--tcp-cc (default cubic, Linux's own default), whatever the machine's default is: it decides
how flows share a link (this machine defaults to bbr, whose bandwidth and RTT probing lose
2-3% of the bytes on these shallow queues and stall single flows for 200 ms at a time). A
namespace may only pick an algorithm listed in net.ipv4.tcp_allowed_congestion_control (or
the machine's default); where --tcp-cc is available but not listed, the hosts fall back to
the machine's default, with a warning that gives the sysctl command that allows it, and
TESTBED_TCP_CC, --summary and the tc description (hence every result row) say so.

--per-host K: K processes (mpirun slots) per host; they share the host's namespaces, so its
/dev/shm and its one NIC (the harnesses place K ranks on each host and check it).

--racks R --uplink-rate RATE: the hosts are spread over R racks in contiguous blocks, as even
as they can be, the first racks taking one more where N is not a multiple of R (5 hosts on 2
racks: rack0 = h0 h1 h2, rack1 = h3 h4). The hosts of a rack are cabled to a bridge of their
own, br-rackR; each rack bridge is cabled to a spine bridge, br-spine, by a veth pair, the
rack's uplink (up-rackR on the rack side, dn-rackR on the spine side), limited in both
directions by its own tbf at RATE (same burst and queue as the hosts' links): on up-rackR
(what leaves the rack) and on dn-rackR (what enters it). The hosts' own links stay as they
are. All bridges and uplinks live in the run's switch namespace; the addresses stay as above
(one subnet: a frame between racks crosses two uplinks, one out of its rack and one into the
other). Every process started on a host of rack r (Testbed.run_on, exec_prefix, testbed_exec,
hence every mpirun rank) gets COLLECTIVES_TOPOLOGY=rack<r>, so that the library's topology
labels see the racks.

Before COMMAND runs, the links' TCP goodput B is measured: one bulk TCP transfer per link,
h0->h1, h1->h2, ..., the last host back to h0, one at a time (--goodput-seconds each after
a warm-up); B is their median. With racks these transfers stay inside the racks (a ring per
rack of two or more hosts), and the uplinks' goodput is measured too: all hosts of rack r send
at once to the hosts of rack r+1 (paired in order, as many flows as the smaller rack has
hosts), for each r, one rack at a time; a rack's figure is the bytes of all its flows over
the time they all ran after the warm-up (aggregate_bps), the
uplinks' goodput B_up their median (below the host links' only where the uplink binds). During
each of these transfers the uplinks' byte counters are read: a run whose traffic between racks
did not cross the sending rack's uplink out and the receiving rack's uplink in is refused.
COMMAND runs in the machine's own namespaces, with its
environment extended by:

    TESTBED_HOSTS        h0=198.18.0.1,h1=198.18.0.2,...  (name=address, in order)
    TESTBED_PER_HOST     K: processes (slots) per host, from --per-host
    TESTBED_MPI_HOSTS    h0:K,h1:K,...  (mpirun --host)
    TESTBED_IFNAME       eth0, every host's interface (COLLECTIVES_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)
    TESTBED_RATE         the rate as given (500mbit); TESTBED_RATE_BPS the same in bits/s
    TESTBED_BURST        tbf's burst in bytes
    TESTBED_LOSS         the loss as a fraction (0.001), or empty
    TESTBED_TCP_CC       the hosts' TCP congestion control (cubic; see --tcp-cc for a fallback)
    TESTBED_TC           the link settings in words, for result rows
    TESTBED_GOODPUT_BPS  B in bits/s (empty when not measured)
    TESTBED_EXEC         the path of testbed_exec: "$TESTBED_EXEC h1 CMD ARGS..." runs CMD on h1
    TESTBED_SSH_AGENT    testbed_exec as an ssh stand-in, for Open MPI's launcher
    TESTBED_STATE_DIR    this run's state (testbed_exec finds the hosts through it)
    TESTBED_RACKS        R from --racks, or empty without racks
    TESTBED_HOST_RACKS   h0=rack0,h1=rack0,h2=rack1,... (empty without racks)
    TESTBED_UPLINK_RATE  the uplinks' rate as given, TESTBED_UPLINK_RATE_BPS in bits/s (empty without racks)
    TESTBED_UPLINK_GOODPUT_BPS  the uplinks' measured goodput in bits/s (empty when not measured)
    TESTBED_SWITCH_PID   a process in the switch namespace: /proc/PID/net/dev has the uplinks'
                         byte counters, which a process on a host can read (uplink_counters(PID))

The machine's own namespaces cannot reach the hosts' addresses, so a job is placed on hosts
as on a cluster without a head node: mpirun itself runs on h0, e.g.

    "$TESTBED_EXEC" h0 mpirun --host "$TESTBED_MPI_HOSTS" --prtemca plm_ssh_agent "$TESTBED_SSH_AGENT" \\
        --mca btl_tcp_if_include eth0 python train.py

and a job with its own rendezvous starts one process per host with "$TESTBED_EXEC" hN and
COLLECTIVES_RENDEZVOUS (or MASTER_ADDR) set to h0's address.

Each link's byte counters are read before and after COMMAND, and the machine's CPU use
during it (all cores, from /proc/stat); a run in which the CPU was more than 90% busy
(CPU_BOUND_UTIL) is flagged cpu_bound with a warning: there the links were not the
bottleneck and the figures do not count. --summary F writes a JSON object: the settings
(hosts [{name, address}], per_host, rate, rate_bps, burst_bytes, tbf_latency, loss, delay,
tcp_cc, tcp_cc_requested, tc), goodput_bps, goodput_bps_per_link {"h0->h1": bps}, command, returncode, seconds,
link_bytes {host: {tx, rx}} (bytes that crossed each link during COMMAND, Ethernet headers
included), with racks racks [{name, hosts}], uplink_rate, uplink_rate_bps,
uplink_goodput_bps, uplink_goodput_bps_per_link {"rack0->rack1": bps} and uplink_bytes
{rack: {tx: bytes out of the rack, rx: bytes into it}} during COMMAND, dropped_packets {host: n} (by --loss), cpu_util, cpu_util_per_core and
cpu_bound. Everything the run created
(namespaces, veths, the bridges and uplinks, every process inside a host) is removed when it ends, also
on Ctrl-C, SIGTERM or failure; leftovers of a run that was killed outright are removed by
the next run. Needs root and iproute2 (ip, tc), util-linux (unshare, nsenter) and, for
--loss, nftables (apt-get install -y nftables).

As a library (compare.py does this):

    with Testbed(hosts=4, rate="500mbit") as tb:
        tb.hosts, tb.goodput_bps, tb.env(), tb.describe()     # [Host(name, address, netns)], bits/s
        proc = tb.run_on("h1", ["python", "job.py"], env=...)   # a Popen on host h1
        argv = tb.exec_prefix("h1") + ["python", "job.py"]      # the same, by hand
        before = tb.link_bytes()                               # {host: (tx, rx)}
        tb.uplink_bytes()                                      # {rack: (tx out of it, rx into it)}
    with Testbed(hosts=8, rate="500mbit", racks=2, uplink_rate="100mbit") as tb:
        tb.racks, tb.rack_of("h5"), tb.uplink_goodput_bps       # [Rack(name, hosts)], "rack1", bits/s
        with tb.cpu_sampler() as cpu:
            ...
        cpu.util, cpu.cpu_bound
        tb.transfer([("h0", "h1")], nbytes=1 << 20)             # bulk TCP transfers, timed
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import logging
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

log = logging.getLogger("testbed")

PREFIX = "cc-tb-"  # every namespace of every run starts with it: how leftovers are recognised
STATE_ROOT = Path("/run/cc-testbed")
NETWORK = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range
IFNAME = "eth0"
# tbf's queue, as the time a full queue takes to drain at the rate (its byte limit is
# rate * latency + burst): a switch port's buffer.
TBF_LATENCY = "20ms"
CPU_BOUND_UTIL = 0.9  # the CPU was the bottleneck above this busy fraction of all cores
GOODPUT_WARMUP_S = 0.3  # excluded from each goodput transfer: slow start and the tbf burst
PROBE_PORT = 5201
UPLINK_START_SLACK_S = 1.0  # parallel goodput flows: how much later than the first the last may start
EXEC_HELPER = Path(__file__).resolve().with_name("testbed_exec")
REQUIRED_TOOLS = ("ip", "tc", "unshare", "nsenter")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_BURST_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20}  # tc's: kb is 1024 bytes
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)\.(\d+)\.\d+(?:-|$)")
_run_counter = itertools.count()

# A bulk TCP transfer. On the receiving host: `python -c _PROBE recv ADDRESS PORT WARMUP
# SECONDS` prints "ready", receives until the sender closes or, if SECONDS > 0, until WARMUP +
# SECONDS after the first byte, and prints one JSON line (times are CLOCK_MONOTONIC, comparable
# across processes; "bins": the bytes received in each BIN_S slot of that clock from slot
# "bin0" on, so that flows in parallel can be summed over a window they share). On the sending host: `... send ADDRESS PORT NBYTES` sends NBYTES, or if
# 0, until the receiver closes. The receiver ends timed transfers: data still queued at the
# sender would otherwise take long to drain at low rates.
_PROBE = r"""
import json, socket, sys, time
role, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
BIN_S = 0.01
buf = bytearray(1 << 20)
if role == "recv":
    warmup, seconds = float(sys.argv[4]), float(sys.argv[5])
    server = socket.create_server((address, port))
    print("ready", flush=True)
    conn, _ = server.accept()
    start = end = time.monotonic()
    total = steady = 0
    first = steady_from = None
    bins, bin0 = [], None
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        end = time.monotonic()
        total += n
        slot = int(end / BIN_S)
        if bin0 is None:
            bin0 = slot
        while len(bins) <= slot - bin0:
            bins.append(0)
        bins[slot - bin0] += n
        if first is None:
            first = end
        if steady_from is not None:
            steady += n
        elif end - first >= warmup:
            steady_from = end
        if seconds > 0 and end - first >= warmup + seconds:
            break
    bps = steady * 8 / (end - steady_from) if steady_from is not None and end > steady_from else None
    print(json.dumps({"bytes": total, "start": start, "end": end, "first": first, "steady_bps": bps,
                      "bin0": bin0, "bins": bins}))
else:
    nbytes = int(sys.argv[4])
    with socket.create_connection((address, port)) as conn:
        if nbytes:
            view = memoryview(buf)
            for offset in range(0, nbytes, len(buf)):
                conn.sendall(view[:min(len(buf), nbytes - offset)])
        else:
            try:
                while True:
                    conn.sendall(buf)
            except (BrokenPipeError, ConnectionResetError):
                pass
"""


class TestbedError(RuntimeError):
    """The testbed cannot be set up or used; the message says why and what to do."""


class Host(NamedTuple):
    name: str  # also its hostname
    address: str
    netns: str


class Rack(NamedTuple):
    name: str  # rack0, rack1, ...: also the COLLECTIVES_TOPOLOGY of its hosts' processes
    hosts: Tuple[str, ...]  # its hosts' names, in order

    @property
    def uplink(self) -> str:
        """The rack side of its uplink (in the switch namespace): tx leaves the rack, rx enters it."""
        return f"up-{self.name}"

    @property
    def spine_port(self) -> str:
        return f"dn-{self.name}"


def rack_sizes(hosts: int, racks: int) -> List[int]:
    """Hosts per rack: contiguous blocks as even as they can be, the first racks one larger
    where hosts is not a multiple of racks (5 on 2: [3, 2])."""
    if not 2 <= racks <= hosts:
        raise ValueError(f"racks must be between 2 and the number of hosts ({hosts}), not {racks}")
    return [hosts // racks + (1 if r < hosts % racks else 0) for r in range(racks)]


def uplink_counters(switch_pid: Union[int, str]) -> Dict[str, Tuple[int, int]]:
    """{rack: (bytes out of it, bytes into it)} so far over each rack's uplink, from
    /proc/SWITCH_PID/net/dev (TESTBED_SWITCH_PID): readable from any host, whose own /sys
    shows only its network namespace."""
    found = {}
    for line in Path(f"/proc/{switch_pid}/net/dev").read_text().splitlines()[2:]:
        name, _, fields = line.partition(":")
        name = name.strip()
        if name.startswith("up-"):
            values = fields.split()
            found[name[3:]] = (int(values[8]), int(values[0]))  # tx_bytes, rx_bytes
    return found


class Transfer(NamedTuple):
    src: str
    dst: str
    bytes: int
    start: float  # receiver: connection accepted (time.monotonic)
    end: float  # receiver: last byte arrived
    steady_bps: Optional[float]  # goodput after the warm-up, None if the transfer was shorter
    first: Optional[float] = None  # receiver: first byte arrived
    bin0: Optional[int] = None  # the bytes received per TRANSFER_BIN_S slot of time.monotonic(), from slot bin0 on
    bins: Tuple[int, ...] = ()


TRANSFER_BIN_S = 0.01  # the probe's BIN_S


def aggregate_bps(transfers: Sequence[Transfer], warmup: float = GOODPUT_WARMUP_S) -> Optional[float]:
    """The goodput of transfers that ran in parallel, summed over the window all of them
    shared after the warm-up (from the last one's first byte plus warmup to the first one's
    last byte): bits/s, or None if they shared no such window."""
    if not transfers or any(t.first is None or t.bin0 is None for t in transfers):
        return None
    begin = int((max(t.first for t in transfers) + warmup) / TRANSFER_BIN_S) + 1  # whole slots only
    end = int(min(t.end for t in transfers) / TRANSFER_BIN_S)
    if end <= begin:
        return None
    log.debug("aggregate goodput over %.2f s shared by %d flows", (end - begin) * TRANSFER_BIN_S, len(transfers))
    total = sum(sum(t.bins[max(0, begin - t.bin0):max(0, end - t.bin0)]) for t in transfers)
    return total * 8 / ((end - begin) * TRANSFER_BIN_S)


def parse_rate(text: str) -> int:
    """'500mbit', '1gbit', '100kbit' (tc's SI units) -> bits/s."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", text.strip().lower())
    if match is None or match.group(2) not in _RATE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"rate {text!r}: write a positive number with one of {', '.join(_RATE_UNITS)}, "
                         "e.g. 500mbit")
    return round(float(match.group(1)) * _RATE_UNITS[match.group(2)])


def parse_burst(text: str) -> int:
    """'256kb', '1mb', '64000' (tc's units: kb = 1024 bytes) -> bytes."""
    match = re.fullmatch(r"(\d+)([a-z]*)", text.strip().lower())
    if match is None or match.group(2) not in _BURST_UNITS or int(match.group(1)) <= 0:
        raise ValueError(f"burst {text!r}: write a positive whole number of bytes, kb or mb, e.g. 256kb")
    return int(match.group(1)) * _BURST_UNITS[match.group(2)]


def parse_loss(text: str) -> float:
    """'0.1%' or '0.1' (percent, as netem takes it) -> 0.001."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%?", text.strip())
    if match is None or not 0 < float(match.group(1)) < 100:
        raise ValueError(f"loss {text!r}: write a percentage above 0 and below 100, e.g. 0.1%")
    return float(match.group(1)) / 100


def parse_delay(text: str) -> str:
    """'50us', '2ms', '0.1s' -> the same, checked (tc's time syntax)."""
    if re.fullmatch(r"\d+(?:\.\d+)?(?:us|ms|s)", text.strip()) is None:
        raise ValueError(f"delay {text!r}: write a time in us, ms or s, e.g. 50us")
    return text.strip()


def check_prerequisites(loss: bool = False) -> None:
    """Raises TestbedError unless this process is root and the tools the testbed needs are found."""
    if os.geteuid() != 0:
        raise TestbedError("the testbed creates network namespaces and so must run as root (e.g. with sudo)")
    tools = REQUIRED_TOOLS + (("nft",) if loss else ())
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise TestbedError(f"{', '.join(missing)} not found on PATH: install iproute2 (ip, tc), util-linux "
                           "(unshare, nsenter) and, for --loss, nftables (apt-get install -y iproute2 "
                           "util-linux nftables)")


def _run(argv: Sequence[str], stdin: Optional[str] = None) -> str:
    log.debug("+ %s", " ".join(argv))
    result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line proc writes to its stdout pipe, stripped; '' if none comes within timeout."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot): with the pid, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(name: str) -> bool:
    match = _NAME.match(name)
    return match is not None and _start_time(int(match.group(1))) == match.group(2)


def _netns_pids(netns: str) -> List[int]:
    result = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(pid) for pid in result.stdout.split()]


def _kill_all_in(netns: str) -> None:
    """SIGKILLs every process in the network namespace, until none is left (they may fork meanwhile)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = _netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    log.warning("processes in %s survived SIGKILL for 10 s: %s", netns, _netns_pids(netns))


def _remove_netns(netns: str) -> None:
    _kill_all_in(netns)
    result = subprocess.run(["ip", "netns", "delete", netns], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("could not delete network namespace %s: %s", netns, result.stderr.strip())


def _tcp_cc_setting(name: str) -> str:
    return Path(f"/proc/sys/net/ipv4/tcp_{name}congestion_control").read_text().strip()


def permitted_tcp_cc(requested: str) -> str:
    """The TCP congestion control the hosts can use: requested where a network namespace may
    pick it, else the machine's default with a warning (a namespace other than the machine's
    own may only pick those in net.ipv4.tcp_allowed_congestion_control, and the default is
    always among them: sysctl would fail with "Operation not permitted"). TestbedError if
    requested is not available at all."""
    available = _tcp_cc_setting("available_").split()
    if requested not in available:
        raise TestbedError(f"TCP congestion control {requested!r} is not available here "
                           f"(available: {', '.join(available)})")
    allowed, default = _tcp_cc_setting("allowed_").split(), _tcp_cc_setting("")
    if requested in allowed:
        return requested
    log.warning("TCP congestion control %s is available but network namespaces may not use it "
                "(net.ipv4.tcp_allowed_congestion_control = %s): the hosts use the machine's default, %s, and the "
                "results say so (it shapes them: see --tcp-cc); to use %s, run as root: "
                "sysctl -w net.ipv4.tcp_allowed_congestion_control=\"%s\"", requested, " ".join(allowed), default,
                requested, " ".join(allowed + [requested]))
    return default


def leftover_namespaces() -> List[str]:
    """The testbed namespaces whose run's process is gone: what a run that did not clean up
    left behind (those of runs still going, in this process or beside it, are not)."""
    names = [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(PREFIX) and not _owner_alive(n))


def remove_stale() -> None:
    """Removes what earlier runs left behind when they were killed outright (their owner
    process is gone): their processes, namespaces (with their veths and bridge) and state."""
    for name in leftover_namespaces():
        log.warning("removing %s, left behind by a testbed run that did not clean up", name)
        _remove_netns(name)
    if STATE_ROOT.is_dir():
        for state in STATE_ROOT.iterdir():
            if not _owner_alive(PREFIX + state.name):
                shutil.rmtree(state, ignore_errors=True)


class CpuSampler:
    """The machine's CPU use (all cores, from /proc/stat) between start() and stop(), or over
    a with block: util (busy fraction of all cores), per_core, cpu_bound."""

    def __init__(self) -> None:
        self._start: Optional[List[List[int]]] = None
        self.util: Optional[float] = None
        self.per_core: List[float] = []

    @staticmethod
    def _read() -> List[List[int]]:
        """/proc/stat's 'cpu' line, then one per core: jiffies by state."""
        lines = Path("/proc/stat").read_text().splitlines()
        return [[int(v) for v in line.split()[1:]] for line in lines if line.startswith("cpu")]

    @staticmethod
    def _busy(before: List[int], after: List[int]) -> float:
        delta = [a - b for a, b in zip(after, before)]
        idle = delta[3] + delta[4]  # idle, iowait
        total = sum(delta[:8])  # user..steal; guest time is already counted in user
        return (total - idle) / total if total > 0 else 0.0

    @property
    def cpu_bound(self) -> bool:
        return self.util is not None and self.util > CPU_BOUND_UTIL

    def start(self) -> "CpuSampler":
        self._start = self._read()
        return self

    def stop(self) -> "CpuSampler":
        end = self._read()
        self.util = self._busy(self._start[0], end[0])
        self.per_core = [self._busy(b, a) for b, a in zip(self._start[1:], end[1:])]
        return self

    def __enter__(self) -> "CpuSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Testbed:
    """N emulated hosts on a bridge with rate-limited links (see the module's docstring); a
    context manager: set up and goodput measured on entry, everything removed on exit.

    goodput_seconds: length of each link's goodput transfer after its warm-up; 0 skips the
    measurement (goodput_bps stays None).
    """

    def __init__(self, hosts: int, rate: str = "500mbit", burst: str = "256kb", loss: Optional[str] = None,
                 delay: Optional[str] = None, per_host: int = 1, goodput_seconds: float = 1.0,
                 tcp_cc: str = "cubic", racks: Optional[int] = None, uplink_rate: Optional[str] = None) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be between 1 and 250, not {hosts}")
        if per_host < 1:
            raise ValueError(f"per_host must be at least 1, not {per_host}")
        if racks and uplink_rate is None:
            raise ValueError("racks need the uplinks' rate (uplink_rate, --uplink-rate), e.g. 100mbit")
        if uplink_rate is not None and not racks:
            raise ValueError("an uplink rate without racks: give the number of racks too (racks, --racks)")
        self.rate = rate.strip().lower()
        self.rate_bps = parse_rate(rate)
        self.burst_bytes = parse_burst(burst)
        self.loss = parse_loss(loss) if loss is not None else None
        self.delay = parse_delay(delay) if delay is not None else None
        self.tcp_cc_requested = tcp_cc
        self.tcp_cc = tcp_cc  # what the hosts use: the requested one, or the machine's default (start())
        self.per_host = per_host
        self.goodput_seconds = goodput_seconds
        pid = os.getpid()
        self.run_id = f"{pid}.{_start_time(pid)}.{next(_run_counter)}"
        self.state_dir = STATE_ROOT / self.run_id
        self.hosts = [Host(f"h{i}", str(NETWORK[i + 1]), f"{PREFIX}{self.run_id}-h{i}") for i in range(hosts)]
        self.racks: List[Rack] = []
        if racks:
            first = 0
            for r, size in enumerate(rack_sizes(hosts, racks)):
                self.racks.append(Rack(f"rack{r}", tuple(h.name for h in self.hosts[first:first + size])))
                first += size
        self.uplink_rate = uplink_rate.strip().lower() if uplink_rate is not None else None
        self.uplink_rate_bps = parse_rate(uplink_rate) if uplink_rate is not None else None
        self.uplink_goodput_bps: Optional[float] = None
        self.uplink_goodput_bps_per_link: Dict[str, float] = {}
        self.switch_pid: Optional[int] = None  # a process in the switch namespace (its /proc/PID/net/dev)
        # holds the bridge br0, or with racks a bridge per rack, the spine's and the uplinks
        self.switch_netns = f"{PREFIX}{self.run_id}-sw"
        self._anchor_pids: Dict[str, int] = {}  # host -> the pid whose namespaces are the host's
        self._children: List[subprocess.Popen] = []  # every process started on a host, anchors included
        self._created: List[str] = []  # network namespaces, in creation order
        self.goodput_bps: Optional[float] = None
        self.goodput_bps_per_link: Dict[str, float] = {}

    # -- life cycle

    def __enter__(self) -> "Testbed":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Creates the hosts, the switch and the links, then measures the goodput."""
        check_prerequisites(loss=self.loss is not None)
        self.tcp_cc = permitted_tcp_cc(self.tcp_cc_requested)
        remove_stale()
        log.info("creating %d hosts%s, links %s", len(self.hosts),
                 f" in {len(self.racks)} racks ({', '.join(f'{r.name}: {len(r.hosts)}' for r in self.racks)})"
                 if self.racks else "", self.tc_description())
        self.state_dir.mkdir(parents=True)
        hosts_file = self.state_dir / "hosts"
        hosts_file.write_text("127.0.0.1\tlocalhost\n" + "".join(f"{h.address}\t{h.name}\n" for h in self.hosts))
        if self.racks:  # testbed_exec reads it: COLLECTIVES_TOPOLOGY of each host's processes
            (self.state_dir / "racks").write_text("".join(f"{h} {r.name}\n" for r in self.racks for h in r.hosts))
        self._add_netns(self.switch_netns)
        self._start_switch_anchor()
        for bridge in (["br-spine"] + [f"br-{r.name}" for r in self.racks]) if self.racks else ["br0"]:
            _run(["ip", "-n", self.switch_netns, "link", "add", bridge, "type", "bridge"])
            _run(["ip", "-n", self.switch_netns, "link", "set", bridge, "up"])
        for rack in self.racks:
            self._add_uplink(rack)
        for host in self.hosts:
            self._add_host(host, hosts_file)
        if len(self.hosts) > 1 and self.goodput_seconds > 0:
            self._measure_goodput()
            if self.racks:
                self._measure_uplink_goodput()

    def close(self) -> None:
        """Removes every process, namespace, link and file this testbed created; idempotent.
        SIGINT and SIGTERM wait until it is done."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for netns in reversed(self._created):
                _remove_netns(netns)
            self._created.clear()
            for proc in self._children:  # all were killed with their namespace: reap them
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            self._children.clear()
            self._anchor_pids.clear()
            shutil.rmtree(self.state_dir, ignore_errors=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _add_netns(self, netns: str) -> None:
        _run(["ip", "netns", "add", netns])
        self._created.append(netns)

    def _tbf(self, netns: str, dev: str, rate_bps: Optional[int] = None) -> None:
        _run(["tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate",
              str(rate_bps or self.rate_bps), "burst", str(self.burst_bytes), "latency", TBF_LATENCY])

    def _start_switch_anchor(self) -> None:
        """A sleeping process in the switch namespace: its /proc/PID/net/dev shows the uplinks'
        counters to any process (removed with the namespace)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.switch_netns, "sh", "-c", 'echo "$$" && exec sleep infinity'],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        self._children.append(proc)
        line = _read_line(proc, 30)
        if not line.isdigit():
            raise TestbedError("could not start a process in the switch's network namespace")
        proc.stdout.close()
        self.switch_pid = int(line)

    def _add_uplink(self, rack: Rack) -> None:
        """The rack's bridge cabled to the spine, limited to the uplink rate both ways."""
        sw = ["ip", "-n", self.switch_netns, "link"]
        _run(sw + ["add", rack.uplink, "type", "veth", "peer", "name", rack.spine_port])
        _run(sw + ["set", rack.uplink, "master", f"br-{rack.name}", "up"])
        _run(sw + ["set", rack.spine_port, "master", "br-spine", "up"])
        self._tbf(self.switch_netns, rack.uplink, self.uplink_rate_bps)  # out of the rack
        self._tbf(self.switch_netns, rack.spine_port, self.uplink_rate_bps)  # into the rack

    def rack_of(self, host: Union[str, Host]) -> Optional[str]:
        """The name of the host's rack (its processes' COLLECTIVES_TOPOLOGY), None without racks."""
        name = self.host(host).name
        return next((r.name for r in self.racks if name in r.hosts), None)

    def _add_host(self, host: Host, hosts_file: Path) -> None:
        self._add_netns(host.netns)
        ns = ["ip", "netns", "exec", host.netns]
        _run(ns + ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",  # no IPv6 chatter on the links
                   "net.ipv6.conf.default.disable_ipv6=1", f"net.ipv4.tcp_congestion_control={self.tcp_cc}"])
        _run(["ip", "-n", self.switch_netns, "link", "add", host.name, "type", "veth", "peer", "name", IFNAME,
              "netns", host.netns])
        bridge = f"br-{self.rack_of(host)}" if self.racks else "br0"
        _run(["ip", "-n", self.switch_netns, "link", "set", host.name, "master", bridge, "up"])
        self._tbf(self.switch_netns, host.name)  # the host's download
        _run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/{NETWORK.prefixlen}", "dev", IFNAME])
        _run(["ip", "-n", host.netns, "link", "set", IFNAME, "up"])
        _run(["ip", "-n", host.netns, "link", "set", "lo", "up"])
        self._tbf(host.netns, IFNAME)  # the host's upload
        if self.delay is not None:
            self._add_delay(host)
        if self.loss is not None:
            # One segment per packet, so that each frame is lost on its own (not 45 in one GSO packet).
            _run(["ip", "-n", host.netns, "link", "set", IFNAME, "gso_max_segs", "1"])
            _run(ns + ["nft", "-f", "-"], stdin=(
                "table inet cc_testbed {\n  chain input {\n    type filter hook input priority 0; policy accept;\n"
                f'    iifname "{IFNAME}" numgen random mod 1000000 < {round(self.loss * 1e6)} counter drop\n'
                "  }\n}\n"))
        self._start_anchor(host, hosts_file)

    def _add_delay(self, host: Host) -> None:
        """netem under the upload's tbf: each direction of a link crosses one host's upload."""
        try:
            _run(["tc", "-n", host.netns, "qdisc", "add", "dev", IFNAME, "parent", "1:1", "handle", "10:",
                  "netem", "delay", self.delay])
        except TestbedError as e:
            raise TestbedError(f"--delay needs the kernel's netem qdisc (sch_netem), and tc could not add it "
                               f"({e}); this kernel cannot emulate delay: run without --delay") from None

    def _start_anchor(self, host: Host, hosts_file: Path) -> None:
        """A sleeping process that holds the host's UTS, IPC and mount namespaces (entered with
        nsenter) with its hostname, a private /dev/shm and the testbed's /etc/hosts."""
        script = ('hostname "$1" && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && mount --bind "$2" /etc/hosts'
                  ' && echo "$$" && exec sleep infinity')
        proc = subprocess.Popen(["ip", "netns", "exec", host.netns, "unshare", "--uts", "--ipc", "--mount",
                                 "--propagation", "private", "sh", "-c", script, "sh", host.name, str(hosts_file)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        self._children.append(proc)
        line = _read_line(proc, 30)
        if not line.isdigit():
            proc.kill()
            _, err = proc.communicate()
            raise TestbedError(f"could not create the UTS, IPC and mount namespaces of {host.name}: {err.strip()}")
        proc.stdout.close()
        proc.stderr.close()
        self._anchor_pids[host.name] = int(line)
        (self.state_dir / f"{host.name}.pid").write_text(line + "\n")

    # -- placing processes on hosts

    def host(self, host: Union[str, Host]) -> Host:
        name = host.name if isinstance(host, Host) else host
        for h in self.hosts:
            if name in (h.name, h.address):
                return h
        raise KeyError(f"no host {name!r} in this testbed: it has {', '.join(h.name for h in self.hosts)}")

    def exec_prefix(self, host: Union[str, Host], cwd: Optional[str] = None) -> List[str]:
        """The argv prefix that runs a program on the host (in its namespaces), in cwd
        (default: this process's working directory)."""
        pid = self._anchor_pids[self.host(host).name]
        rack = self.rack_of(host)
        return (["nsenter", f"--target={pid}", "--net", "--uts", "--ipc", "--mount", f"--wd={cwd or os.getcwd()}",
                 "--"] + (["env", f"COLLECTIVES_TOPOLOGY={rack}"] if rack else []))

    def env(self) -> Dict[str, str]:
        """The TESTBED_* variables (see the module's docstring)."""
        return {
            "TESTBED_HOSTS": ",".join(f"{h.name}={h.address}" for h in self.hosts),
            "TESTBED_PER_HOST": str(self.per_host),
            "TESTBED_MPI_HOSTS": ",".join(f"{h.name}:{self.per_host}" for h in self.hosts),
            "TESTBED_IFNAME": IFNAME,
            "TESTBED_RATE": self.rate,
            "TESTBED_RATE_BPS": str(self.rate_bps),
            "TESTBED_BURST": str(self.burst_bytes),
            "TESTBED_LOSS": "" if self.loss is None else f"{self.loss:g}",
            "TESTBED_TCP_CC": self.tcp_cc,
            "TESTBED_TC": self.tc_description(),
            "TESTBED_GOODPUT_BPS": "" if self.goodput_bps is None else f"{self.goodput_bps:.0f}",
            "TESTBED_EXEC": str(EXEC_HELPER),
            "TESTBED_SSH_AGENT": f"{EXEC_HELPER} --ssh",
            "TESTBED_STATE_DIR": str(self.state_dir),
            "TESTBED_RACKS": str(len(self.racks)) if self.racks else "",
            "TESTBED_HOST_RACKS": ",".join(f"{h}={r.name}" for r in self.racks for h in r.hosts),
            "TESTBED_UPLINK_RATE": self.uplink_rate or "",
            "TESTBED_UPLINK_RATE_BPS": str(self.uplink_rate_bps or ""),
            "TESTBED_UPLINK_GOODPUT_BPS": "" if self.uplink_goodput_bps is None else f"{self.uplink_goodput_bps:.0f}",
            "TESTBED_SWITCH_PID": str(self.switch_pid or ""),
        }

    def run_on(self, host: Union[str, Host], argv: Sequence[str], env: Optional[Dict[str, str]] = None,
               cwd: Optional[str] = None, **popen_kwargs) -> subprocess.Popen:
        """Starts argv on the host; a Popen. env is the whole environment, as for Popen
        (default: this process's, with env()). The process is killed when the testbed closes."""
        if env is None:
            env = {**os.environ, **self.env()}
        proc = subprocess.Popen(self.exec_prefix(host, cwd) + list(argv), env=env, **popen_kwargs)
        self._children = [p for p in self._children if p.poll() is None] + [proc]
        return proc

    # -- measuring

    def tc_description(self) -> str:
        text = (f"tbf rate {self.rate} burst {self.burst_bytes} latency {TBF_LATENCY} on both ends of each "
                f"link, mtu 1500, tcp {self.tcp_cc}")
        if self.tcp_cc != self.tcp_cc_requested:
            text += f" ({self.tcp_cc_requested} requested: not allowed in namespaces here)"
        if self.loss is not None:
            text += f"; loss {self.loss * 100:g}% per direction (nftables random drop)"
        if self.delay is not None:
            text += f"; netem delay {self.delay} per direction"
        if self.racks:
            text += (f"; {len(self.racks)} racks ({'+'.join(str(len(r.hosts)) for r in self.racks)} hosts), each "
                     f"rack's uplink tbf rate {self.uplink_rate} burst {self.burst_bytes} both ways")
        return text

    def transfer(self, pairs: Sequence[Tuple[Union[str, Host], Union[str, Host]]], *,
                 seconds: Optional[float] = None, nbytes: Optional[int] = None,
                 warmup: float = GOODPUT_WARMUP_S, timeout: float = 120.0) -> List[Transfer]:
        """Bulk TCP transfers from src to dst for each (src, dst) pair, all at once, each of
        `nbytes`, or for `seconds` after the warm-up; what each receiver saw, in the order of pairs."""
        if (seconds is None) == (nbytes is None):
            raise ValueError("give seconds or nbytes")
        probe = [sys.executable, "-c", _PROBE]
        receivers, senders = [], []
        try:
            for i, (src, dst) in enumerate(pairs):
                dst = self.host(dst)
                recv = self.run_on(dst, probe + ["recv", dst.address, str(PROBE_PORT + i), str(warmup),
                                                 str(seconds or 0)], stdout=subprocess.PIPE, text=True)
                receivers.append(recv)
                if _read_line(recv, 30) != "ready":
                    raise TestbedError(f"the transfer receiver on {dst.name} did not start within 30 s")
            for i, (src, dst) in enumerate(pairs):
                senders.append(self.run_on(src, probe + ["send", self.host(dst).address, str(PROBE_PORT + i),
                                                         str(nbytes or 0)]))
            deadline = time.monotonic() + timeout
            results = []
            for (src, dst), sender, recv in zip(pairs, senders, receivers):
                out, _ = recv.communicate(timeout=max(0.1, deadline - time.monotonic()))
                if sender.wait(timeout=max(0.1, deadline - time.monotonic())) != 0 or recv.returncode != 0:
                    raise TestbedError(f"the transfer from {self.host(src).name} to {self.host(dst).name} failed "
                                       f"(sender exit {sender.returncode}, receiver exit {recv.returncode})")
                report = json.loads(out)
                results.append(Transfer(self.host(src).name, self.host(dst).name, report["bytes"],
                                        report["start"], report["end"], report["steady_bps"], report["first"],
                                        report["bin0"], tuple(report["bins"])))
            return results
        except subprocess.TimeoutExpired:
            raise TestbedError(f"transfers {pairs} did not finish within {timeout:g} s: do the links pass "
                               "traffic?") from None
        finally:
            for proc in senders + receivers:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()

    @staticmethod
    def _ring_links(hosts: Sequence[Host]) -> List[Tuple[Host, Host]]:
        """h0->h1, h1->h2, ..., the last back to h0 (both ways with two hosts)."""
        n = len(hosts)
        links = [(hosts[i], hosts[(i + 1) % n]) for i in range(n if n > 2 else 1)]
        if n == 2:
            links.append((hosts[1], hosts[0]))
        return links

    def _measure_goodput(self) -> None:
        links = [link for rack in self.racks for link in self._ring_links([self.host(h) for h in rack.hosts])
                 if len(rack.hosts) > 1]
        if not links:
            if self.racks:
                log.warning("no rack has two hosts: the host links' goodput is measured across the uplinks")
            links = self._ring_links(self.hosts)
        for src, dst in links:
            (result,) = self.transfer([(src, dst)], seconds=self.goodput_seconds)
            if result.steady_bps is None:
                raise TestbedError(f"the goodput transfer {src.name}->{dst.name} ended within its warm-up")
            self.goodput_bps_per_link[f"{src.name}->{dst.name}"] = result.steady_bps
        values = list(self.goodput_bps_per_link.values())
        self.goodput_bps = statistics.median(values)
        log.info("link goodput B = %.1f Mbit/s (%.1f%% of the rate; links %.1f to %.1f)", self.goodput_bps / 1e6,
                 100 * self.goodput_bps / self.rate_bps, min(values) / 1e6, max(values) / 1e6)
        if max(values) > 1.05 * min(values):
            log.warning("link goodputs differ by more than 5%% (%s): loss or a busy CPU makes them vary",
                        ", ".join(f"{k} {v / 1e6:.1f}" for k, v in self.goodput_bps_per_link.items()))

    def _measure_uplink_goodput(self) -> None:
        """Every host of rack r sends to one of rack r+1 at once, for each r in turn; a rack's
        goodput out is the sum of its flows'. Refuses the testbed unless the bytes crossed the
        sender's uplink out and the receiver's in."""
        racks = self.racks
        for r, rack in enumerate(racks):
            other = racks[(r + 1) % len(racks)]
            pairs = list(zip(rack.hosts, other.hosts))
            before = self.uplink_bytes()
            # The senders start one after another (a process each): the receivers run longer
            # than the window, so that all flows share at least --goodput-seconds of it.
            results = self.transfer(pairs, seconds=self.goodput_seconds + UPLINK_START_SLACK_S)
            after = self.uplink_bytes()
            together = aggregate_bps(results)
            if together is None:
                raise TestbedError(f"the goodput transfers {rack.name}->{other.name} shared no time after their "
                                   "warm-up (a busy machine starts them far apart: raise --goodput-seconds)")
            sent = sum(result.bytes for result in results)
            out, into = after[rack.name][0] - before[rack.name][0], after[other.name][1] - before[other.name][1]
            if out < sent or into < sent:
                raise TestbedError(f"{sent} bytes went from {rack.name} to {other.name}, but its uplink carried "
                                   f"{out} bytes out of {rack.name} and {into} into {other.name}: the traffic "
                                   "between racks does not cross the uplinks")
            self.uplink_goodput_bps_per_link[f"{rack.name}->{other.name}"] = together
        values = list(self.uplink_goodput_bps_per_link.values())
        self.uplink_goodput_bps = statistics.median(values)
        log.info("uplink goodput B_up = %.1f Mbit/s (%.1f%% of the uplink rate; uplinks %.1f to %.1f)",
                 self.uplink_goodput_bps / 1e6, 100 * self.uplink_goodput_bps / self.uplink_rate_bps,
                 min(values) / 1e6, max(values) / 1e6)

    def _switch_stats(self) -> Dict[str, dict]:
        ports = json.loads(_run(["ip", "-n", self.switch_netns, "-s", "-j", "link", "show"]))
        return {port["ifname"]: port["stats64"] for port in ports}

    def link_bytes(self) -> Dict[str, Tuple[int, int]]:
        """{host: (bytes it sent, bytes it received)} over its link since the testbed began,
        Ethernet headers included (read at the host's switch port)."""
        stats = self._switch_stats()
        return {h.name: (stats[h.name]["rx"]["bytes"], stats[h.name]["tx"]["bytes"]) for h in self.hosts}

    def uplink_bytes(self) -> Dict[str, Tuple[int, int]]:
        """{rack: (bytes out of the rack, bytes into it)} over its uplink since the testbed
        began, Ethernet headers included (read at the rack side, up-rackR); {} without racks."""
        if not self.racks:
            return {}
        stats = self._switch_stats()
        return {r.name: (stats[r.uplink]["tx"]["bytes"], stats[r.uplink]["rx"]["bytes"]) for r in self.racks}

    def dropped_packets(self) -> Dict[str, int]:
        """{host: packets dropped by --loss on their way into it}; {} without loss."""
        if self.loss is None:
            return {}
        drops = {}
        for h in self.hosts:
            ruleset = json.loads(_run(["ip", "netns", "exec", h.netns, "nft", "-j", "list", "table", "inet",
                                       "cc_testbed"]))
            drops[h.name] = sum(expr["counter"]["packets"] for item in ruleset["nftables"]
                                for expr in item.get("rule", {}).get("expr", []) if "counter" in expr)
        return drops

    @staticmethod
    def cpu_sampler() -> CpuSampler:
        """A CpuSampler: `with tb.cpu_sampler() as cpu: ...`, then cpu.util, cpu.cpu_bound."""
        return CpuSampler()

    def describe(self) -> dict:
        """The testbed's settings and measured goodput, for result files."""
        return {
            "hosts": [{"name": h.name, "address": h.address} for h in self.hosts],
            "per_host": self.per_host,
            "rate": self.rate,
            "rate_bps": self.rate_bps,
            "burst_bytes": self.burst_bytes,
            "tbf_latency": TBF_LATENCY,
            "loss": self.loss,
            "delay": self.delay,
            "tcp_cc": self.tcp_cc,
            "tcp_cc_requested": self.tcp_cc_requested,
            "tc": self.tc_description(),
            "goodput_bps": self.goodput_bps,
            "goodput_bps_per_link": self.goodput_bps_per_link,
            **({"racks": [{"name": r.name, "hosts": list(r.hosts)} for r in self.racks],
                "uplink_rate": self.uplink_rate, "uplink_rate_bps": self.uplink_rate_bps,
                "uplink_goodput_bps": self.uplink_goodput_bps,
                "uplink_goodput_bps_per_link": self.uplink_goodput_bps_per_link} if self.racks else {}),
        }


def link_bytes_delta(before: Dict[str, Tuple[int, int]], after: Dict[str, Tuple[int, int]]) -> Dict[str, dict]:
    """{host: {"tx": bytes, "rx": bytes}} that crossed each link between two link_bytes() readings."""
    return {name: {"tx": after[name][0] - tx, "rx": after[name][1] - rx} for name, (tx, rx) in before.items()}


def _run_command(command: Sequence[str], env: Dict[str, str]) -> int:
    """Runs COMMAND in a session of its own; if this process is interrupted, COMMAND's whole
    process group gets SIGTERM, then SIGKILL 5 s later. Returns its exit status (128 + signal)."""
    try:
        proc = subprocess.Popen(list(command), env=env, start_new_session=True)
    except OSError as e:
        raise TestbedError(f"cannot run {command[0]}: {e}") from None
    try:
        code = proc.wait()
    except BaseException:
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                pass
        proc.wait()
        raise
    return 128 - code if code < 0 else code


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run COMMAND on an emulated cluster: hosts as network namespaces on a bridge, each link "
                    "limited in both directions by tc tbf. Must run as root.",
        epilog="COMMAND gets TESTBED_HOSTS, TESTBED_EXEC, TESTBED_GOODPUT_BPS and more in its environment: "
               "see the docstring of benchmarks/testbed.py.")
    parser.add_argument("--hosts", type=int, required=True, help="number of emulated hosts")
    parser.add_argument("--rate", required=True, help="each link's rate in each direction, e.g. 500mbit")
    parser.add_argument("--burst", default="256kb", help="tbf burst (tc units: kb = 1024 bytes; default 256kb)")
    parser.add_argument("--loss", help="packet loss per direction, e.g. 0.1%% (nftables random drop)")
    parser.add_argument("--delay", help="one-way delay, e.g. 50us (needs netem, which this kernel lacks)")
    parser.add_argument("--tcp-cc", default="cubic", help="the hosts' TCP congestion control (default cubic)")
    parser.add_argument("--per-host", type=int, default=1, metavar="K", help="processes (mpirun slots) per host")
    parser.add_argument("--racks", type=int, metavar="R",
                        help="spread the hosts over R racks (contiguous blocks), each behind an uplink to a spine")
    parser.add_argument("--uplink-rate", metavar="RATE", help="with --racks: each uplink's rate, both directions")
    parser.add_argument("--goodput-seconds", type=float, default=1.0,
                        help="length of each link's goodput measurement (0 skips it; default 1)")
    parser.add_argument("--summary", type=Path, metavar="F", help="write the run's summary to F as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="testbed: %(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        testbed = Testbed(args.hosts, rate=args.rate, burst=args.burst, loss=args.loss, delay=args.delay,
                          tcp_cc=args.tcp_cc,
                          per_host=args.per_host, goodput_seconds=args.goodput_seconds, racks=args.racks,
                          uplink_rate=args.uplink_rate)
    except ValueError as e:
        parser.error(str(e))
    try:
        with testbed:
            before, uplinks, began = testbed.link_bytes(), testbed.uplink_bytes(), time.monotonic()
            with testbed.cpu_sampler() as cpu:
                code = _run_command(command, {**os.environ, **testbed.env()})
            seconds, after = time.monotonic() - began, testbed.link_bytes()
            summary = {**testbed.describe(), "command": command, "returncode": code, "seconds": seconds,
                       "link_bytes": link_bytes_delta(before, after),
                       **({"uplink_bytes": link_bytes_delta(uplinks, testbed.uplink_bytes())} if uplinks else {}),
                       "dropped_packets": testbed.dropped_packets(),
                       "cpu_util": cpu.util, "cpu_util_per_core": cpu.per_core, "cpu_bound": cpu.cpu_bound}
    except TestbedError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; everything the testbed created has been removed")
        return 130
    if cpu.cpu_bound:
        log.warning("the CPU was %.0f%% busy (all %d cores) during the command: where it was that busy while "
                    "the links were in use, the CPU, not the links, was the bottleneck and the figures do not "
                    "count; use fewer hosts or a lower rate (or time only the transfers, with "
                    "Testbed.cpu_sampler)", 100 * cpu.util, len(cpu.per_core))
    log.info("command exited with %d after %.1f s; CPU %.0f%% busy", code, seconds, 100 * cpu.util)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())

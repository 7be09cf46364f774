"""What the emulated-cluster harnesses (compare.py, train.py) check before they report a figure:
that every rank ran on the host the layout gives it, that each host's link moved what the
algorithm says, and what set a row's pace (the links, the machine's cores, or the system
itself), hence whether a ratio between two rows counts. One place for these rules, so that
both harnesses apply the same.

Placement. Each rank reports where it runs (host_identity: its UTS hostname and the IPv4
address of the testbed's interface in its network namespace); check_placement refuses a run
in which rank i is not on the layout's i-th host. mpirun's mapping can come from the
environment (PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe puts every rank of
`mpirun --host h0:1,h1:1,...` on h0), and loopback figures must never pass for the
emulated cluster's.

Link bytes. Per all-reduce of S bytes, each host's tx/S and rx/S (the bytes that crossed its
link, Ethernet/IP/TCP headers included) against its algorithm's model (link_model):
  ring, gloo: each worker host 2(n-1)/n each way;
  mpi: Open MPI's default picks its algorithm by n and S. With n a power of two it moves the
    ring's 2(n-1)/n per host (measured at 4 and 8 hosts, 16 KiB to 64 MiB; below ~8 KiB
    recursive doubling moves log2(n), more); with other n the hosts move unequal amounts
    (3 hosts, >= 256 KiB: 1.0 to 2.5 per host), so only what every all-reduce must move is
    checked: at least 1.0 each way (each host's data must leave it, and the sum of the
    others' must reach it);
  reduction server: each worker host 1.0 each way, each reducer host N/R;
  recursive doubling (collectives): with n a power of two, each host log2(n) each way; with
    other n the folded hosts move less, so only the lower bound of 1.0 is checked.
A figure more than LINK_TOLERANCE (10%) below its model is refused at every size: the bytes
must cross the links (a run whose ranks all sat on one host moves next to nothing). A figure
more than 10% above it is refused only where each host's share of the buffer, S/n, is at
least TWO_SIDED_SHARE (32 KiB): below that, per-message headers and ACKs add more than the
tolerance (measured on the testbed: gloo, whose messages carry the most overhead, moves
+11% at 8 KiB shares (8 hosts, 64 KiB), +5% at 16 KiB, +3% at 32 KiB; collectives and MPI
under 3% from 16 KiB). train.py checks each step, the model times the gradients' bytes,
with the smallest of DDP's buckets as S.

Pace. A row that reached at least LINK_BOUND_FRACTION (90%) of its link bound was paced by
the links, however busy the CPU: no CPU could have made it more than ~10% faster. A row
below that while the machine's cores were more than testbed.CPU_BOUND_UTIL (90%) busy was
paced by the CPU, which may have held it back: its figure may understate the system. (The
figure is the whole machine's /proc/stat: every emulated host, the kernel's packet work and
whatever else runs on the machine share its 2 cores.) A row below it with CPU to spare was
paced by its own protocol: its figure stands. A ratio of two rows counts only if neither was
CPU-paced: a CPU-paced peer may make it overstate, a CPU-paced subject makes it a lower bound.
"""

import fcntl
import json
import os
import socket
import struct
from pathlib import Path

import testbed

LINK_TOLERANCE = 0.10
TWO_SIDED_SHARE = 32 << 10  # bytes of the buffer per host, S/n
LINK_BOUND_FRACTION = 0.9
_SIOCGIFADDR = 0x8915

PACE_LEGEND = (f"pace: links = reached >= {LINK_BOUND_FRACTION:.0%} of its link bound (the links set the pace, "
               f"whatever the CPU); cpu = below that with the machine's cores > {testbed.CPU_BOUND_UTIL:.0%} busy "
               "(the CPU may have held it back: its figure may understate it); own = below that with CPU to spare "
               "(its own protocol set the pace); a ratio counts only if neither row is cpu")


class Refused(SystemExit):
    """A run the harness will not report: the message says why; nothing has been written."""

    def __init__(self, what, problems):
        super().__init__(f"refusing the run: {what}:\n" + "\n".join(f"  {p}" for p in problems)
                         + "\nnothing was written (no JSON, no RESULTS block)")


# -- placement

def host_identity(ifname):
    """Where this process runs: {"hostname": its UTS hostname, "address": the IPv4 address of
    ifname in its network namespace, or None where it has none}."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            request = struct.pack("256s", ifname.encode()[:15])
            address = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)[20:24])
        except OSError:
            address = None
    return {"hostname": socket.gethostname(), "address": address}


def report_placement(directory, rank, ifname):
    """On a rank: writes where it runs (host_identity) to DIRECTORY/rank-RANK.json, whole or
    not at all, for the harness's placement_verified."""
    path = Path(directory) / f"rank-{rank}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"rank": rank, **host_identity(ifname)}) + "\n")
    os.replace(partial, path)


def _reports(directory):
    return [json.loads(path.read_text()) for path in sorted(Path(directory).glob("rank-*.json"))]


def placement_verified(directory, hosts):
    """In the harness, while the job runs: False until every rank of the layout (rank i on
    hosts[i]) has reported into directory, then True if each ran on its host; Refused if not."""
    reported = _reports(directory)
    if {entry["rank"] for entry in reported} < set(range(len(hosts))):
        return False
    check_placement(hosts, reported)
    return True


def require_placement(directory, hosts):
    """After the job: Refused unless every rank reported and ran on its host."""
    check_placement(hosts, _reports(directory))


def _where(name, address):
    return f"{name} ({address or 'no address'})"


def check_placement(hosts, reported):
    """Raises Refused unless rank i ran on hosts[i] (a testbed.Host): reported holds one
    {"rank", "hostname", "address"} per rank, as host_identity gives them."""
    by_rank = {entry["rank"]: entry for entry in reported}
    problems = []
    for rank, host in enumerate(hosts):
        entry = by_rank.get(rank)
        if entry is None:
            problems.append(f"rank {rank}: no report of where it ran (expected {_where(host.name, host.address)})")
        elif (entry["hostname"], entry["address"]) != (host.name, host.address):
            problems.append(f"rank {rank} ran on {_where(entry['hostname'], entry['address'])}, expected "
                            f"{_where(host.name, host.address)}")
    extra = sorted(set(by_rank) - set(range(len(hosts))))
    if extra:
        problems.append(f"ranks {', '.join(map(str, extra))} are not in the layout ({len(hosts)} ranks)")
    if problems:
        expected = ", ".join(h.name for h in hosts)
        actual = ", ".join(by_rank[r]["hostname"] for r in sorted(by_rank))
        raise Refused(f"the ranks are not where the layout puts them (expected {expected}, one rank each; "
                      f"got {actual or 'no reports'})", problems)


# -- link bytes

def expected_traffic(algorithm, hosts, reducers):
    """(per worker host, per reducer host or None): bytes each way per all-reduce, as a
    multiple of the size (headers not counted)."""
    if algorithm == "reduction_server":
        return 1.0, hosts / reducers
    if algorithm == "recursive_doubling":
        return float(hosts.bit_length() - 1), None
    return 2 * (hosts - 1) / hosts, None


def _power_of_two(n):
    return n & (n - 1) == 0


def link_model(algorithm, hosts, reducers):
    """(per worker host, per reducer host or None), each (model, two-sided): bytes each way
    per all-reduce over its size; two-sided False where only a lower bound holds (see the
    module's docstring: MPI with a number of hosts that is not a power of two)."""
    worker, reducer = expected_traffic(algorithm, hosts, reducers)
    if algorithm in ("mpi", "recursive_doubling") and not _power_of_two(hosts):
        return (1.0, False), None
    return (worker, True), (None if reducer is None else (reducer, True))


def traffic_problems(label, figures, model, nbytes, hosts, smallest=None):
    """What is wrong with figures {host: {"tx", "rx"}} (bytes per all-reduce of nbytes over
    `hosts` worker hosts, or per several that add up to nbytes, the smallest of `smallest`
    bytes) against model (value, two-sided) of link_model; [] if nothing."""
    value, two_sided = model
    upper = two_sided and (smallest or nbytes) / hosts >= TWO_SIDED_SHARE
    problems = []
    for host, counted in sorted(figures.items(), key=lambda item: (len(item[0]), item[0])):
        for way in ("tx", "rx"):
            ratio = counted[way] / nbytes
            if ratio < value * (1 - LINK_TOLERANCE) or (upper and ratio > value * (1 + LINK_TOLERANCE)):
                limits = (f"within {LINK_TOLERANCE:.0%} of {value:.3f}" if upper
                          else f"at least {value * (1 - LINK_TOLERANCE):.3f} ({value:.3f} less {LINK_TOLERANCE:.0%})")
                problems.append(f"{label}, {nbytes} bytes: {host} {way}/size {ratio:.3f}, expected {limits}")
    return problems


def check_traffic(problems):
    """Raises Refused if the rows' traffic_problems found anything."""
    if problems:
        raise Refused("the bytes on the links are not what the algorithms move (a run whose ranks shared a host, "
                      "or resent much: see benchmarks/_checks.py)", problems)


# -- pace

def pace(bound_fraction, cpu_util):
    """'links', 'cpu' or 'own' (see the module's docstring); None without a bound."""
    if bound_fraction is None:
        return None
    if bound_fraction >= LINK_BOUND_FRACTION:
        return "links"
    if cpu_util is not None and cpu_util > testbed.CPU_BOUND_UTIL:
        return "cpu"
    return "own"


def ratio_standing(subject, subject_pace, peer, peer_pace):
    """(counts, words): whether the ratio subject/peer counts, and why, from the two rows' pace."""
    if subject_pace == "cpu" and peer_pace == "cpu":
        return False, f"does not count: {subject} and {peer} were both CPU-paced"
    if peer_pace == "cpu":
        return False, f"may overstate: {peer} was CPU-paced"
    if subject_pace == "cpu":
        return False, f"a lower bound: {subject} was CPU-paced"
    return True, f"counts ({subject}: {subject_pace}, {peer}: {peer_pace})"

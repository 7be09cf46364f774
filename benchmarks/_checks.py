"""What the emulated-cluster harnesses (compare.py, train.py) check before they report a figure:
that every rank ran on the host the layout gives it, that each host's link moved what the
algorithm says, and what set a row's pace (the links, the machine's cores, or the system
itself), hence whether a ratio between two rows counts. One place for these rules, so that
both harnesses apply the same.

Placement. Each rank reports where it runs (host_identity: its UTS hostname and the IPv4
address of the testbed's interface in its network namespace, and its COLLECTIVES_TOPOLOGY);
check_placement refuses a run in which rank i is not on the host the layout gives it, or, with
racks, does not carry its host's rack as its topology label. The layout (Layout) places K
ranks on each host in one of two rank orders. block: ranks 0..K-1 on h0, K..2K-1 on h1, ...;
hosts sit in racks in contiguous blocks (testbed.py), so rank order is rack order too.
interleaved (as a scheduler may hand ranks out): the hosts taken round-robin over the racks
(h0, h4, h1, h5, ... for 2 racks of 4) and the ranks dealt out cyclically over them, rank i on
the (i mod N)-th, so consecutive ranks alternate racks (and hosts). mpirun's mapping can come from the
environment (PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe puts every rank of
`mpirun --host h0:1,h1:1,...` on h0), and loopback figures must never pass for the
emulated cluster's.

Link bytes. Per all-reduce of S bytes, each host's tx/S and rx/S (the bytes that crossed its
link, Ethernet/IP/TCP headers included) against its algorithm's model (link_model; on layouts
with K ranks per host or racks, level_models: see its comments for each plan's derivation,
one model per level, host NICs and rack uplinks):
  ring, gloo: each worker host 2(n-1)/n each way;
  mpi: Open MPI's default picks its algorithm by n and S. With n a power of two it moves the
    ring's 2(n-1)/n per host (measured at 4 and 8 hosts, 16 KiB to 64 MiB; below ~8 KiB
    recursive doubling moves log2(n), more); with other n the hosts move unequal amounts
    (3 hosts, >= 256 KiB: 1.0 to 2.5 per host), so only what every all-reduce must move is
    checked: at least 1.0 each way (each host's data must leave it, and the sum of the
    others' must reach it);
  reduction server: each worker host 1.0 each way, each reducer host N/R (its host plan on
    layouts with K ranks per host: see level_models);
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
    partial.write_text(json.dumps({"rank": rank, **host_identity(ifname),
                                   "topology": os.environ.get("COLLECTIVES_TOPOLOGY")}) + "\n")
    os.replace(partial, path)


def _reports(directory):
    return [json.loads(path.read_text()) for path in sorted(Path(directory).glob("rank-*.json"))]


def placement_verified(directory, hosts, racks=None):
    """In the harness, while the job runs: False until every rank of the layout (rank i on
    hosts[i], with racks[i] its COLLECTIVES_TOPOLOGY) has reported into directory, then True
    if each ran where it should; Refused if not."""
    reported = _reports(directory)
    if {entry["rank"] for entry in reported} < set(range(len(hosts))):
        return False
    check_placement(hosts, reported, racks)
    return True


def require_placement(directory, hosts, racks=None):
    """After the job: Refused unless every rank reported and ran on its host (and rack)."""
    check_placement(hosts, _reports(directory), racks)


def _expected_hosts(hosts):
    """'h0, h1, h2, one rank each', or 'h0 (ranks 0-3), h1 (ranks 4-7)' where ranks share hosts."""
    if len({h.name for h in hosts}) == len(hosts):
        return ", ".join(h.name for h in hosts) + ", one rank each"
    runs = []
    for rank, host in enumerate(hosts):
        if runs and runs[-1][0] == host.name and runs[-1][2] == rank - 1:
            runs[-1][2] = rank
        else:
            runs.append([host.name, rank, rank])
    return ", ".join(f"{name} (rank{'s' if last > first else ''} {first}" + (f"-{last})" if last > first else ")")
                     for name, first, last in runs)


def _where(name, address):
    return f"{name} ({address or 'no address'})"


def check_placement(hosts, reported, racks=None):
    """Raises Refused unless rank i ran on hosts[i] (a testbed.Host; several ranks may share
    one) and, with racks (each rank's rack name, or None), carried COLLECTIVES_TOPOLOGY =
    racks[i]: reported holds one {"rank", "hostname", "address", "topology"} per rank, as
    report_placement writes them."""
    by_rank = {entry["rank"]: entry for entry in reported}
    problems = []
    for rank, host in enumerate(hosts):
        entry = by_rank.get(rank)
        if entry is None:
            problems.append(f"rank {rank}: no report of where it ran (expected {_where(host.name, host.address)})")
        elif (entry["hostname"], entry["address"]) != (host.name, host.address):
            problems.append(f"rank {rank} ran on {_where(entry['hostname'], entry['address'])}, expected "
                            f"{_where(host.name, host.address)}")
        elif racks is not None and racks[rank] is not None and entry.get("topology") != racks[rank]:
            problems.append(f"rank {rank} on {host.name} has COLLECTIVES_TOPOLOGY={entry.get('topology')}, expected "
                            f"{racks[rank]} (its host's rack)")
    extra = sorted(set(by_rank) - set(range(len(hosts))))
    if extra:
        problems.append(f"ranks {', '.join(map(str, extra))} are not in the layout ({len(hosts)} ranks)")
    if problems:
        actual = ", ".join(by_rank[r]["hostname"] for r in sorted(by_rank))
        raise Refused(f"the ranks are not where the layout puts them (expected {_expected_hosts(hosts)}; "
                      f"got {actual or 'no reports'})", problems)


# -- layouts

RANK_ORDERS = ("block", "interleaved")


class Layout:
    """Where a job's workers sit: `hosts` worker hosts with `per_host` ranks each, the hosts in
    `racks` (worker hosts per rack, contiguous blocks in host order; () without racks), and
    `reducers` reducer hosts beside them; `rank_order` (RANK_ORDERS) says which rank runs where:
    block, K consecutive ranks per host in host order; interleaved, ranks dealt out cyclically
    over the hosts taken round-robin over the racks, so that consecutive ranks alternate racks."""

    def __init__(self, hosts, per_host=1, racks=(), reducers=0, rank_order="block"):
        self.hosts, self.per_host, self.racks, self.reducers = hosts, per_host, tuple(racks or ()), reducers or 0
        self.rank_order = rank_order or "block"
        if self.racks and sum(self.racks) != hosts:
            raise ValueError(f"racks {self.racks} hold {sum(self.racks)} hosts, not {hosts}")
        if self.rank_order not in RANK_ORDERS:
            raise ValueError(f"rank order {self.rank_order!r}: choose from {', '.join(RANK_ORDERS)}")

    @property
    def ranks(self):
        return self.hosts * self.per_host

    @property
    def shared(self):
        """Whether ranks share hosts or hosts share racks: a layout with levels."""
        return self.per_host > 1 or bool(self.racks)

    def host_racks(self):
        """Each host's rack index (contiguous blocks); all 0 without racks."""
        return [r for r, size in enumerate(self.racks or (self.hosts,)) for _ in range(size)]

    def host_order(self):
        """The host indices in the order ranks are dealt to them: interleaved, round-robin over
        the racks (2 racks of 4: 0, 4, 1, 5, 2, 6, 3, 7); block, or without racks, 0, 1, ..."""
        if self.rank_order == "block" or not self.racks:
            return list(range(self.hosts))
        firsts = [sum(self.racks[:r]) for r in range(len(self.racks))]
        return [firsts[r] + j for j in range(max(self.racks)) for r in range(len(self.racks)) if j < self.racks[r]]

    def rank_host_indices(self):
        """Each rank's host index: block, rank // K; interleaved, host_order()[rank % N]."""
        if self.rank_order == "block":
            return [rank // self.per_host for rank in range(self.ranks)]
        order = self.host_order()
        return [order[rank % self.hosts] for rank in range(self.ranks)]

    def rank_hosts(self, hosts):
        """The host of each rank (hosts: the worker hosts, in order)."""
        return [hosts[i] for i in self.rank_host_indices()]

    def rank_racks(self):
        """Each rank's rack name (its COLLECTIVES_TOPOLOGY), or None per rank without racks."""
        if not self.racks:
            return [None] * self.ranks
        racks = self.host_racks()
        return [f"rack{racks[i]}" for i in self.rank_host_indices()]

    def describe(self):
        """'2 hosts x 4 ranks', '8 hosts in 2 racks (4+4), 1 rank each'."""
        where = f"{self.hosts} hosts" + (f" in {len(self.racks)} racks ({'+'.join(map(str, self.racks))})"
                                         if self.racks else "")
        return f"{where}, {self.per_host} rank{'s' if self.per_host > 1 else ''} each"

    def describe_order(self):
        """'block (rank i on host i // 4)', 'interleaved (ranks on h0, h4, h1, h5, ... in turn)'."""
        if self.rank_order == "block":
            return f"block (rank i on host i // {self.per_host})"
        order = self.host_order()
        shown = ", ".join(f"h{i}" for i in order[:4]) + (", ..." if len(order) > 4 else "")
        return f"interleaved (rank i on the (i mod {self.hosts})-th of {shown}: consecutive ranks alternate racks)"

    @classmethod
    def of_row(cls, row):
        """A result row's layout: rows carry hosts, per_host and racks (rows from before
        layouts had one rank per host and no racks)."""
        return cls(row["hosts"], row.get("per_host") or 1, row.get("racks") or (), row.get("reducers") or 0,
                   row.get("rank_order") or "block")


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


def _log2(n):
    return n.bit_length() - 1


RACK_ORDERED = "ring:rack-ordered"  # the flat ring over the ranks ordered rack by rack, host by host


def plan_of(algorithm, layout):
    """The plan a row of `algorithm` runs on the layout, as rows name it: 'ring:rank-order'
    (the flat ring in rank order: in block order it crosses each host NIC and each uplink once
    each way, interleaved at every hop), 'ring:rack-ordered' (the flat ring over the ranks
    ordered rack by rack and host by host, whatever the rank order: the best flat ring, once
    each way through each NIC and uplink), 'recursive_doubling:rank-order', 'hierarchical:host'
    (no racks) or 'hierarchical:host+rack', 'reduction_server' (flat) or 'reduction_server:host'
    (its host plan); a peer's is its name ('gloo', 'mpi')."""
    base, words = algorithm_name(algorithm), algorithm.partition("(")[2]
    if base == RACK_ORDERED:
        return base
    if base in ("ring", "recursive_doubling"):
        return f"{base}:rank-order"
    if base == "reduction_server":
        return algorithm if algorithm == "reduction_server:host" else base
    if base == "hierarchical":
        # The library describes its plan, e.g. "hierarchical(2 ranks/host x 2 hosts/rack x 2
        # racks)": a rack level where it names racks; without a description, the layout's.
        racks = "rack" in words if words else bool(layout.racks)
        return "hierarchical:host+rack" if racks else "hierarchical:host"
    return base


def algorithm_name(algorithm):
    """The algorithm of a communicator's description: 'hierarchical(2 ranks/host x 2 hosts)'
    -> 'hierarchical', 'reduction_server:host' -> 'reduction_server'."""
    name = algorithm.split("(")[0].strip()
    return "reduction_server" if name.startswith("reduction_server:") else name


def rack_ordered(layout):
    """The ranks ordered rack by rack, host by host (then by rank): RACK_ORDERED's ring order."""
    hosts, racks = layout.rank_host_indices(), layout.host_racks()
    return sorted(range(layout.ranks), key=lambda rank: (racks[hosts[rank]], hosts[rank], rank))


def ring_pairs(order, share):
    """A ring over `order` (ranks): each member sends `share` of S to the next."""
    return [(a, b, share) for a, b in zip(order, order[1:] + order[:1])] if len(order) > 1 else []


def level_bytes(pairs, layout):
    """{"host": model, "uplink": model or None} for traffic `pairs` ((from rank, to rank, share
    of S) for every message of an all-reduce): per host NIC and per rack uplink, the shares of
    the pairs that leave and enter it (pairs inside a host cross no NIC, inside a rack no
    uplink). A level's model is (value, True) where every host (rack) moves the same each way,
    else (the least, False): a lower bound."""
    host_of, rack_of = layout.rank_host_indices(), layout.host_racks()

    def model(place, places):
        moved = {p: [0.0, 0.0] for p in range(places)}
        for a, b, share in pairs:
            if place(a) != place(b):
                moved[place(a)][0] += share
                moved[place(b)][1] += share
        values = [round(v, 9) for both in moved.values() for v in both]
        return (values[0], True) if len(set(values)) == 1 else (min(values), False)

    return {"host": model(lambda r: host_of[r], layout.hosts),
            "uplink": model(lambda r: rack_of[host_of[r]], len(layout.racks)) if layout.racks else None}


def level_models(plan, layout):
    """{"host": (value, two-sided), "uplink": (value, two-sided) or None, "reducer": (value,
    two-sided) or None}: the bytes each host NIC, each rack uplink and each reducer host's NIC
    moves each way per all-reduce of S bytes, over S, for `plan` (plan_of's names, or an
    algorithm's) on the layout; two-sided False where only a lower bound holds.

    n = h*k ranks on h hosts, k per host, in R racks of m hosts each, in the layout's rank order
    (block: each host's ranks consecutive, each rack's hosts consecutive; interleaved:
    consecutive ranks on hosts of alternating racks). Traffic between ranks of one host goes
    over shared memory (collectives) or loopback (gloo, MPI) and crosses no NIC.
    """
    algorithm = plan.split(":")[0]
    h, k = layout.hosts, layout.per_host
    n, racks = h * k, layout.racks
    equal_racks = bool(racks) and len(set(racks)) == 1
    R, m = len(racks), (racks[0] if racks else h)
    lower = (1.0, False)  # any all-reduce: each host (and rack) must send out S and take in S
    if plan == RACK_ORDERED or algorithm in ("ring", "gloo", "mwms"):
        # A ring sends 2(n-1)/n*S from each member to the next; only the hops between hosts cross
        # NICs, between racks uplinks. In rank order (the library's ring:rank-order, gloo's ring)
        # on a block layout that is one hop out of each host and each rack (1.75 per NIC and per
        # uplink for 8 ranks); interleaved, every hop leaves its host and its rack (2 racks of 4
        # hosts: 4 hops out of each rack, 4 * 1.75 = 7.0 per uplink). Ordered rack by rack
        # (ring:rack-ordered) it is one hop out of each host and each rack in any rank order.
        # TensorFlow's MultiWorkerMirroredStrategy ("mwms", its RING collective) runs the ring over
        # the workers in task order (TF_CONFIG's, the rank order here), its tensors in gRPC messages.
        order = rack_ordered(layout) if plan == RACK_ORDERED else list(range(n))
        models = level_bytes(ring_pairs(order, 2 * (n - 1) / n), layout)
        host, uplink = models["host"], models["uplink"]
    elif algorithm == "mpi":
        # Open MPI picks its algorithm by n and S: with one rank per host and h a power of two
        # it moves the ring's 2(n-1)/n (measured); otherwise only the lower bound is checked.
        host = (2 * (n - 1) / n, True) if k == 1 and _power_of_two(h) else lower
        uplink = lower if racks else None
    elif algorithm == "recursive_doubling":
        # log2(n) steps, each rank exchanging all S with rank XOR 2^j. In block order the steps
        # with 2^j >= k (log2(h) of them) pair ranks of different hosts, all k ranks of a host at
        # once: k*log2(h) per NIC; the steps with 2^j >= k*m (log2(R)) cross racks with k*m ranks
        # each: k*m*log2(R). Only for n a power of two (else folded ranks move less: the lower
        # bound); uneven counts per host or rack give the least of them as a lower bound.
        if _power_of_two(n):
            models = level_bytes([(r, r ^ (1 << j), 1.0) for j in range(_log2(n)) for r in range(n)], layout)
            host, uplink = models["host"], models["uplink"]
        else:
            host, uplink = lower, (lower if racks else None)
    elif algorithm == "hierarchical":
        # Hierarchical (issue 12): reduce-scatter among the k ranks of a host over shared
        # memory (no NIC bytes), leaving each local rank 1/k of the sum; then each local rank runs
        # a ring across the h hosts on its S/k, all k at once: a ring all-reduce of S/k over h
        # members sends 2(h-1)/h*S/k from each, so a host NIC carries k*2(h-1)/h*S/k =
        # 2(h-1)/h*S per direction; the all-gather inside the host is shared memory again.
        # The planner (collectives.hierarchical) groups ranks by their topology labels, not by
        # rank arithmetic, so none of this depends on the rank order.
        # With racks and a plan that does not see them (hierarchical:host), each of the k rings
        # runs over the hosts ordered by their lowest rank: in block order rack by rack, crossing
        # each uplink once each way with 2(h-1)/h*S/k, so an uplink carries 2(h-1)/h*S;
        # interleaved, at every hop.
        # With racks in the plan (hierarchical:host+rack, R racks of m hosts): after the host
        # level, each of the k rings across the m hosts of a rack is a reduce-scatter (each host
        # NIC: (m-1)/m*S/k per local rank, k of them: (m-1)/m*S), leaving each of the k*m ranks
        # of a rack S/(k*m); the top level is a ring all-reduce per such rank across the R racks
        # on its S/(k*m): each rank sends 2(R-1)/R*S/(k*m) to its peer in the next rack, and all
        # k*m ranks of a rack at once, so an uplink carries 2(R-1)/R*S per direction (S for two
        # racks), and a host NIC k*2(R-1)/R*S/(k*m) = 2(R-1)/(R*m)*S on top; then the all-gather
        # back across the rack's hosts, (m-1)/m*S again. Host NIC in all: 2(m-1)/m*S +
        # 2(R-1)/(R*m)*S. With uneven racks only the lower bound is checked.
        if plan == "hierarchical:host+rack" and racks:
            if equal_racks:
                host = (2 * (m - 1) / m + 2 * (R - 1) / (R * m), True)
                uplink = (2 * (R - 1) / R, True)
            else:
                host = uplink = lower
        else:
            host_of = layout.rank_host_indices()
            firsts = sorted({host_of.index(i) for i in range(h)})  # each host's lowest rank, in order
            models = level_bytes(ring_pairs(firsts, 2 * (h - 1) / h), layout)
            host, uplink = models["host"], models["uplink"]
    elif plan == "reduction_server:host":
        # The reduction server's host plan (issue 12): reduce-scatter among the k ranks of a host
        # over shared memory (no NIC bytes), each local rank sends its S/k to the reducers and
        # gets S/k of sums back, all k at once: S per host NIC each way; the all-gather inside
        # the host is shared memory again. The reducers take each host's S: h/R*S per reducer
        # host each way.
        return {"host": (1.0, True), "uplink": None, "reducer": (h / layout.reducers, True)}
    elif algorithm == "reduction_server":
        # Each worker rank sends S to the reducers and gets S back: k*S per worker NIC; each
        # reducer host takes N/R of it (N worker ranks).
        host = (float(k), True)
        return {"host": host, "uplink": None, "reducer": (n / layout.reducers, True)}
    else:
        raise ValueError(f"no link model for plan {plan!r}")
    return {"host": host, "uplink": uplink, "reducer": None}


def bound_ratios(plan, layout):
    """{level: bytes per direction over S} that a plan's bound divides the level's goodput by:
    its model's value; for MPI, whose algorithm is its own, the best flat ring's
    (ring:rack-ordered: in block order the rank-order ring, as before layouts)."""
    models = level_models(RACK_ORDERED if plan.split(":")[0] == "mpi" else plan, layout)
    return {level: model[0] for level, model in models.items() if model is not None}


def plan_bound(plan, layout, goodput, uplink_goodput=None):
    """The algbw bound (in goodput's unit) of `plan` on the layout: each level moves its share
    of S per direction (bound_ratios) over its goodput, the host links' B and the uplinks'
    B_up, and the slowest level sets the pace: algbw <= min(B/host, B_up/uplink), and for the
    reduction server B/reducer too (B*min(1, R/N) with one rank per host). Recursive doubling's
    is B/max(1, k*log2(h)) (at least the lower bound's share)."""
    ratios = bound_ratios(plan, layout)
    limits = [goodput / max(1.0, ratios["host"]) if plan.startswith("recursive_doubling") else goodput / ratios["host"]]
    if ratios.get("reducer"):
        limits.append(goodput / ratios["reducer"])
    if ratios.get("uplink") and uplink_goodput:
        limits.append(uplink_goodput / ratios["uplink"])
    return min(limits)


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

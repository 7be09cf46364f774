"""Chaos on the emulated cluster (issue 10, "Chaos in CI, bounded"): DDP training over the
torch backend "collectives" with 3 workers and 2 reducers, each on a host of its own
(benchmarks/testbed.py), while the network or a process fails: 1% loss on every link, a
worker's link cut and healed (for less than the heartbeat deadline), a reducer's link cut for
good, SIGSTOP and SIGKILL of a worker and of a reducer, SIGKILL of rank 0 (the stores' host).
Every scenario is bounded (COLLECTIVES_TIMEOUT 20 s, heartbeat deadline 3 s,
a hard deadline per job after which the test fails as a hang) and checks its outcome:

- the network heals or a reducer fails: training finishes with the parameters identical on
  every rank (SHA-256, allgathered as benchmarks/train.py does) and equal, bit for bit, to a
  run without faults (the reduction server sums in rank order, independently of how many
  reducers serve: same data, same parameters); a dropped reducer is named in every worker's log;
- a worker stops or dies: every other worker fails within the timeout (+ slack) with a
  message that names that worker's rank.

Each job pauses its workers before step PAUSE_AT until the test says go; the fault comes
FAULT_DELAY_S after that, in the middle of training. Real processes, sockets and torch; the
testbed removes every namespace and process it made, also after a failure.

CI runs the cheapest scenarios (CI_SCENARIOS); COLLECTIVES_TEST_FULL=1 (the test command's
one flag for long runs) runs them all. Needs root, iproute2, util-linux and nftables.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from launch_env import clean_environ, load_benchmark

compare = load_benchmark("compare")  # the reducers' start-up, as the benchmarks do it
testbed = compare.testbed


def _unmet():
    try:
        testbed.check_prerequisites(loss=True)
    except testbed.TestbedError as e:
        return str(e)
    return None


FULL = os.environ.get("COLLECTIVES_TEST_FULL") == "1"
CI_SCENARIOS = {"baseline", "worker-killed", "reducer-killed", "store-host-killed"}
pytestmark = [pytest.mark.chaos, pytest.mark.testbed,
              pytest.mark.skipif(_unmet() is not None, reason=_unmet() or "")]

WORKERS, REDUCERS = 3, 2
RATE = "100mbit"
TIMEOUT_S = 20.0  # COLLECTIVES_TIMEOUT: every collective's deadline
HEARTBEAT_S = 3.0  # COLLECTIVES_RS_HEARTBEAT_TIMEOUT: a silent reducer is dropped after it
SLACK_S = 10.0  # beyond the timeout, for a failure to reach every worker on 2 busy cores
START_S = 90.0  # for the workers (torch) and reducers to start and reach PAUSE_AT
JOB_S = 60.0  # after go, for the job to end one way or the other: past it, a hang
PAUSE_AT, STEPS = 3, 60
FAULT_DELAY_S = 0.3
# A worker's link cut and healed, for less than the heartbeat deadline: TCP resends with a
# backoff that doubles (a lost frame goes again 1, 3, 7, 15, ... RTOs after it, RTO >= 200 ms),
# so the cut worker hears nothing from the reducers for up to twice the cut; it sees its
# reducers' hosts stop answering its TCP and waits that out instead of dropping them.
CUT_S = 2.5
VICTIM_RANK = 1

# One worker: torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the job's
# COLLECTIVES_* in the environment; argv: steps, the step to pause at, the job's folder. A
# tiny MLP (a step is milliseconds of compute) with several DDP buckets, each rank its own
# fixed data per step. Prints one JSON report: the parameters' hash and every rank's, or the
# error that ended training.
WORKER = r'''
import datetime, hashlib, json, os, sys, time, traceback
from pathlib import Path
import torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
import collectives as cc
import collectives.torch  # noqa: F401 - the backend "collectives"

steps, pause_at, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
report = {"rank": rank}
try:
    # torch's timeout is the group's (an argument wins over COLLECTIVES_TIMEOUT): the same here.
    timeout = datetime.timedelta(seconds=float(os.environ["COLLECTIVES_TIMEOUT"]))
    dist.init_process_group("collectives", timeout=timeout)
    comm = dist.group.WORLD.communicator
    report["algorithm"] = comm.algorithm
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 8))
    ddp = DDP(model, bucket_cap_mb=0.02)  # several buckets: several all-reduces per step
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    longest, went = 0.0, None
    for step in range(steps):
        if step == pause_at:
            (folder / f"paused-{rank}").touch()
            deadline = time.monotonic() + 300
            while not (folder / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            went = time.monotonic()
        began = time.monotonic()
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
        optimizer.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        optimizer.step()
        longest = max(longest, time.monotonic() - began)
        report["steps"] = step + 1
    report["after_go_s"] = time.monotonic() - went
    report["longest_step_s"] = longest
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().contiguous().numpy().tobytes())
    hashes = [None] * dist.get_world_size()
    dist.all_gather_object(hashes, digest.hexdigest())
    report.update(ok=True, sha=digest.hexdigest(), hashes=hashes, reducers=comm.reducer_stats())
    dist.destroy_process_group()
except BaseException as error:
    report.update(error_type=type(error).__name__, message=str(error),
                  is_collective_error=isinstance(error, cc.CollectiveError),
                  traceback=traceback.format_exc()[-3000:])
print(json.dumps(report), flush=True)
'''


class Job:
    """WORKER on h0..h2 and a reducer on h3 and h4 of a fresh testbed, paused before PAUSE_AT."""

    def __init__(self, bed, folder):
        self.bed, self.folder = bed, folder
        folder.chmod(0o755)
        (folder / "job.py").write_text(WORKER)
        env = {**clean_environ(), **bed.env(), **compare.PINNED_ENV,
               **compare.reducer_job_env(bed, folder, REDUCERS), "PYTHONUNBUFFERED": "1",
               "COLLECTIVES_TIMEOUT": f"{TIMEOUT_S:g}", "COLLECTIVES_RS_HEARTBEAT_TIMEOUT": f"{HEARTBEAT_S:g}"}
        self.reducers = []
        compare.start_reducers(bed, bed.hosts[WORKERS:WORKERS + REDUCERS], env["COLLECTIVES_RENDEZVOUS"], env,
                               folder, self.reducers)
        self.workers, self.outputs = [], []
        for rank, host in enumerate(bed.hosts[:WORKERS]):
            torchrun = {"RANK": str(rank), "WORLD_SIZE": str(WORKERS), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": bed.hosts[0].address, "MASTER_PORT": "29500"}
            out, err = folder / f"worker-{rank}.out", folder / f"worker-{rank}.err"
            self.outputs.append((out, err))
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                self.workers.append(bed.run_on(host, [sys.executable, "job.py", str(STEPS), str(PAUSE_AT),
                                                      str(folder)], env={**env, **torchrun}, cwd=str(folder),
                                               stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr))
        deadline = time.monotonic() + START_S
        while len(list(folder.glob("paused-*"))) < WORKERS:
            if time.monotonic() > deadline or any(w.poll() is not None for w in self.workers):
                pytest.fail(f"the workers did not all reach step {PAUSE_AT} within {START_S:g} s:\n{self.logs()}")
            time.sleep(0.05)

    def go(self):
        (self.folder / "go").touch()
        self.went = time.monotonic()

    def host_of_worker(self, rank):
        return self.bed.hosts[rank]

    def host_of_reducer(self, index):
        return self.bed.hosts[WORKERS + index]

    def cut(self, host):
        subprocess.run(self.bed.exec_prefix(host) + ["ip", "link", "set", "eth0", "down"], check=True, timeout=10)

    def heal(self, host):
        subprocess.run(self.bed.exec_prefix(host) + ["ip", "link", "set", "eth0", "up"], check=True, timeout=10)

    def wait(self, ranks, limit=JOB_S):
        """Waits for the workers `ranks` to exit, at most `limit` s after go; a hang fails the test.
        {rank: seconds from go to its exit}."""
        deadline, ended = self.went + limit, {}
        while len(ended) < len(ranks):
            for rank in ranks:
                if rank not in ended and self.workers[rank].poll() is not None:
                    ended[rank] = time.monotonic() - self.went
            if time.monotonic() > deadline:
                pytest.fail(f"hang: workers {sorted(set(ranks) - set(ended))} still ran {limit:g} s after go "
                            f"(timeout {TIMEOUT_S:g} s):\n{self.logs()}")
            time.sleep(0.05)
        return ended

    def report(self, rank):
        out, err = self.outputs[rank]
        lines = [line for line in out.read_text(errors="replace").splitlines() if line.startswith("{")]
        assert lines, f"worker {rank} printed no report (exit {self.workers[rank].returncode}):\n{self.logs()}"
        return json.loads(lines[-1])

    def stderr(self, rank):
        return self.outputs[rank][1].read_text(errors="replace")

    def reducer_log(self, index):
        return self.reducers[index].log_path.read_text(errors="replace")

    def logs(self):
        parts = [f"-- worker {rank} (exit {w.poll()}):\n{self.outputs[rank][1].read_text(errors='replace')[-2500:]}"
                 f"{self.outputs[rank][0].read_text(errors='replace')[-1500:]}" for rank, w in enumerate(self.workers)]
        parts += [f"-- reducer on {r.host.name} (exit {r.proc.poll()}):\n{r.log_tail(20)}" for r in self.reducers]
        return "\n".join(parts)


@contextlib.contextmanager
def chaos(folder, fault=None, loss=None):
    """A fresh testbed (loss on every link if given) and a job paused before PAUSE_AT; go, then
    fault(job) FAULT_DELAY_S later; yields the job. Leaving removes every host and process."""
    with testbed.Testbed(hosts=WORKERS + REDUCERS, rate=RATE, loss=loss, goodput_seconds=0) as bed:
        job = Job(bed, folder)
        job.go()
        time.sleep(FAULT_DELAY_S)
        if fault is not None:
            fault(job)
        yield job


def _finished_exactly(job, reference=None):
    """Every worker ends training well, with the parameters identical on every rank (and equal
    to the reference hash if given); their reports."""
    job.wait(range(WORKERS))
    reports = [job.report(rank) for rank in range(WORKERS)]
    for report in reports:
        assert report.get("ok"), f"{report}\n{job.logs()}"
        assert report["algorithm"] == "reduction_server", report
        assert report["steps"] == STEPS, report
        assert len(set(report["hashes"])) == 1 and report["hashes"][report["rank"]] == report["sha"], report
    if reference is not None:
        assert reports[0]["sha"] == reference, ("the parameters differ from the run without faults", reports[0])
    return reports


def _culprits(text):
    """The ranks that text names, except as relays of a failure ("rank 0 (ADDRESS) aborted: ...")
    or as the rank that asked a waiting one why ("asked by rank 2 (ADDRESS), which timed out ...")."""
    return {int(r) for r in re.findall(r"(?<!asked by )\brank (\d+)\b(?! \(\S+\) aborted)", text)}


def _failed_naming(job, victim, survivors, limit):
    """Every survivor fails within `limit` s of go with a CollectiveError that names rank `victim`."""
    ended = job.wait(survivors, limit=limit + 30)
    for rank in survivors:
        report = job.report(rank)
        assert not report.get("ok"), f"worker {rank} finished although rank {victim} failed: {report}"
        message = report["message"]
        # DDP runs the all-reduces in its comm hook: torch re-raises their error as a RuntimeError
        # that quotes it ("... when running the callback: CollectiveError: ...").
        assert report["is_collective_error"] or re.search(r"\b(CollectiveError|TimeoutError): ", message), message
        assert re.search(rf"\brank {victim}\b", message), f"worker {rank} does not name rank {victim}: {message}"
        named = _culprits(message) - {rank}
        assert named == {victim}, f"worker {rank} names ranks {named}, not just rank {victim}: {message}"
        assert ended[rank] < limit, f"worker {rank} failed {ended[rank]:.1f} s after go (limit {limit:g} s)"
    return ended


def _reducer_dropped(job, index, reports):
    """Each worker stopped using reducer `index` (its stats) and logged its drop, naming it."""
    address = job.host_of_reducer(index).address
    named = re.compile(rf"reducer \d+ \({re.escape(address)}:\d+\) (failed|sent nothing)")
    for report in reports:
        alive = {s["name"]: s["alive"] for s in report["reducers"]}
        assert [a for n, a in alive.items() if address in n] == [False], report["reducers"]
        assert [a for n, a in alive.items() if address not in n] == [True], report["reducers"]
        err = job.stderr(report["rank"])
        assert named.search(err), f"worker {report['rank']} did not log the drop of {address}:\n{err[-3000:]}"


def _selected(name, *marks):
    return pytest.param(name, marks=[*marks, *(() if FULL or name in CI_SCENARIOS else [pytest.mark.skip(
        reason="a long chaos scenario: runs with COLLECTIVES_TEST_FULL=1")])])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The parameters' hash after training without any fault (computed once)."""
    with chaos(tmp_path_factory.mktemp("reference")) as job:
        (report, *_) = _finished_exactly(job)
    return report["sha"]


@pytest.mark.timeout(240)
def test_baseline_training_is_identical_on_every_rank(reference):
    assert re.fullmatch(r"[0-9a-f]{64}", reference)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", [
    *(_selected(n) for n in ("loss", "worker-link-healed", "reducer-link-cut", "reducer-killed", "reducer-stopped"))])
def test_training_survives_and_stays_exact(tmp_path, reference, scenario):
    victim_reducer = 1
    cut_s = CUT_S if scenario == "worker-link-healed" else None

    def fault(job):
        if cut_s is not None:
            host = job.host_of_worker(VICTIM_RANK)
            job.cut(host)
            time.sleep(cut_s)
            job.heal(host)
        elif scenario == "reducer-link-cut":
            job.cut(job.host_of_reducer(victim_reducer))
        elif scenario == "reducer-killed":
            job.reducers[victim_reducer].proc.send_signal(signal.SIGKILL)
        elif scenario == "reducer-stopped":
            job.reducers[victim_reducer].proc.send_signal(signal.SIGSTOP)

    with chaos(tmp_path, None if scenario == "loss" else fault, loss="1%" if scenario == "loss" else None) as job:
        reports = _finished_exactly(job, reference)
        if scenario == "loss":
            assert sum(job.bed.dropped_packets().values()) > 0
        if cut_s is not None:
            # The cut stalled training (every all-reduce needs that worker), and no reducer was dropped.
            assert max(r["longest_step_s"] for r in reports) >= cut_s * 0.8, reports
            assert all(s["alive"] for r in reports for s in r["reducers"]), [r["reducers"] for r in reports]
        if scenario.startswith("reducer-"):
            _reducer_dropped(job, victim_reducer, reports)
            survivor = job.reducers[1 - victim_reducer]
            assert compare.wait_reducers([survivor], 30) == [], "the surviving reducer did not exit after the job"
            assert survivor.proc.returncode == 0, job.reducer_log(1 - victim_reducer)[-3000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", [_selected("worker-killed"), _selected("worker-stopped"),
                                      _selected("store-host-killed")])
def test_a_failed_worker_is_named_by_every_other_within_the_timeout(tmp_path, scenario):
    # Rank 0 serves the job's stores (torch's and the reducers' rendezvous): its death must be
    # named like any other's, with no store left to tell anyone.
    victim = 0 if scenario == "store-host-killed" else VICTIM_RANK

    def fault(job):
        job.workers[victim].send_signal(signal.SIGSTOP if scenario == "worker-stopped" else signal.SIGKILL)

    survivors = [r for r in range(WORKERS) if r != victim]
    with chaos(tmp_path, fault) as job:
        _failed_naming(job, victim, survivors, TIMEOUT_S + SLACK_S)
        if scenario == "worker-stopped":
            # The reducers relay the failure naming the stopped worker, and exit; nobody is called dead.
            assert compare.wait_reducers(job.reducers, SLACK_S) == [], job.logs()
            for index in range(REDUCERS):
                log = job.reducer_log(index)
                errors = "\n".join(line for line in log.splitlines() if " ERROR " in line)
                assert errors and _culprits(errors) == {VICTIM_RANK} and "died" not in errors, log[-3000:]

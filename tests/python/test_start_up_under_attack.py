"""A job's start-up while strangers who can reach its ports (addresses read from the
store) attack it: idle connections held to every worker's port, a crowd at the store, a
relay's address written over a reducer's. Real processes on 127.0.0.1."""

import json
import select
import socket
import threading
import time

import pytest

from collectives._store import SIGNATURE_BYTES, StoreClient

pytestmark = pytest.mark.timeout(120)

# One checked all-reduce; prints a JSON report, or the error and exits 3.
WORKER_SCRIPT = r'''
import json, os, sys, time
import numpy as np
import collectives as cc

time.sleep(float(os.environ.get("TEST_DELAY", "0")))
try:
    comm = cc.init()
except (cc.CollectiveError, ValueError) as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    sys.exit(3)
with comm:
    x = np.full(1000, comm.rank + 1, np.float32)
    comm.allreduce(x)
    print(json.dumps({"rank": comm.rank, "ok": bool((x == comm.size * (comm.size + 1) / 2).all())}))
'''


class _Siege(threading.Thread):
    """Holds ``count`` idle connections to each address it is given, opening a new one for
    each that the other end closes, until stopped."""

    def __init__(self, count):
        super().__init__(daemon=True)
        self.count = count
        self.addresses = []
        self.held = {}  # socket -> address
        self.reopened = 0
        self.stopped = threading.Event()

    def attack(self, address):
        self.addresses.append(address)

    def run(self):
        while not self.stopped.is_set():
            for address in list(self.addresses):
                while sum(1 for a in self.held.values() if a == address) < self.count:
                    try:
                        self.held[socket.create_connection(address, timeout=2)] = address
                    except OSError:
                        break  # its owner has exited
            readable, _, _ = select.select(list(self.held), [], [], 0.1) if self.held else ([], [], [])
            for sock in readable:  # closed by the other end: the stranger comes back
                sock.close()
                del self.held[sock]
                self.reopened += 1
            if not self.held:
                time.sleep(0.1)
        for sock in self.held:
            sock.close()

    def stop(self):
        self.stopped.set()
        self.join(timeout=10)


def _address(store, key):
    record = json.loads(store.get(key, timeout=30)[:-SIGNATURE_BYTES])  # a stranger reads, unchecked
    return record["host"], record["port"]


def _check_workers(results, n):
    assert all(r.returncode == 0 for r in results[:n]), "\n".join(f"rank {rank}: {r.stdout}" for rank, r in enumerate(results))
    for rank, result in enumerate(results[:n]):
        assert result.returncode == 0, f"rank {rank} (rc {result.returncode}):\n{result.stdout}\n{result.stderr[-3000:]}"
        assert result.report()["ok"], result.report()


def test_idle_strangers_at_every_workers_port_do_not_stop_the_start(run_ranks, reserve_port):
    """300 idle connections held to each worker's port: every worker used to fail after
    ~9 s ("256 handshakes are under way")."""
    port = reserve_port()
    siege = _Siege(300)

    def strangers(procs):
        store = StoreClient("127.0.0.1", port, timeout=30)
        try:
            for rank in range(3):
                siege.attack(_address(store, f"collectives/addr/{rank}"))
                if rank == 0:
                    siege.start()
        finally:
            store.close()

    start = time.monotonic()
    try:
        results = run_ranks(WORKER_SCRIPT, 3, timeout=90, during=strangers,
                            env={"COLLECTIVES_TIMEOUT": "60", "COLLECTIVES_RENDEZVOUS": f"127.0.0.1:{port}"},
                            rank_env=lambda rank: {"TEST_DELAY": "4"} if rank == 2 else None)
    finally:
        siege.stop()
    elapsed = time.monotonic() - start
    _check_workers(results, 3)
    assert siege.reopened >= 300, siege.reopened  # the strangers were there, and were closed
    assert "dropped an incoming connection" in results[0].stderr
    assert elapsed < 30, elapsed
    print(f"started in {elapsed:.1f} s (rank 2 came 4 s late) with 300 idle strangers at each worker's port")


def test_a_crowd_at_the_store_does_not_stop_the_start(run_ranks, reserve_port):
    """4,096 idle connections to the store before workers 1 and 2 come: they used to fail
    with 'worker 0 ... has probably exited' while it was alive."""
    port = reserve_port()
    crowd = []

    def strangers(procs):
        deadline = time.monotonic() + 20
        while len(crowd) < 4096 and time.monotonic() < deadline:
            try:
                crowd.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:  # worker 0 is not serving yet
                time.sleep(0.05)

    try:
        results = run_ranks(WORKER_SCRIPT, 3, timeout=100, during=strangers,
                            env={"COLLECTIVES_TIMEOUT": "60", "COLLECTIVES_RENDEZVOUS": f"127.0.0.1:{port}"},
                            rank_env=lambda rank: {"TEST_DELAY": "6"} if rank else None)
    finally:
        for sock in crowd:
            sock.close()
    assert len(crowd) == 4096
    _check_workers(results, 3)


def test_a_relay_written_over_a_reducers_address_is_refused(run_ranks, reserve_port):
    """A stranger publishes a reducer's record pointing at its own relay: the workers
    refuse the record, naming its key, and never connect to the relay."""
    port = reserve_port()
    relay = socket.create_server(("127.0.0.1", 0))
    relay.setblocking(False)

    def stranger(procs):
        store = StoreClient("127.0.0.1", port, timeout=30)
        try:
            store.get("collectives/job", timeout=30)
            host, relay_port = relay.getsockname()
            store.set("collectives/reducer/0", json.dumps({"host": host, "port": relay_port, "hostname": "relay",
                                                          "protocol": 0}).encode())
        finally:
            store.close()

    try:
        results = run_ranks(WORKER_SCRIPT, 2, timeout=60, during=stranger,
                            env={"COLLECTIVES_TIMEOUT": "20", "COLLECTIVES_NUM_REDUCERS": "1",
                                 "COLLECTIVES_RENDEZVOUS": f"127.0.0.1:{port}"})
        with pytest.raises(BlockingIOError):
            relay.accept()
    finally:
        relay.close()
    for result in results:
        report = result.report()
        assert report["error"] == "AuthenticationError", report
        assert "refused the record 'collectives/reducer/0'" in report["message"], report

"""The harness's ports: reserved for a job, not probed, so that neither another process nor
connection churn (thousands of loopback sockets in TIME-WAIT) can take or block them.

Under churn: single ports and consecutive pairs are still reserved, the job's listeners (the
store, data listeners in a port range) bind them, and a plain bind is refused meanwhile.
Under each launcher of run_ranks: the ranks find their ports reserved (or torch's store
served) while they run, and the reservation ends with the job.
"""

import errno
import socket
import time
from pathlib import Path
from typing import Optional

import pytest

from collectives import _netif
from collectives._store import StoreClient, StoreServer

CHURN_CONNECTIONS = 3000
_TIME_WAIT = "06"  # the state column of /proc/net/tcp


def _churn(connections: int) -> set:
    """Short loopback connections that the client closes first, as busy test runs make: each
    leaves its source port, one of the kernel's ephemeral ports, in TIME-WAIT for a minute.
    Returns those ports."""
    sources = set()
    with socket.create_server(("127.0.0.1", 0), backlog=connections) as server:
        server.setblocking(False)
        for _ in range(connections):
            with socket.create_connection(server.getsockname()) as client:
                sources.add(client.getsockname()[1])
            try:
                server.accept()[0].close()
            except BlockingIOError:
                pass
    return sources


def _ports_in_time_wait() -> set:
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == _TIME_WAIT:
            ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def _plain_bind_error(port: int) -> Optional[int]:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as e:
            return e.errno
    return None


def _serves(port: int) -> bool:
    """A job's store binds ``port`` and answers there."""
    server = StoreServer("127.0.0.1", port).start()
    try:
        client = StoreClient("127.0.0.1", port, timeout=5)
        client.set("k", b"v")
        answered = client.get("k") == b"v"
        client.close()
        return answered
    finally:
        server.close()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts TIME-WAIT sockets in Linux's /proc/net/tcp")
def test_reservations_hold_under_time_wait_churn(reserve_port):
    start = time.monotonic()
    waiting = _churn(CHURN_CONNECTIONS) & _ports_in_time_wait()
    assert len(waiting) >= CHURN_CONNECTIONS // 2, f"only {len(waiting)} ports in TIME-WAIT: no churn to test under"
    with socket.socket() as neighbour:  # what a probe for a port's free neighbour now meets
        neighbour.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError) as blocked:
            neighbour.bind(("127.0.0.1", min(waiting)))  # a client's TIME-WAIT keeps out even SO_REUSEADDR
        assert blocked.value.errno == errno.EADDRINUSE

    for _ in range(10):
        single, pair = reserve_port(), reserve_port(consecutive=2)  # as for a store, and for MASTER_PORT(+1)
        for port in (single, pair, pair + 1):
            assert _plain_bind_error(port) == errno.EADDRINUSE, f"port {port} is not reserved"
        assert _serves(single) and _serves(pair + 1)
        first, second = _netif.listen("127.0.0.1", (pair, pair + 1)), _netif.listen("127.0.0.1", (pair, pair + 1))
        try:
            assert {first.getsockname()[1], second.getsockname()[1]} == {pair, pair + 1}
        finally:
            first.close()
            second.close()
    assert time.monotonic() - start < 30


# Each rank reports what it finds at the job's ports while the job runs.
PORTS_SCRIPT = r'''
import json, os, socket

def plain_bind(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return "bound"
        except OSError:
            return "refused"

def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return "listening"
    except OSError:
        return "nobody"

if "COLLECTIVES_RENDEZVOUS" in os.environ:
    port = int(os.environ["COLLECTIVES_RENDEZVOUS"].rpartition(":")[2])
    ports = {"store": port}
else:
    port = int(os.environ["MASTER_PORT"])
    ports = {"torch": port, "store": port + 1}
print(json.dumps({name: [p, plain_bind(p), listening(p)] for name, p in ports.items()}))
'''


def test_a_collectives_job_finds_its_store_port_reserved_until_it_ends(run_ranks):
    report = run_ranks(PORTS_SCRIPT, 1)[0].report()
    port, bind, listener = report["store"]
    assert (bind, listener) == ("refused", "nobody"), report  # reserved; worker 0 would serve it
    assert _plain_bind_error(port) is None, "still reserved after the job"


def test_a_torchrun_job_finds_torchs_store_served_and_the_next_port_reserved(run_ranks):
    pytest.importorskip("torch")
    report = run_ranks(PORTS_SCRIPT, 1, launcher="torchrun")[0].report()
    torch_port, store_port = report["torch"][0], report["store"][0]
    assert report["torch"][1:] == ["refused", "listening"], report  # served by the harness, as by torchrun's agent
    assert report["store"][1:] == ["refused", "nobody"], report
    assert store_port == torch_port + 1
    assert _plain_bind_error(store_port) is None, "still reserved after the job"
    with pytest.raises(ConnectionRefusedError):  # torch's store stopped with the job
        socket.create_connection(("127.0.0.1", torch_port), timeout=5).close()

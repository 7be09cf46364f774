"""Configuration, interface selection and the bootstrap of real processes on 127.0.0.1."""

import dataclasses
import json
import logging
import socket
import threading
import time

import pytest

from collectives import _netif
from collectives._bootstrap import bootstrap
from collectives._config import Config
from collectives._handshake import PROTOCOL_VERSION
from collectives._launch import read_secret
from collectives._store import SIGNATURE_BYTES, StoreClient
from collectives.errors import CollectiveError

pytestmark = pytest.mark.timeout(120)

# Bootstraps, then proves the mesh: on every connection each side sends (its rank,
# connection index) and checks that the other sent (the peer's rank, the same index).
MESH_SCRIPT = r'''
import json, os, socket, struct, sys, time
import collectives._handshake as handshake
from collectives._bootstrap import bootstrap
from collectives.errors import CollectiveError

time.sleep(float(os.environ.get("TEST_DELAY", "0")))
handshake.PROTOCOL_VERSION += int(os.environ.get("TEST_PROTOCOL_BUMP", "0"))  # as another release would
try:
    b = bootstrap()
except (CollectiveError, ValueError) as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    sys.exit(3)
socks = {}
for peer, links in enumerate(b.peer_links):
    for index, link in enumerate(links):
        assert os.get_blocking(link.fd), "sockets are handed over in blocking mode"
        s = socket.socket(fileno=link.fd)
        s.sendall(struct.pack("!II", b.rank, index))
        socks[(peer, index)] = s
for (peer, index), s in socks.items():
    data = b""
    while len(data) < 8:
        chunk = s.recv(8 - len(data))
        assert chunk, f"rank {peer} closed connection {index}"
        data += chunk
    assert struct.unpack("!II", data) == (peer, index), (peer, index, data)
print(json.dumps({"rank": b.rank, "size": b.size, "fds": [len(f) for f in b.peer_links],
                  "names": b.peer_names, "mpi": b.mpi_comm is not None}))
b.close()
'''


def _reports(results):
    return [r.report() for r in results]


def _check_mesh(results, n, cpp=1):
    for r in results:
        assert r.returncode == 0, f"rc {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    reports = sorted(_reports(results), key=lambda rep: rep["rank"])
    assert [rep["rank"] for rep in reports] == list(range(n))
    for rep in reports:
        assert rep["size"] == n
        assert rep["fds"] == [0 if p == rep["rank"] else cpp for p in range(n)]
        assert all(name.startswith(f"rank {p} (") for p, name in enumerate(rep["names"]))
    return reports


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_mesh(run_ranks, n):
    _check_mesh(run_ranks(MESH_SCRIPT, n, env={"COLLECTIVES_TIMEOUT": "30"}, timeout=60), n)


def test_mesh_with_several_connections_per_peer(run_ranks):
    results = run_ranks(MESH_SCRIPT, 3, env={"COLLECTIVES_TIMEOUT": "30", "COLLECTIVES_CONNECTIONS_PER_PEER": "3"},
                        timeout=60)
    _check_mesh(results, 3, cpp=3)


def test_torchrun_variables(run_ranks):
    _check_mesh(run_ranks(MESH_SCRIPT, 3, launcher="torchrun", env={"COLLECTIVES_TIMEOUT": "30"}, timeout=60), 3)


@pytest.mark.mpi
def test_mpirun(run_mpirun):
    result = run_mpirun(MESH_SCRIPT, 3, env={"COLLECTIVES_TIMEOUT": "30"}, timeout=90)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    reports = sorted(result.reports(),
                     key=lambda rep: rep["rank"])
    assert [rep["rank"] for rep in reports] == [0, 1, 2]
    assert all(rep["mpi"] and rep["size"] == 3 and rep["fds"].count(1) == 2 for rep in reports)


def test_missing_rank_fails_every_present_rank(run_ranks):
    start = time.monotonic()
    results = run_ranks(MESH_SCRIPT, 4, ranks=[0, 1, 3], env={"COLLECTIVES_TIMEOUT": "3"}, timeout=40)
    assert time.monotonic() - start < 25
    for r, report in zip(results, _reports(results)):
        assert r.returncode == 3, r.stderr
        assert report["error"] == "TimeoutError"
        assert "rank 2 of 4 did not publish its address within 3 s" in report["message"]


def test_missing_rank_0_names_the_store(run_ranks):
    results = run_ranks(MESH_SCRIPT, 3, ranks=[1, 2], env={"COLLECTIVES_TIMEOUT": "2"}, timeout=40)
    for r, report in zip(results, _reports(results)):
        assert r.returncode == 3, r.stderr
        assert report["error"] == "TimeoutError"
        assert "could not reach the collectives store" in report["message"]
        assert "worker 0" in report["message"]


def test_wrong_token_fails_every_rank_soon(run_ranks):
    bad_token = "not-the-job-token-" + "x" * 20
    start = time.monotonic()
    results = run_ranks(MESH_SCRIPT, 3, env={"COLLECTIVES_TIMEOUT": "60"},
                        rank_env=lambda rank: {"COLLECTIVES_TOKEN": bad_token} if rank == 2 else None, timeout=40)
    assert time.monotonic() - start < 20  # far less than COLLECTIVES_TIMEOUT: the failure was passed on
    for r, report in zip(results, _reports(results)):
        assert r.returncode == 3, r.stderr
        assert report["error"] == "AuthenticationError", report
        assert bad_token not in r.stdout + r.stderr


def test_settings_that_differ_fail_every_rank(run_ranks):
    results = run_ranks(MESH_SCRIPT, 2, env={"COLLECTIVES_TIMEOUT": "30"},
                        rank_env=lambda rank: {"COLLECTIVES_ALGORITHM": "ring"} if rank == 1 else None, timeout=40)
    for r, report in zip(results, _reports(results)):
        assert r.returncode == 3, r.stderr
        assert report["error"] == "CollectiveError"
        assert "rank 1 has algorithm='ring' where rank 0 has 'auto'" in report["message"]


def test_sizes_that_differ_fail_every_rank(run_ranks):
    results = run_ranks(MESH_SCRIPT, 2, env={"COLLECTIVES_TIMEOUT": "30"},
                        rank_env=lambda rank: {"COLLECTIVES_SIZE": "3"} if rank == 1 else None, timeout=40)
    for r, report in zip(results, _reports(results)):
        assert r.returncode == 3, r.stderr
        assert "rank 1 has size=3 where rank 0 has 2" in report["message"]


def test_other_protocol_version_fails_every_rank(run_ranks):
    results = run_ranks(MESH_SCRIPT, 3, env={"COLLECTIVES_TIMEOUT": "30"},
                        rank_env=lambda rank: {"TEST_PROTOCOL_BUMP": "1"} if rank == 2 else None, timeout=40)
    for rank, (r, report) in enumerate(zip(results, _reports(results))):
        assert r.returncode == 3, r.stderr
        assert report["error"] == "ProtocolVersionError"
        assert "install the same collectives version on every host" in report["message"]
        version = PROTOCOL_VERSION
        mine, theirs = (version + 1, version) if rank == 2 else (version, version + 1)
        assert f"speaks collectives protocol {theirs}, this process speaks {mine}" in report["message"]


def test_strangers_at_a_listener_do_not_disturb_the_mesh(run_ranks, reserve_port):
    """A silent connection and a garbage one reach worker 0's data port while it waits."""
    port = reserve_port()
    held = []

    def strangers():
        store = StoreClient("127.0.0.1", port, timeout=20)
        record = json.loads(store.get("collectives/addr/0", timeout=20)[:-SIGNATURE_BYTES])  # read, not checked
        store.close()
        silent = socket.create_connection((record["host"], record["port"]))
        held.append(silent)
        garbage = socket.create_connection((record["host"], record["port"]))
        garbage.sendall(b"\x16\x03\x01 not a collectives hello at all")
        garbage.close()

    thread = threading.Thread(target=strangers, daemon=True)
    thread.start()
    start = time.monotonic()
    results = run_ranks(MESH_SCRIPT, 3,
                        env={"COLLECTIVES_RENDEZVOUS": f"127.0.0.1:{port}", "COLLECTIVES_TIMEOUT": "30"},
                        rank_env=lambda rank: {"TEST_DELAY": "1.5"} if rank else None, timeout=60)
    thread.join(timeout=5)
    assert held, "the strangers did not get to connect"
    _check_mesh(results, 3)
    assert time.monotonic() - start < 15  # nobody waited for the silent stranger's handshake deadline
    assert "dropped an incoming connection" in results[0].stderr
    held[0].close()


# --- settings that are wrong before anything is sent -------------------------------------

def test_no_launcher_is_a_job_of_one(caplog):
    with caplog.at_level(logging.INFO, logger="collectives"):
        b = bootstrap(environ={})
    assert (b.rank, b.size, b.peer_links, b.store, b.mpi_comm) == (0, 1, [[]], None, None)
    assert "job of one process" in caplog.text
    assert "secret" not in repr(b) and repr(b.secret) not in repr(b)
    b.close()


def test_missing_token_says_what_to_set():
    with pytest.raises(ValueError) as info:
        bootstrap(rank=1, size=2, rendezvous="127.0.0.1:1", environ={})
    assert "COLLECTIVES_TOKEN" in str(info.value) and "COLLECTIVES_TOKEN_FILE" in str(info.value)


def test_missing_rendezvous_says_what_to_set():
    with pytest.raises(ValueError, match="COLLECTIVES_RENDEZVOUS=HOST:PORT"):
        bootstrap(environ={"COLLECTIVES_RANK": "0", "COLLECTIVES_SIZE": "2", "COLLECTIVES_TOKEN": "t"})


@pytest.mark.parametrize("environ, message", [
    ({"COLLECTIVES_RANK": "4", "COLLECTIVES_SIZE": "4"}, "COLLECTIVES_RANK=4 is out of range for COLLECTIVES_SIZE=4"),
    ({"COLLECTIVES_RANK": "-1", "COLLECTIVES_SIZE": "4"}, "out of range"),
    ({"COLLECTIVES_RANK": "0", "COLLECTIVES_SIZE": "0"}, "COLLECTIVES_SIZE=0 must be at least 1"),
    ({"COLLECTIVES_RANK": "one", "COLLECTIVES_SIZE": "4"}, "COLLECTIVES_RANK='one' is not an integer"),
    ({"COLLECTIVES_RANK": "1"}, "set COLLECTIVES_RANK and COLLECTIVES_SIZE"),
    ({"COLLECTIVES_RANK": "1", "COLLECTIVES_SIZE": "2", "COLLECTIVES_RENDEZVOUS": "nohostport",
      "COLLECTIVES_TOKEN": "t"}, "COLLECTIVES_RENDEZVOUS='nohostport' is not HOST:PORT"),
    ({"RANK": "1", "WORLD_SIZE": "2", "COLLECTIVES_TOKEN": "t"}, "MASTER_ADDR or MASTER_PORT"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "65535"}, "MASTER_PORT+1"),
    ({"COLLECTIVES_TIMEOUT": "soon"}, "COLLECTIVES_TIMEOUT='soon'"),
])
def test_bad_launch_settings(environ, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        bootstrap(environ=environ)


def test_arguments_win_over_the_environment():
    with pytest.raises(ValueError, match="rank=5 is out of range for COLLECTIVES_SIZE=2"):
        bootstrap(rank=5, environ={"COLLECTIVES_RANK": "0", "COLLECTIVES_SIZE": "2"})


def test_secret_sources(tmp_path):
    path = tmp_path / "token"
    path.write_bytes(b"  from-a-file\n")
    assert read_secret({"COLLECTIVES_TOKEN_FILE": str(path)}) == b"from-a-file"
    assert read_secret({"COLLECTIVES_TOKEN": "raw"}) == b"raw"
    assert read_secret({}) is None
    with pytest.raises(ValueError, match="only one"):
        read_secret({"COLLECTIVES_TOKEN": "raw", "COLLECTIVES_TOKEN_FILE": str(path)})
    with pytest.raises(ValueError, match="cannot read COLLECTIVES_TOKEN_FILE"):
        read_secret({"COLLECTIVES_TOKEN_FILE": str(tmp_path / "absent")})
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(ValueError, match="is empty"):
        read_secret({"COLLECTIVES_TOKEN_FILE": str(tmp_path / "empty")})


# --- configuration ------------------------------------------------------------------------

def test_config_defaults():
    config = Config.from_env(environ={})
    assert config == Config()
    assert (config.timeout, config.algorithm, config.ring_segment_bytes, config.connections_per_peer) == \
        (300.0, "auto", None, 1)
    assert (config.socket_ifname, config.port_range, config.debug, config.num_reducers) == (None, None, False, 0)
    assert config.handshake_timeout == 30.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timeout = 1.0


def test_config_from_environment():
    config = Config.from_env(environ={
        "COLLECTIVES_TIMEOUT": "12.5", "COLLECTIVES_ALGORITHM": "Reduction_Server",
        "COLLECTIVES_RING_SEGMENT_BYTES": "512K", "COLLECTIVES_CONNECTIONS_PER_PEER": "4",
        "COLLECTIVES_SOCKET_IFNAME": "eth0", "COLLECTIVES_PORT_RANGE": "40000-40100", "COLLECTIVES_DEBUG": "1",
        "COLLECTIVES_NUM_REDUCERS": "2", "COLLECTIVES_HANDSHAKE_TIMEOUT": "5"})
    assert config == Config(12.5, "reduction_server", 512 << 10, 4, "eth0", (40000, 40100), True, 2, 5.0)


@pytest.mark.parametrize("text, count", [("65536", 65536), ("512K", 512 << 10), ("1M", 1 << 20), ("2m", 2 << 20),
                                         ("1MiB", 1 << 20), ("1G", 1 << 30), ("auto", None), ("", None)])
def test_byte_counts(text, count):
    assert Config.from_env(environ={"COLLECTIVES_RING_SEGMENT_BYTES": text}).ring_segment_bytes == count


def test_arguments_win_over_environment_variables():
    config = Config.from_env({"timeout": 7, "algorithm": None}, environ={"COLLECTIVES_TIMEOUT": "99",
                                                                        "COLLECTIVES_ALGORITHM": "ring"})
    assert (config.timeout, config.algorithm) == (7.0, "ring")


@pytest.mark.parametrize("variable, value, message", [
    ("COLLECTIVES_TIMEOUT", "abc", "COLLECTIVES_TIMEOUT='abc' is not a number of seconds"),
    ("COLLECTIVES_TIMEOUT", "-1", "COLLECTIVES_TIMEOUT='-1' must be a positive"),
    ("COLLECTIVES_ALGORITHM", "tree", "auto, ring, recursive_doubling, hierarchical, reduction_server"),
    ("COLLECTIVES_RING_SEGMENT_BYTES", "1.5M", "COLLECTIVES_RING_SEGMENT_BYTES='1.5M' is not a byte count"),
    ("COLLECTIVES_RING_SEGMENT_BYTES", "0", "must be a positive byte count"),
    ("COLLECTIVES_CONNECTIONS_PER_PEER", "0", "COLLECTIVES_CONNECTIONS_PER_PEER='0' must be an integer >= 1"),
    ("COLLECTIVES_NUM_REDUCERS", "-2", "must be an integer >= 0"),
    ("COLLECTIVES_PORT_RANGE", "5000-4000", "COLLECTIVES_PORT_RANGE='5000-4000' must satisfy"),
    ("COLLECTIVES_PORT_RANGE", "40000:40100", "write it as LOW-HIGH"),
    ("COLLECTIVES_DEBUG", "maybe", "COLLECTIVES_DEBUG='maybe' is not a boolean"),
])
def test_bad_environment_values_name_the_variable(variable, value, message):
    with pytest.raises(ValueError, match=message):
        Config.from_env(environ={variable: value})


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="timeout=0"):
        Config.from_env({"timeout": 0}, environ={})
    with pytest.raises(ValueError, match="connections_per_peer=2.5 is not an integer"):
        Config.from_env({"connections_per_peer": 2.5}, environ={})
    with pytest.raises(TypeError, match="unknown setting"):
        Config.from_env({"timout": 3}, environ={})
    with pytest.raises(ValueError, match="algorithm='fast'"):
        Config(algorithm="fast")


def test_must_match_and_as_dict():
    config = Config(algorithm="ring", ring_segment_bytes=1 << 20, connections_per_peer=2)
    assert config.must_match() == (("algorithm", "ring"), ("ring_segment_bytes", 1 << 20),
                                   ("connections_per_peer", 2), ("num_reducers", 0), ("rs_chunk_bytes", None),
                                   ("rs_inflight", None), ("rs_fallback", "error"), ("rs_plan", "auto"),
                                   ("wire_security", "mac"), ("transport", "auto"))
    shown = config.as_dict()
    assert shown["COLLECTIVES_ALGORITHM"] == "ring" and shown["COLLECTIVES_TIMEOUT"] == 300.0
    assert len(shown) == len(dataclasses.fields(Config))


# --- interfaces and ports -----------------------------------------------------------------

def test_interface_by_name():
    assert _netif.interface_address("lo") == "127.0.0.1"
    assert _netif.interface_address("=lo") == "127.0.0.1"
    assert _netif.interface_address("nosuch,l") == "127.0.0.1"  # prefixes, as NCCL_SOCKET_IFNAME


def test_missing_interface_lists_the_available_ones():
    with pytest.raises(ValueError) as info:
        _netif.interface_address("nosuch0")
    assert "'nosuch0'" in str(info.value) and "lo (127.0.0.1)" in str(info.value)


def test_advertised_address():
    assert _netif.advertise_address(None, "127.0.0.1") == "127.0.0.1"
    assert _netif.advertise_address(None, "localhost") == "127.0.0.1"
    assert _netif.advertise_address("lo", "198.18.0.1") == "127.0.0.1"  # the interface wins
    assert _netif.advertise_address(None, None)  # some address, whatever this host's network


def test_listen_in_a_port_range(reserve_port):
    lo = reserve_port(consecutive=2)
    first = _netif.listen("127.0.0.1", (lo, lo + 1))
    second = _netif.listen("127.0.0.1", (lo, lo + 1))
    try:
        assert {first.getsockname()[1], second.getsockname()[1]} == {lo, lo + 1}
        with pytest.raises(CollectiveError, match=f"COLLECTIVES_PORT_RANGE={lo}-{lo + 1} is in use"):
            _netif.listen("127.0.0.1", (lo, lo + 1))
    finally:
        first.close()
        second.close()


def test_data_sockets_are_tuned():
    with socket.socket() as sock:
        default_buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        _netif.tune_socket(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # left to the kernel's autotuning (a fixed size would switch it off)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == default_buffer


BAD_INTERFACE_ON_ONE_RANK = """
import json, os
if os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK")) == "1":
    os.environ["COLLECTIVES_SOCKET_IFNAME"] = "=no-such-interface"
import collectives as cc
try:
    cc.init().close()
    print(json.dumps({"error": None}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


@pytest.mark.mpi
def test_mpirun_failure_on_one_rank_reaches_every_rank(run_mpirun):
    """A local failure before the address exchange must not leave the others blocked in MPI."""
    result = run_mpirun(BAD_INTERFACE_ON_ONE_RANK, 3, env={"COLLECTIVES_TIMEOUT": "30"}, timeout=60)
    reports = result.reports()
    assert len(reports) == 3, result.stdout + result.stderr
    assert all(r["error"] for r in reports), reports
    assert all("no-such-interface" in r["message"] for r in reports), reports

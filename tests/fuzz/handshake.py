"""Fuzz target (atheris): the connection handshake (collectives._handshake), fed a stranger's bytes.

An input's first byte picks the side under test: even, the server's (server_handshake: a
connection it accepted sends a hello, then a proof); odd, the client's (client_handshake: the
server it connected to answers with its hello, MAC and verdict). The rest is what the stranger
sends over a socketpair before it ends its stream. The side under test must raise
CollectiveError or a subclass of it (AuthenticationError, ProtocolVersionError) before its
deadline: any other exception is a crash, and so is TimeoutError, since waiting for more after
the stranger's stream ended would be a hang. The stranger does not hold the job's secret, so
its MACs never verify: what follows a verified MAC is left to tests/python/test_handshake.py.

Run by scripts/fuzz; by hand (it imports the installed package, as the tests do):
    .venv/bin/python tests/fuzz/handshake.py -max_total_time=60 tests/fuzz/corpus/handshake
"""

import socket
import sys
import time

import atheris

with atheris.instrument_imports(include=["collectives"]):
    from collectives._handshake import JOB_ID_BYTES, client_handshake, server_handshake
    from collectives.errors import CollectiveError, TimeoutError

SECRET = b"the job's secret, which the stranger does not know"
JOB = bytes(JOB_ID_BYTES)  # the default job id: a stranger can match it
DEADLINE_S = 2.0


def handshake(side: int, sock: socket.socket, deadline: float) -> None:
    if side % 2 == 0:
        server_handshake(sock, SECRET, 0, deadline, job_id=JOB)
    else:
        client_handshake(sock, SECRET, 0, 1, 0, deadline, job_id=JOB)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mine, stranger = socket.socketpair()
    with mine, stranger:
        stranger.sendall(data[1:])  # inputs are far smaller than the pair's buffers
        stranger.shutdown(socket.SHUT_WR)
        try:
            handshake(data[0], mine, time.monotonic() + DEADLINE_S)
        except TimeoutError as e:
            raise AssertionError(f"waited for bytes after the stranger's stream had ended: {e}") from e
        except CollectiveError:
            return  # refused the stranger: the expected end
        raise AssertionError("a stranger without the job's secret passed the handshake")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

"""Fuzz target (atheris): the store's request parsing (collectives._store.StoreServer), fed a
stranger's bytes on one connection.

Per input: a StoreServer on 127.0.0.1; a stranger connects, sends the input and ends its
stream; then a well-formed client must still be served (a set, then a get of it). The server
then closes, which wakes requests still blocked in it (a GET with a long timeout), and every
connection's thread must end within a bound with no exception escaping it: a connection that
breaks the protocol is closed, anything else is a crash (the thread dies with a traceback
and its client waits for a reply that never comes).

Run by scripts/fuzz; by hand (it imports the installed package, as the tests do):
    .venv/bin/python tests/fuzz/store_protocol.py -max_total_time=60 tests/fuzz/corpus/store_protocol
"""

import logging
import secrets
import socket
import sys
import threading
import traceback

import atheris

with atheris.instrument_imports(include=["collectives"]):
    from collectives._store import StoreClient, StoreServer
    from collectives.errors import CollectiveError

HOST = "127.0.0.1"
BOUND_S = 5.0
# What escaped the server's threads during the current input.
escaped = []
threading.excepthook = escaped.append
# One warning per malformed request would be most of the run's output.
logging.getLogger("collectives").setLevel(logging.CRITICAL)
# Every input on one port (the listener reuses its address): a new port per input would leave
# ports in TIME_WAIT faster than a long run can afford.
port = 0


def start_server() -> StoreServer:
    global port
    try:
        server = StoreServer(HOST, port)
    except CollectiveError:  # another process took the port meanwhile
        server = StoreServer(HOST, 0)
    port = server.port
    return server.start()


def test_one_input(data: bytes) -> None:
    server = start_server()
    try:
        with socket.create_connection((HOST, port), timeout=BOUND_S) as stranger:
            try:
                stranger.sendall(data)  # inputs are far smaller than the connection's buffers
                stranger.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server closed the connection already, on a malformed request
            client = StoreClient(HOST, port, timeout=BOUND_S)
            key = "well-formed-" + secrets.token_hex(8)  # beyond the stranger's reach
            client.set(key, b"value")
            assert client.get(key, timeout=BOUND_S) == b"value", "the well-formed client read another value"
            client.close()
    finally:
        server.close()
    for thread in threading.enumerate():
        if thread.name.startswith("collectives-store"):
            thread.join(BOUND_S)
            assert not thread.is_alive(), f"{thread.name} still runs {BOUND_S:g} s after the store closed"
    if escaped:
        hook_args = escaped.pop()
        escaped.clear()
        raise AssertionError(f"an exception escaped {hook_args.thread.name}:\n" +
                             "".join(traceback.format_exception(hook_args.exc_value)))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

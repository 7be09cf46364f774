"""What the tests that play a stranger at a job's ports share."""

import socket
import time


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the other end closed ``sock`` within ``seconds`` (whatever it said before)."""
    deadline = time.monotonic() + seconds
    try:
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            if sock.recv(1 << 16) == b"":
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False

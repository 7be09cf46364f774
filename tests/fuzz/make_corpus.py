"""Writes the seed corpora of the Python fuzz targets (handshake.py, store_protocol.py) into
DIR/<target>/: a few well-formed exchanges each, laid out as the wire formats in the
docstrings of collectives/_handshake.py and collectives/_store.py say. The files are
committed; run it again when a format changes:
    .venv/bin/python tests/fuzz/make_corpus.py tests/fuzz/corpus
"""

import os
import struct
import sys

from collectives._handshake import JOB_ID_BYTES, PROTOCOL_VERSION, ROLE_WORKER

PREFIX = struct.Struct("!4sH")
HELLO = struct.Struct("!BIH16s32sB")  # role, rank, conn, job id, challenge, wire security
SERVER_HELLO = struct.Struct("!BI32s")
SERVER, CLIENT = b"\0", b"\1"  # handshake.py's first byte: the side under test
OK, REFUSED_VERSION, REFUSED = 0, 1, 2
MAC = 1  # COLLECTIVES_WIRE_SECURITY=mac, the targets' own
SET, GET, ADD, WAIT = 1, 2, 3, 4


def prefix(version: int = PROTOCOL_VERSION) -> bytes:
    return PREFIX.pack(b"COLL", version)


def text(message: bytes) -> bytes:
    return struct.pack("!H", len(message)) + message


def hello(security: int = MAC) -> bytes:
    return prefix() + HELLO.pack(ROLE_WORKER, 1, 0, bytes(JOB_ID_BYTES), b"c" * 32, security)


def request(code: int, *fields: bytes) -> bytes:
    return struct.pack("!BH", code, len(fields)) + b"".join(struct.pack("!I", len(f)) + f for f in fields)


def millis(ms: int) -> bytes:
    return struct.pack("!Q", ms)


def corpora():
    server_answer = prefix() + bytes([OK]) + SERVER_HELLO.pack(ROLE_WORKER, 1, b"s" * 32) + b"m" * 32
    yield "handshake", "server-hello-then-proof", SERVER + hello() + bytes([OK]) + b"p" * 32
    yield "handshake", "server-hello-of-another-security", SERVER + hello(security=0)
    yield "handshake", "server-hello-of-another-version", SERVER + prefix(PROTOCOL_VERSION + 1) + hello()[PREFIX.size:]
    yield "handshake", "client-answer-then-verdict", CLIENT + server_answer + bytes([OK]) + text(b"")
    yield "handshake", "client-refused", CLIENT + prefix() + bytes([REFUSED]) + text(b"another job")
    yield "handshake", "client-refused-version", CLIENT + prefix(PROTOCOL_VERSION + 1) + bytes([REFUSED_VERSION]) + text(b"")
    yield "store_protocol", "set-get-add-wait", (request(SET, b"key", b"value") + request(GET, b"key", millis(0)) +
                                                 request(ADD, b"count", struct.pack("!q", 5)) +
                                                 request(WAIT, millis(0), b"key", b"count"))
    yield "store_protocol", "get-that-waits", request(GET, b"missing", millis(100))
    yield "store_protocol", "add-to-a-set-value", request(SET, b"n", b"41") + request(ADD, b"n", struct.pack("!q", 1))
    yield "store_protocol", "add-twice", request(ADD, b"n", struct.pack("!q", 1000)) + request(ADD, b"n", struct.pack("!q", -7))


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIR")
    for target, name, data in corpora():
        os.makedirs(os.path.join(sys.argv[1], target), exist_ok=True)
        with open(os.path.join(sys.argv[1], target, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()

"""How the compiled core is loaded so that its OpenSSL calls reach OpenSSL.

TensorFlow's libtensorflow_framework exports its BoringSSL under OpenSSL's names (EVP_*,
about 300 of them) into the process' global symbol scope. An extension loaded after it binds
its libcrypto calls to those: BoringSSL's functions called with OpenSSL 3's ABI, so every
connection handshake fails (seen with tensorflow-cpu 2.21: "did not complete the connection
handshake within 30 s"). With TensorFlow already loaded, the core is loaded with
RTLD_DEEPBIND: its own dependencies (libcrypto.so.3) come before the global scope. Only
then: DEEPBIND also puts the C++ runtime's operator new ahead of an LD_PRELOADed allocator
or sanitizer."""

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def own_symbols_first() -> Iterator[None]:
    """Around the core's import: where TensorFlow is loaded, extensions loaded inside bind to
    their own dependencies first."""
    if "tensorflow" not in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        yield
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        yield
    finally:
        sys.setdlopenflags(flags)

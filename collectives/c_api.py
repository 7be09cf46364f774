"""collectives' C API, for compiled extensions (collectives.tf's TensorFlow ops) that queue
collectives on a communicator made in Python without linking the core: the header
(``include_dir()``/collectives/c_api.h) declares a table of functions, and the extension is
handed the table's address and a communicator's ``c_handle`` at run time."""

import os

from . import _core

VERSION = _core.C_API_VERSION


def table_address() -> int:
    """The address of the loaded core's ``collectives_c_api`` table (valid for the process' life)."""
    return _core.C_API_ADDRESS


def include_dir() -> str:
    """The folder to add to an extension's include path (-I): it holds collectives/c_api.h."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")

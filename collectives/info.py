"""collectives-info: what this installation is and the settings a job would run with."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__, _core, _device, _topology, _ucx, ring
from ._config import TRANSPORTS, Config


def describe() -> dict:
    return {
        "version": __version__,
        "protocol_version": _core.PROTOCOL_VERSION,
        "python": sys.version.split()[0],
        "build": {
            "simd_level": _core.SIMD_LEVEL,
            "simd_levels_supported": list(_core.kernels.levels()),
            "transports": list(TRANSPORTS),
            "cuda": cuda(),
            "ucx": _ucx.describe(),
        },
        "settings": Config.from_env().as_dict(),
        "auto": ring.choices(),
        "auto_transport": _auto_transport(),
    }


def _auto_transport() -> str:
    """What COLLECTIVES_TRANSPORT=auto runs over, as far as this host decides it."""
    devices, why = _ucx.rdma_devices()
    if devices:
        return f"UCX for a job across hosts where every worker's UCX sees an RDMA-capable device, as here: " \
               f"{', '.join(devices)}"
    return f"shared memory within a host, TCP between hosts (not UCX: {why})"


def cuda() -> dict:
    """This build's CUDA path: {"built": False} without one; else the runtime, the GPUs this
    process sees, and how device buffers are all-reduced (staged through pinned host memory)."""
    if not _core.cuda.BUILT:
        return {"built": False}
    return {"built": True, "runtime": _core.cuda.runtime_version(), "devices": _core.cuda.devices(),
            "staging": f"pinned host pieces of {_device.PIECE_BYTES >> 20} MiB, {_device.SLOTS} per GPU: the copy of "
                       "piece k+1 overlaps the all-reduce of piece k (the CUDA copies are tested only where a GPU "
                       "is: tests/gpu/check_cuda.py)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="collectives-info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--topology", action="store_true",
                        help="print only where this process would sit in a job's topology: COLLECTIVES_TOPOLOGY's "
                             "levels, then the hostname (comm.topology gives every rank's)")
    args = parser.parse_args(argv)
    if args.topology:
        try:
            print(_topology.own_label(Config.from_env().topology))
        except ValueError as error:
            print(f"collectives-info: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        info = describe()
    except ValueError as error:  # a malformed COLLECTIVES_* variable
        print(f"collectives-info: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"collectives {info['version']} (protocol {info['protocol_version']}, Python {info['python']})")
    for key, value in info["build"].items():
        print(f"  {key:<22} {value}")
    print("effective settings:")
    for key, value in info["settings"].items():
        print(f"  {key:<32} {value}")
    print(f"auto transport: {info['auto_transport']}")
    model = info["auto"]["cost_model"]
    print(f"auto on a flat group, without reducers (cost model: {model['alpha_seconds'] * 1e6:g} us per message, "
          f"{model['beta_seconds_per_byte'] * 1e9:g} ns per byte; {model['source']}):")
    for ranks, bytes_ in info["auto"]["ring_from_bytes"].items():
        choice = "recursive doubling at every size" if bytes_ is None else \
            f"recursive doubling below {bytes_} bytes, the ring from there"
        print(f"  {ranks:>4} ranks: {choice}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""collectives-reducer: the command that runs a reducer (also python -m collectives.reduction_server)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from .. import _core, _ucx
from .._config import Config, parse_bytes, parse_int, parse_seconds
from ..errors import CollectiveError
from ._join import join

log = logging.getLogger("collectives.reducer")

_DESCRIPTION = """\
A CPU-only process that sums the shards of a job's all-reduces, so that each worker sends
its gradients once and receives the sum once. It joins one job, serves it, and exits 0 once
every worker has closed (1 on failure).

  mpirun -np N python train.py : -np R collectives-reducer      # one mpirun job
  collectives-reducer --rendezvous HOST:PORT                    # workers started otherwise

In the second form, set COLLECTIVES_NUM_REDUCERS=R on every worker, and give each reducer
the job's secret in COLLECTIVES_TOKEN or a --token-file (never on a command line)."""

_COUNTERS = ("bytes_received", "bytes_sent", "chunks_reduced", "elements_reduced")
_MB = 1e6
# The meter looks this often whether the reducer is at work: a tick in which it reduced a chunk
# or received at least _BUSY_BYTES (more than heartbeats and greetings) counts as busy.
_BUSY_TICK_S = 0.1
_BUSY_BYTES = 64 << 10


class _Interrupted(BaseException):
    """SIGTERM or SIGINT before the server serves. A BaseException, as KeyboardInterrupt
    is, so that no handler of errors takes it for a failure to report."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGTERM and SIGINT stop the server, whose serve() then returns; before it serves,
    they end the wait for the job."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.server: Any = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.server is None:
            raise _Interrupted(signum)
        self.server.stop()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Tag(logging.Filter):
    """Puts the reducer's index, once known, into every line."""

    index: Optional[int] = None

    def set(self, index: int) -> None:
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.reducer = "reducer ?" if self.index is None else f"reducer {self.index}"
        return True


class _Meter:
    """The server's counters and this process's CPU time (all its threads), per interval, in
    total, and while busy: over the ticks in which it was at work. A reducer spends most of
    its life waiting (for the job's start-up, for the workers' other work between
    all-reduces), so its CPU use averaged over its life reads ~0% however much it moved."""

    def __init__(self, server: Any):
        self.server = server
        self.samples: List[Dict[str, Any]] = []
        self.started = self.last_time = time.monotonic()
        self.cpu_started = self.last_cpu = time.process_time()
        self.last = server.stats()
        self.busy_s = self.busy_cpu_s = 0.0
        self._tick = (self.started, self.cpu_started, self.last)

    def tick(self) -> None:
        """Adds the time and CPU since the last tick to the busy totals if the reducer was at work."""
        now, cpu, stats = time.monotonic(), time.process_time(), self.server.stats()
        then, cpu_then, before = self._tick
        if (stats["chunks_reduced"] > before["chunks_reduced"]
                or stats["bytes_received"] - before["bytes_received"] >= _BUSY_BYTES):
            self.busy_s += now - then
            self.busy_cpu_s += cpu - cpu_then
        self._tick = (now, cpu, stats)

    def sample(self) -> None:
        now, cpu, stats = time.monotonic(), time.process_time(), self.server.stats()
        seconds = max(now - self.last_time, 1e-9)
        sample = {"time_s": round(now - self.started, 3), "interval_s": round(seconds, 3),
                  **{name: stats[name] - self.last[name] for name in _COUNTERS},
                  "cpu_percent": round(100 * (cpu - self.last_cpu) / seconds, 1),
                  "workers_connected": stats["workers_connected"]}
        self.samples.append(sample)
        self.last_time, self.last_cpu, self.last = now, cpu, stats
        log.info("in %.1f MB (%.1f MB/s), out %.1f MB (%.1f MB/s), %.0f chunks reduced/s, CPU %.0f%% of a core, "
                 "%d workers connected", sample["bytes_received"] / _MB, sample["bytes_received"] / _MB / seconds,
                 sample["bytes_sent"] / _MB, sample["bytes_sent"] / _MB / seconds,
                 sample["chunks_reduced"] / seconds, sample["cpu_percent"], sample["workers_connected"])

    def totals(self) -> Dict[str, Any]:
        elapsed, cpu = time.monotonic() - self.started, time.process_time() - self.cpu_started
        self.tick()
        return {"elapsed_s": round(elapsed, 3), "cpu_s": round(cpu, 3),
                "cpu_percent": round(100 * cpu / max(elapsed, 1e-9), 1), "busy_s": round(self.busy_s, 3),
                "busy_cpu_s": round(self.busy_cpu_s, 3),
                "busy_cpu_percent": round(100 * self.busy_cpu_s / self.busy_s, 1) if self.busy_s else 0.0,
                **self.server.stats()}


def _arg(parse: Callable[[str, str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from one of the settings' parsers, keeping its message."""
    def convert(text: str) -> Any:
        try:
            value = parse(text, name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if value is None:  # "auto", which only settings with a default in the core take
            raise argparse.ArgumentTypeError(f"{name} needs a value, e.g. 1G")
        return value
    return convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collectives-reducer", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rendezvous", metavar="HOST:PORT",
                        help="the job's store: the workers' COLLECTIVES_RENDEZVOUS (MASTER_ADDR:MASTER_PORT+1 under "
                             "torchrun); default COLLECTIVES_RENDEZVOUS; not needed in the workers' mpirun job")
    parser.add_argument("--token-file", metavar="PATH",
                        help="a file that holds the job's secret, instead of COLLECTIVES_TOKEN")
    parser.add_argument("--threads", type=_arg(lambda v, n: parse_int(v, n, 0), "--threads"), default=0,
                        help="threads that sum; 0 (default): as many as suit this host's cores")
    parser.add_argument("--max-memory", type=_arg(parse_bytes, "--max-memory"), default=0, metavar="SIZE",
                        help="bound on the memory that chunks in flight take, all workers together, e.g. 4G "
                             "(default: 256M per worker)")
    parser.add_argument("--heartbeat-interval", type=_arg(parse_seconds, "--heartbeat-interval"), default=0.25,
                        metavar="SECONDS", help="how often to tell idle workers that this reducer is alive (default "
                                                "0.25); keep it well below their COLLECTIVES_RS_HEARTBEAT_TIMEOUT")
    parser.add_argument("--stats-interval", type=_arg(parse_seconds, "--stats-interval"), metavar="SECONDS",
                        help="log bytes in and out, MB/s, chunks reduced per second and CPU use this often")
    parser.add_argument("--stats-json", metavar="PATH",
                        help="at exit, write the totals (and the --stats-interval samples) there as JSON")
    parser.add_argument("--timeout", type=_arg(parse_seconds, "--timeout"), metavar="SECONDS",
                        help="how long to wait for the job to start (default COLLECTIVES_TIMEOUT, or 300)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    tag = _Tag()
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter("%(asctime)s %(reducer)s %(levelname)s %(message)s"))
    handler.addFilter(tag)
    package_log = logging.getLogger("collectives")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    signals = _Signals()
    report: Dict[str, Any] = {"reducer": None, "num_reducers": None, "workers": None, "outcome": "failed",
                              "error": None, "stats_interval_s": args.stats_interval, "totals": None, "samples": []}
    try:
        code = _run(args, tag, signals, report)
    except _Interrupted as stopped:
        log.info("stopped by %s", signal.Signals(stopped.signum).name)
        report["outcome"] = "stopped"
        code = 128 + stopped.signum
    except (CollectiveError, ValueError, ImportError) as error:
        log.error("%s", error)
        report["error"] = str(error)
        code = 1
    finally:
        signals.restore()
    try:
        if args.stats_json is not None and not _write_report(args.stats_json, report):
            code = code or 1
    finally:
        package_log.removeHandler(handler)
    return code


def _run(args: argparse.Namespace, tag: _Tag, signals: _Signals, report: Dict[str, Any]) -> int:
    # Reducers learn the number of reducers from the workers, not from COLLECTIVES_NUM_REDUCERS.
    config = Config.from_env({"timeout": args.timeout, "num_reducers": 0})
    if config.debug:
        logging.getLogger("collectives").setLevel(logging.DEBUG)
    options = _core.ReducerOptions()
    options.threads = args.threads
    options.max_memory_bytes = args.max_memory
    options.heartbeat_interval_seconds = args.heartbeat_interval
    options.debug = config.debug
    # Loaded only if a worker asks for UCX (its job runs over it): the reducer follows the workers.
    options.ucx_library = _ucx.library_path() if _ucx.built() else ""
    environ = os.environ if args.token_file is None else {**os.environ, "COLLECTIVES_TOKEN_FILE": args.token_file}
    joined = join(args.rendezvous or os.environ.get("COLLECTIVES_RENDEZVOUS") or None, environ, config,
                  on_index=tag.set)
    report.update(reducer=joined.index, num_reducers=joined.num_reducers, workers=len(joined.worker_links))
    try:
        server = _core.ReductionServer(joined.worker_links, joined.worker_names, options)
        signals.server = server
        meter = _Meter(server)
        report["samples"] = meter.samples
        error = _serve(server, meter, args.stats_interval)
        report["totals"] = totals = meter.totals()
    finally:
        joined.close()
    log.info("served %d workers for %.1f s: %.1f MB in, %.1f MB out, %d chunks reduced, CPU %.0f%% of a core "
             "while busy (%.1f s), %.1f%% over it all", len(joined.worker_links), totals["elapsed_s"],
             totals["bytes_received"] / _MB, totals["bytes_sent"] / _MB, totals["chunks_reduced"],
             totals["busy_cpu_percent"], totals["busy_s"], totals["cpu_percent"])
    if signals.signum is not None:
        raise _Interrupted(signals.signum)  # stopped on purpose: whatever serve() said is no failure
    if error is not None:
        raise error
    report["outcome"] = "ok"
    return 0


def _serve(server: Any, meter: _Meter, interval: Optional[float]) -> Optional[BaseException]:
    """Runs server.serve() in a thread, so that this (the main) thread can take signals
    and sample the counters; returns what serve() raised, if anything."""
    raised: List[BaseException] = []

    def serve() -> None:
        try:
            server.serve()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            raised.append(e)

    thread = threading.Thread(target=serve, name="collectives-reducer-serve")
    thread.start()
    next_sample = None if interval is None else time.monotonic() + interval
    while thread.is_alive():
        thread.join(_BUSY_TICK_S if next_sample is None
                    else max(0.0, min(_BUSY_TICK_S, next_sample - time.monotonic())))
        meter.tick()
        if next_sample is not None and time.monotonic() >= next_sample:
            meter.sample()
            next_sample = time.monotonic() + interval
    return raised[0] if raised else None


def _write_report(path: str, report: Dict[str, Any]) -> bool:
    try:
        with open(f"{path}.tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(f"{path}.tmp", path)  # whoever reads it never sees half a file
    except OSError as e:
        log.error("cannot write --stats-json %s: %s", path, e.strerror or e)
        return False
    return True

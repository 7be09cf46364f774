"""benchmarks/train.py: arguments, rows and RESULTS.md block (unit level), and, as root on the
testbed, one short DDP run of every system end to end."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import BENCHMARKS, clean_environ, load_benchmark

TRAIN_PY = BENCHMARKS / "train.py"
RESULTS_MD = BENCHMARKS / "RESULTS.md"


train = load_benchmark("train")

KEYS = {"system", "algorithm", "hosts", "reducers", "rate_gbps", "goodput_GBps", "tc", "bucket_cap_mb", "params",
        "grad_bytes", "batch", "step_time_s", "step_times_s", "samples_per_s", "speedup_vs_gloo", "compute_time_s",
        "comm_share", "comm_floor_s", "forward_s", "backward_s", "optimizer_s", "link_bytes", "cpu_util",
        "cpu_bound", "params_identical", "commit"}


# -- unit level

def test_defaults_are_the_issues_workload():
    args = train.parse_args([])
    assert (args.hosts, args.reducers, args.rate, args.bucket_caps) == (4, 4, "500mbit", [25, 64])
    assert args.systems == ["none", "gloo", "ring", "reduction_server"]
    params = train.parameter_count(args.width, args.layers)
    assert 24e6 < params < 26e6  # about 25 M parameters: 100 MB of float32 gradients
    assert 0.98e8 < 4 * params < 1.02e8


def test_arguments():
    args = train.parse_args(["--hosts", "2", "--reducers", "0", "--bucket-cap-mb", "0.5,25", "--steps", "3",
                             "--warmup", "0", "--json", "rows.json"])
    assert (args.hosts, args.reducers, args.bucket_caps, args.steps, args.warmup) == (2, 0, [0.5, 25], 3, 0)
    assert args.systems == ["none", "gloo", "ring"]  # no reducers: no reduction-server row
    assert args.worker_report is None


@pytest.mark.parametrize("argv, message", [
    (["--hosts", "1"], "--hosts must be at least 2"),
    (["--reducers", "-1"], "--reducers must be 0 or more"),
    (["--bucket-cap-mb", "0"], "must be above 0"),
    (["--bucket-cap-mb", "25,x"], "comma-separated list"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--rate", "fast"], "rate 'fast'"),
    (["--hosts", "200", "--reducers", "60"], "at most 250 hosts"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_comm_floor_is_the_bytes_each_worker_link_moves_over_b():
    mb = 1e8  # S bytes of gradients; B = 0.05 GB/s
    assert train.comm_floor_s("none", mb, 0.05, 4, 4) == 0
    assert train.comm_floor_s("gloo", mb, 0.05, 4, 4) == pytest.approx(1.5 * mb / 0.05e9)  # 2(n-1)/n of S
    assert train.comm_floor_s("ring", mb, 0.05, 4, 0) == pytest.approx(1.5 * mb / 0.05e9)
    assert train.comm_floor_s("reduction_server", mb, 0.05, 4, 4) == pytest.approx(mb / 0.05e9)  # S once
    assert train.comm_floor_s("reduction_server", mb, 0.05, 4, 2) == pytest.approx(2 * mb / 0.05e9)  # R < N


SETTING = {"hosts": 2, "reducers": 2, "rate_gbps": 0.5, "goodput_GBps": 0.06, "tc": "tbf rate 500mbit",
           "commit": "abc"}


def _report(times, hashes=None, cpu=0.5):
    """A workers' report of one bucket cap: times[system] = [[rank 0, rank 1] per round]."""
    systems = list(times)
    ranks = []
    for rank in range(2):
        record = {}
        for name in systems:
            steps = [per_rank[rank] for per_rank in times[name]]
            record[name] = {"step_s": steps, "forward_s": [0.01] * len(steps), "backward_s": [s - 0.02 for s in steps],
                            "optimizer_s": [0.01] * len(steps), "tx": [1.5e6] * len(steps), "rx": [1.5e6] * len(steps)}
            if name != "none":
                record[name].update({key: [0.1] * len(steps) for key in train.DDP_TIMES},
                                    hash=(hashes or {}).get(name, ["same", "same"])[rank],
                                    max_abs_diff_vs_gloo=0.0)
        ranks.append(record)
    return {"world": 2, "systems": systems, "params": 250_000, "width": 500, "layers": 1, "classes": 16, "batch": 8,
            "warmup": 1, "steps": len(times["none"]), "lr": 0.01,
            "algorithms": {"none": "none", "gloo": "gloo", "ring": "ring", "reduction_server": "reduction_server",
                           "hierarchical": "hierarchical(1 ranks/host x 2 hosts)", "gloo+fp16": "gloo",
                           "reduction_server+fp16": "reduction_server"},
            "phases": [{"bucket_cap_mb": 25, "buckets": {name: [1_000_000] for name in systems[1:]},
                        "ranks": ranks, "cpu": {name: [[cpu, 1.0]] * len(times[name]) for name in systems}}]}


def test_rows_take_the_slowest_rank_per_round_and_pair_the_rounds():
    times = {"none": [[0.1, 0.2], [0.2, 0.1], [0.2, 0.2]],
             "gloo": [[3.0, 2.0], [2.0, 2.0], [1.0, 1.5]],
             "ring": [[3.0, 3.0], [2.0, 1.0], [1.5, 1.5]],
             "reduction_server": [[1.0, 2.0], [1.0, 1.0], [1.0, 0.5]]}
    rows = train.rows_from_report(_report(times), SETTING)
    assert [r["algorithm"] for r in rows] == ["none", "gloo", "ring", "reduction_server"]
    assert [r["system"] for r in rows] == ["none", "gloo", "collectives", "collectives"]
    by = {r["algorithm"]: r for r in rows}
    for row in rows:
        assert KEYS <= set(row), KEYS - set(row)
    assert by["gloo"]["step_times_s"] == [3.0, 2.0, 1.5]  # the slowest rank of each round
    assert by["gloo"]["step_time_s"] == 2.0
    assert by["gloo"]["samples_per_s"] == pytest.approx(2 * 8 / 2.0)  # N x batch / step
    # Paired per round: gloo/rs = 3/2, 2/1, 1.5/1 -> median 1.5 (not the ratio of the medians, 2.0).
    assert by["reduction_server"]["speedup_vs_gloo"] == pytest.approx(1.5)
    assert by["ring"]["speedup_vs_gloo"] == pytest.approx(1.0)
    assert by["gloo"]["speedup_vs_gloo"] == 1.0
    assert by["none"]["compute_time_s"] == 0.2 and by["none"]["comm_share"] is None
    assert by["gloo"]["comm_share"] == pytest.approx(1 - 0.2 / 2.0)
    assert by["reduction_server"]["comm_floor_s"] == pytest.approx(1e6 / 0.06e9)
    assert by["gloo"]["comm_floor_s"] == pytest.approx(1e6 / 0.06e9)  # 2 hosts: 2(n-1)/n = 1
    assert all(r["params_identical"] for r in rows[1:]) and by["none"]["params_identical"] is None
    assert by["gloo"]["link_bytes"]["tx_per_step"] == 1.5e6
    assert by["none"]["cpu_bound"] is None and by["gloo"]["cpu_bound"] is False  # compute alone: no flag
    assert by["gloo"]["ddp_backward_comm_s"] == 0.1


def test_parameters_that_differ_across_ranks_are_reported_and_cpu_bound_runs_flagged():
    times = {name: [[1.0, 1.0]] * 3 for name in train.SYSTEMS}
    rows = train.rows_from_report(_report(times, hashes={"ring": ["a", "b"]}, cpu=0.95), SETTING)
    by = {r["algorithm"]: r for r in rows}
    assert by["ring"]["params_identical"] is False and by["gloo"]["params_identical"] is True
    assert by["gloo"]["cpu_bound"] is True and by["none"]["cpu_bound"] is None
    assert by["gloo"]["pace"] == "cpu"  # DDP's all-reduces at 17% of their floor with the cores 95% busy
    assert train.bar_lines(rows) == [
        "bar (2 workers + 2 reducers): reduction server 1.00x gloo samples/s at bucket_cap_mb 25, need >= 1.45: "
        "FAIL (the ratio does not count: collectives reduction_server and gloo were both CPU-paced)"]


def _paced(comm_s, cpu):
    """Rows whose DDP all-reduces took comm_s[system] (the floor is 1e6 B / 0.06 GB/s = 16.7 ms), with
    the machine's cores `cpu` busy; the reduction server 1.5x gloo."""
    times = {"none": [[0.1, 0.1]] * 3, "gloo": [[1.5, 1.5]] * 3, "ring": [[1.5, 1.5]] * 3,
             "reduction_server": [[1.0, 1.0]] * 3}
    rows = train.rows_from_report(_report(times, cpu=cpu), SETTING)
    for row in rows:
        if row["algorithm"] != "none":
            row["ddp_backward_comm_s"] = comm_s[row["algorithm"]]
            row["bound_fraction"] = row["comm_floor_s"] / row["ddp_backward_comm_s"]
            row["pace"] = train._checks.pace(row["bound_fraction"], row["cpu_util"])
    return rows


def test_a_busy_cpu_does_not_void_a_ratio_of_rows_that_reached_their_link_floor():
    at_floor = {"gloo": 0.0175, "ring": 0.0175, "reduction_server": 0.0175}  # 95% of the floor
    rows = _paced(at_floor, cpu=0.97)
    assert {r["pace"] for r in rows if r["algorithm"] != "none"} == {"links"}
    assert train.bar_lines(rows)[0].endswith("need >= 1.45: PASS")
    # gloo far from its floor while the cores were busy: the CPU may have slowed it, so 1.5x may overstate.
    rows = _paced({**at_floor, "gloo": 0.05}, cpu=0.97)
    line = train.bar_lines(rows)[0]
    assert "FAIL (the ratio may overstate: gloo was CPU-paced)" in line, line
    # ... and with CPU to spare, gloo's own protocol set its pace: the ratio counts.
    rows = _paced({**at_floor, "gloo": 0.05}, cpu=0.5)
    assert train.bar_lines(rows)[0].endswith("PASS")
    assert "collectives reduction_server 1.50x gloo at bucket_cap_mb 25: counts (collectives reduction_server: " \
           "links, gloo: own)" in train.standing_lines(rows)


def _per_host(rows, figures):
    for row in rows:
        row["link_bytes"]["per_host"] = {f"h{i}": {"tx": tx, "rx": rx} for i, (tx, rx) in enumerate(figures)}


def test_link_bytes_per_step_are_checked_against_each_algorithms_model():
    times = {name: [[1.0, 1.0]] * 3 for name in train.SYSTEMS}
    rows = train.rows_from_report(_report(times), SETTING)  # S = 1e6 B in one 1e6 B bucket, 2 hosts
    _per_host(rows, [(1.0e6, 1.0e6), (1.0e6, 1.0e6)])
    reducers = {"h2": {"link_bytes": {"tx": 4e6, "rx": 4e6}}}  # N/R = 1 per step, 1 + 3 steps
    for row in rows:
        row["warmup"], row["steps"] = 1, 3
    assert train.link_problems(rows, reducers) == []
    _per_host(rows, [(1.0e6, 1.0e6), (1.2e6, 0.5e6)])
    problems = train.link_problems(rows, {"h2": {"link_bytes": {"tx": 4e6, "rx": 1e3}}})
    assert "gloo per step at bucket_cap_mb 25, 1000000 bytes: h1 tx/size 1.200, expected within 10% of 1.000" \
        in problems, problems
    assert "gloo per step at bucket_cap_mb 25, 1000000 bytes: h1 rx/size 0.500, expected within 10% of 1.000" \
        in problems, problems
    assert any(p.startswith("collectives reduction_server (reducer host, per step over the job), 1000000 bytes: "
                            "h2 rx/size 0.000") for p in problems), problems
    with pytest.raises(SystemExit, match="refusing the run: the bytes on the links"):
        train._checks.check_traffic(problems)


def test_compressed_rows_are_named_by_their_hook_checked_at_half_the_bytes_and_held_to_2_2x():
    args = train.parse_args(["--compress", "fp16,bf16"])
    assert args.systems == ["none", "gloo", "ring", "reduction_server", "gloo+fp16", "reduction_server+fp16",
                            "gloo+bf16", "reduction_server+bf16"]
    times = {"none": [[0.1, 0.1]] * 3, "gloo": [[2.2, 2.2]] * 3, "ring": [[2.2, 2.2]] * 3,
             "reduction_server": [[1.5, 1.5]] * 3, "gloo+fp16": [[1.1, 1.1]] * 3,
             "reduction_server+fp16": [[1.0, 1.0]] * 3}
    rows = train.rows_from_report(_report(times), SETTING)
    by = {(r["algorithm"], r["compress"]): r for r in rows}
    served = by["reduction_server", "fp16"]
    assert served["hook"] == "fp16_compress_hook" and served["speedup_vs_gloo"] == pytest.approx(2.2)
    assert served["comm_floor_s"] == pytest.approx(by["reduction_server", None]["comm_floor_s"] / 2)
    assert train._cells(served, train.COLUMNS)[0] == "collectives reduction_server fp16 (fp16_compress_hook)"
    assert train.bar_lines(rows) == [
        "bar (2 workers + 2 reducers): reduction server 1.47x gloo samples/s at bucket_cap_mb 25, need >= 1.45: PASS",
        "bar (2 workers + 2 reducers): reduction server with fp16 compression (fp16_compress_hook) 2.20x gloo "
        "samples/s at bucket_cap_mb 25, need >= 2.2: PASS"]
    # A compressed step moves S/2: the full-size rows' bytes on a compressed row are refused.
    _per_host(rows, [(1.0e6, 1.0e6), (1.0e6, 1.0e6)])
    for row in rows:
        row["warmup"], row["steps"] = 1, 3
        if row["compress"]:
            row["link_bytes"]["per_host"] = {f"h{i}": {"tx": 0.5e6, "rx": 0.5e6} for i in range(2)}
    assert train.link_problems(rows, {"h2": {"link_bytes": {"tx": 6e6, "rx": 6e6}}}) == []  # 4 + 4/2 steps of S
    rows[-1]["link_bytes"]["per_host"]["h1"]["tx"] = 1.0e6
    assert train.link_problems(rows, {"h2": {"link_bytes": {"tx": 6e6, "rx": 6e6}}}) == [
        "collectives reduction_server fp16 (fp16_compress_hook) per step at bucket_cap_mb 25, 500000 bytes: "
        "h1 tx/size 2.000, expected within 10% of 1.000"]


# -- layouts: K workers per host, racks

def test_layout_arguments(monkeypatch):
    monkeypatch.setattr(train.compare, "algorithm_available", lambda name: True)
    args = train.parse_args(["--per-host", "2", "--hosts", "4", "--racks", "2", "--uplink-rate", "250mbit"])
    assert (args.per_host, args.racks, args.reducers) == (2, 2, 0)  # no reducers by default on a layout
    assert args.systems == ["none", "gloo", "ring", "hierarchical"]
    assert train.layout_of(args).racks == (2, 2) and train.layout_of(args).ranks == 8
    assert train.parse_args(["--per-host", "2", "--no-hierarchical"]).systems == ["none", "gloo", "ring"]
    assert train.parse_args([]).systems == ["none", "gloo", "ring", "reduction_server"]  # flat: as before
    monkeypatch.setattr(train.compare, "algorithm_available", lambda name: False)
    assert train.parse_args(["--per-host", "2"]).systems == ["none", "gloo", "ring"]
    assert train.block_name(4, 0, "500mbit", 2) == "ddp 4x2 500mbit"
    assert train.block_name(4, 4, "250mbit", 2) == "ddp 4x2+4 250mbit"
    args = train.parse_args(["--per-host", "2", "--hosts", "4", "--reducers", "4"])  # the host plan's row
    assert args.systems == ["none", "gloo", "ring", "reduction_server"]  # (hierarchical "not offered" here)
    assert train.block_name(4, 0, "500mbit", 2, 2, "250mbit") == "ddp 4x2 racks 2 uplink 250mbit 500mbit"


@pytest.mark.parametrize("argv, message", [
    (["--hosts", "4", "--racks", "2", "--uplink-rate", "1gbit", "--reducers", "2"], "without racks only"),
    (["--racks", "2"], "go together"),
    (["--hosts", "2", "--racks", "3", "--uplink-rate", "1gbit"], "at most --hosts"),
    (["--per-host", "0"], "at least 1"),
])
def test_bad_layout_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_rows_on_a_layout_carry_the_plans_and_are_checked_per_level():
    # 2 hosts x 1 rank in 2 racks: tiny, but every level is there. Worker 0 read the uplinks.
    times = {name: [[1.0, 1.0]] * 3 for name in ("none", "gloo", "ring", "hierarchical")}
    report = _report(times)
    report["algorithms"]["hierarchical"] = "hierarchical(1 ranks/host x 1 hosts/rack x 2 racks)"
    grad = report["params"] * 4
    for rank in report["phases"][0]["ranks"]:
        for name in times:
            rank[name]["tx"] = rank[name]["rx"] = [grad * 1.0] * 3
    for name in times:
        report["phases"][0]["ranks"][0][name]["uplinks"] = [{"rack0": [grad, grad], "rack1": [grad, grad]}] * 3
    setting = dict(SETTING, reducers=0, per_host=1, racks=[1, 1], uplink_goodput_GBps=0.03, uplink_rate_gbps=0.25,
                   worker_hosts=["h0", "h1"])
    rows = train.rows_from_report(report, setting)
    by = {r["algorithm"]: r for r in rows}
    assert by["hierarchical"]["plan"] == "hierarchical:host+rack" and by["ring"]["plan"] == "ring:rank-order"
    assert by["hierarchical"]["plan_detail"].startswith("hierarchical(") and by["hierarchical"]["racks"] == [1, 1]
    assert by["ring"]["link_bytes"]["uplinks"] == {"rack0": {"tx": grad, "rx": grad}, "rack1": {"tx": grad, "rx": grad}}
    # The uplinks bind: 2(R-1)/R = 1 x S at B_up = 0.03 GB/s.
    assert by["hierarchical"]["comm_floor_s"] == pytest.approx(grad / 0.03e9)
    assert by["hierarchical"]["speedups"]["ring"] == pytest.approx(1.0)
    assert train.link_problems(rows, {}) == []
    by["ring"]["link_bytes"]["uplinks"] = {"rack0": {"tx": grad, "rx": grad}}
    assert "collectives ring per step at bucket_cap_mb 25: byte counts of 1 rack uplinks, expected 2" in \
        train.link_problems(rows, {})
    assert any("collectives hierarchical 1.00x collectives ring" in line for line in train.standing_lines(rows))
    text = train.markdown(rows, "cmd", "ddp 2x1 racks 2 uplink 250mbit 500mbit")
    assert "| uplink tx/S | uplink rx/S |" in text and "per uplink each way" in text



def test_the_timeline_splits_each_step_at_the_wire():
    """--timeline: per round, the wire runs from the last worker's first bytes out to the last
    bytes in; before it is the step's start to then, after it the rest of the slowest step;
    the last worker to start sends from its first bulk bytes out to its last."""
    times = {"none": [[0.2, 0.2]] * 2, "gloo": [[3.0, 2.9], [3.2, 3.0]],
             "reduction_server": [[2.0, 2.1], [2.2, 2.0]]}
    report = _report(times)
    # [round][rank]: first bulk bytes out, last bulk bytes out, last bulk bytes in
    wire = {"gloo": ([[0.2, 0.1], [0.1, 0.3]], [[2.7, 2.6], [2.9, 2.8]], [[2.8, 2.7], [3.0, 2.9]]),
            "reduction_server": ([[0.2, 0.25], [0.3, 0.2]], [[1.8, 1.9], [2.0, 1.9]], [[1.9, 1.95], [2.1, 2.0]])}
    for name, (outs, out_ends, ins) in wire.items():
        for rank, record in enumerate(report["phases"][0]["ranks"]):
            record[name]["wire_out_s"] = [per_round[rank] for per_round in outs]
            record[name]["wire_out_end_s"] = [per_round[rank] for per_round in out_ends]
            record[name]["wire_in_s"] = [per_round[rank] for per_round in ins]
    by = {r["algorithm"]: r for r in train.rows_from_report(report, SETTING)}
    # gloo: wires 2.8 - 0.2 = 2.6 and 3.0 - 0.3 = 2.7; before 0.2 and 0.3; after 3.0 - 2.8, 3.2 - 3.0.
    assert by["gloo"]["wire_s"] == pytest.approx(2.65)
    assert by["gloo"]["before_wire_s"] == pytest.approx(0.25)
    assert by["gloo"]["after_wire_s"] == pytest.approx(0.2)
    assert by["reduction_server"]["wire_s"] == pytest.approx((1.7 + 1.8) / 2)
    # The last to start: gloo's rank 0 (2.7 - 0.2), then rank 1 (2.8 - 0.3); the reduction
    # server's rank 1 (1.9 - 0.25), then rank 0 (2.0 - 0.3).
    assert by["gloo"]["sending_s"] == pytest.approx(2.5)
    assert by["reduction_server"]["sending_s"] == pytest.approx(1.675)
    assert "wire_s" not in by["none"]
    lines = train.timeline_lines(list(by.values()))
    floor = 1e6 / 0.06e9
    assert lines[0] == ("gloo at bucket_cap_mb 25: on the wire 2650 ms (floor 17, +2633 ms), before it 250 ms, "
                        f"after it 200 ms; the last worker to start sent for 2500 ms ({floor / 2.5:.1%} of the "
                        "links' goodput B)")
    # Both at their floors (1e6 B / 0.06 GB/s = 16.7 ms each) with their times outside the wire.
    assert (by["reduction_server"]["before_wire_s"], by["reduction_server"]["after_wire_s"]) == pytest.approx(
        ((0.25 + 0.3) / 2, (0.15 + 0.1) / 2))
    outside = {"gloo": 0.25 + 0.2, "reduction_server": 0.275 + 0.125}
    cap = (outside["gloo"] + floor) / (outside["reduction_server"] + floor)
    assert lines[-1].endswith(f"{cap:.2f}x gloo")
    # A round where a worker saw no bulk traffic (None) is left out.
    report["phases"][0]["ranks"][0]["gloo"]["wire_out_s"][1] = None
    assert train.rows_from_report(report, SETTING)[1]["wire_s"] == pytest.approx(2.6)

def test_the_bar_is_met_at_1_45x_gloo():
    times = {"none": [[0.1, 0.1]] * 3, "gloo": [[1.45, 1.45]] * 3, "ring": [[1.45, 1.45]] * 3,
             "reduction_server": [[1.0, 1.0]] * 3}
    rows = train.rows_from_report(_report(times), SETTING)
    assert train.bar_lines(rows)[0].endswith("need >= 1.45: PASS")


def test_the_results_block_is_rewritten_alone(tmp_path, capsys):
    times = {name: [[1.0, 1.0]] * 3 for name in train.SYSTEMS}
    rows = train.rows_from_report(_report(times), SETTING)
    name = train.block_name(4, 4, "500mbit")
    assert name == "ddp 4+4 500mbit"
    begin, end = train.compare.markers(name, "train.py")
    other_begin, other_end = train.compare.markers("reducers 4+4 500mbit")
    path = tmp_path / "RESULTS.md"
    path.write_text(f"top\n{other_begin}\nKEEP\n{other_end}\n{begin}\nOLD\n{end}\nbottom\n")
    train.compare.update_results(path, train.markdown(rows, "python benchmarks/train.py --hosts 4", name), name,
                                 "train.py")
    text = path.read_text()
    assert "OLD" not in text and "KEEP" in text and text.startswith("top\n") and text.endswith("bottom\n")
    assert "python benchmarks/train.py --hosts 4" in text and "| collectives reduction_server | 25 |" in text
    assert "FAIL" in text and "DDP's buckets at bucket_cap_mb 25: 1.0 MB" in text
    train.print_rows(rows)  # the same table on stdout
    assert "collectives ring" in capsys.readouterr().out


def test_the_repositorys_results_file_has_the_ddp_block():
    begin, end = train.compare.markers(train.block_name(4, 4, "500mbit"), "train.py")
    text = RESULTS_MD.read_text()
    assert begin.split(" (")[0] in text and end in text


CUSTOM_LINE = "collectives.tf: collectives run in TensorFlow custom ops (loaded /cache/collectives_tf_ops.so)"


def _tf_report(times, tf_ops="numpy", hashes=None, line=None):
    """A TensorFlow job's report (train_tf.worker's): whole steps, the strategy as baseline."""
    report = _report(times, hashes)
    report.update(framework="tf", baseline="mwms", tf_ops=tf_ops, tf_ops_line=line, tensorflow="2.21.0",
                  keras="3.13.0")
    report["algorithms"]["mwms"] = "mwms"
    report["phases"][0]["buckets"] = {}
    for record in report["phases"][0]["ranks"]:
        for name, figures in record.items():
            for key in ("forward_s", "backward_s", "optimizer_s", *train.DDP_TIMES, "max_abs_diff_vs_gloo"):
                figures.pop(key, None)
            if name != "none":
                figures["max_abs_diff_vs_mwms"] = 0.0
    return report


def test_tf_arguments():
    args = train.parse_args(["--framework", "tf"])
    assert (args.bucket_caps, args.tf_ops, args.systems) == ([25], ["numpy", "custom"],
                                                             ["none", "mwms", "ring", "reduction_server"])
    assert train.parse_args(["--framework", "tf", "--reducers", "0", "--tf-ops", "numpy"]).systems == \
        ["none", "mwms", "ring"]
    assert train.block_name(4, 4, "500mbit", framework="tf") == "tf 4+4 500mbit"


@pytest.mark.parametrize("argv, message", [
    (["--bucket-cap-mb", "25,64"], "one --bucket-cap-mb"),
    (["--compress", "fp16"], "no --per-host, --racks or --compress"),
    (["--per-host", "2"], "no --per-host, --racks or --compress"),
    (["--tf-ops", "numpy,xla"], "--tf-ops takes numpy or custom"),
])
def test_bad_tf_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--framework", "tf", *argv])
    assert message in capsys.readouterr().err


def test_tf_rows_are_paired_with_the_strategy_of_their_run_and_held_to_issue_14s_bars(tmp_path):
    def times(strategy, ring, served):
        return {"none": [[0.1, 0.1]] * 3, "mwms": [[strategy] * 2] * 3, "ring": [[ring] * 2] * 3,
                "reduction_server": [[served] * 2] * 3}

    setting = dict(SETTING, reducers=2)
    rows = (train.rows_from_report(_tf_report(times(2.8, 2.7, 1.9), "numpy"), setting)
            + train.rows_from_report(_tf_report(times(2.8, 2.8, 2.1), "custom", line=CUSTOM_LINE), setting))
    by = {(r["algorithm"], r["tf_ops"]): r for r in rows}
    assert by["ring", "numpy"]["speedup_vs_mwms"] == pytest.approx(2.8 / 2.7)
    assert by["reduction_server", "custom"]["speedup_vs_mwms"] == pytest.approx(2.8 / 2.1)
    assert by["mwms", "numpy"]["system"] == "tensorflow" and by["mwms", "numpy"]["plan"] == "mwms"
    assert by["mwms", "numpy"]["comm_floor_s"] == by["ring", "numpy"]["comm_floor_s"]  # a ring's bytes
    # TensorFlow times whole steps: the floor over the step is the link-bound fraction.
    assert by["ring", "numpy"]["bound_fraction"] == pytest.approx(by["ring", "numpy"]["comm_floor_s"] / 2.7)
    assert all(r["params_identical"] for r in rows if r["algorithm"] != "none")
    assert train.label(by["ring", "custom"]) == "collectives ring (custom op)"
    assert train.label(by["mwms", "custom"]) == "TF MultiWorkerMirroredStrategy (RING, gRPC) [custom run]"
    bars = train.bar_lines(rows)
    assert any("collectives reduction_server (tf.numpy_function) 1.47x MultiWorkerMirroredStrategy samples/s, "
               "need >= 1.4: PASS" in line for line in bars), bars
    assert any("collectives reduction_server (custom op) 1.33x" in line and line.endswith("FAIL") for line in bars)
    assert any("collectives ring (custom op) 1.00x" in line and line.endswith("PASS") for line in bars)
    assert any("collectives ring through the custom op 0.96x" in line and line.endswith("FAIL") for line in bars)
    lines, problems = train.path_lines(rows)
    assert problems == [] and lines[1] == f"custom run (COLLECTIVES_TF_OPS=custom): collectives.tf logged '{CUSTOM_LINE}'"
    assert "no op path" in lines[0]  # a collectives.tf without custom ops says nothing: the numpy path
    fallen_back = train.rows_from_report(_tf_report(times(1, 1, 1), "custom"), setting)
    assert train.path_lines(fallen_back)[1] == ["the custom run used collectives.tf's numpy path: None"]
    text = train.markdown(rows, "python benchmarks/train.py --framework tf", "tf 2+2 500mbit", ["a note"])
    assert "| vs MultiWorkerMirroredStrategy |" in text and "DDP" not in text and "- a note" in text
    assert "TensorFlow 2.21.0, Keras 3.13.0" in text and "COLLECTIVES_TF_OPS=numpy, custom" in text


# -- end to end, on the testbed (root)

def on_testbed(timeout):
    """Marks a test that runs train.py on the testbed: root, the tools, a timeout."""
    marks = [pytest.mark.testbed, pytest.mark.timeout(timeout),
             pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the testbed creates network namespaces"),
             pytest.mark.skipif(any(shutil.which(t) is None for t in ("ip", "tc", "unshare", "nsenter")),
                                reason="needs iproute2 and util-linux")]

    def mark(test):
        for marker in marks:
            test = marker(test)
        return test
    return mark


def _train(tmp_path, timeout, *argv):
    """train.py with a tiny model (2 x 64x64, batch 4, one warm-up round) and argv; (the
    finished process, its rows)."""
    pytest.importorskip("torch")
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(TRAIN_PY), "--width", "64", "--layers", "2", "--batch", "4",
                           "--warmup", "1", "--timeout", "60", *argv, "--json", str(rows_file)],
                          env=clean_environ(), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(rows_file.read_text())


@on_testbed(90)
def test_ddp_on_every_system_across_hosts(tmp_path):
    # A tiny model (2 x 64x64) at a low rate: this checks the wiring, not the speed. One
    # reducer for two workers: its link carries both workers' gradients (the bottleneck here).
    done, rows = _train(tmp_path, 85, "--hosts", "2", "--reducers", "1", "--rate", "100mbit", "--bucket-cap-mb",
                        "0.02,1", "--steps", "3", "--compress", "fp16")
    assert [(r["algorithm"], r["compress"], r["bucket_cap_mb"]) for r in rows] == [
        (name, compress, cap) for cap in (0.02, 1) for name, compress in (
            ("none", None), ("gloo", None), ("ring", None), ("reduction_server", None), ("gloo", "fp16"),
            ("reduction_server", "fp16"))]
    for row in rows:
        assert KEYS <= set(row), KEYS - set(row)
        assert row["hosts"] == 2 and row["reducers"] == 1 and len(row["step_times_s"]) == 3
        assert row["params"] == train.parameter_count(64, 2) and row["step_time_s"] > 0
        if row["algorithm"] != "none":
            assert row["params_identical"] is True, row
            # The same training, summed in another order (or sent as float16 and rounded once).
            assert row["max_abs_diff_vs_gloo"] < (1e-3 if row["compress"] else 1e-4), row
            assert row["link_bytes"]["tx_per_step"] >= train.wire_bytes(row) / 2, row  # the gradients crossed
    small = next(r for r in rows if r["algorithm"] == "gloo" and r["bucket_cap_mb"] == 0.02)
    assert len(small["buckets_bytes"]) > 1  # 20 KB buckets: several per step
    rs = next(r for r in rows if r["algorithm"] == "reduction_server")
    assert [info["outcome"] for info in rs["reducer_hosts"].values()] == ["ok"]
    assert "collectives reduction_server" in done.stdout and "bar (2 workers + 1 reducer)" in done.stdout
    assert not train.testbed.leftover_namespaces()


@on_testbed(150)
def test_ddp_on_racks_of_shared_hosts(tmp_path):
    # 2 racks x 2 hosts x 2 workers, a tiny model: the wiring (placement, ranks, per-level bytes).
    done, rows = _train(tmp_path, 140, "--per-host", "2", "--hosts", "4", "--racks", "2", "--uplink-rate", "100mbit",
                        "--rate", "100mbit", "--bucket-cap-mb", "1", "--steps", "2")
    names = [r["algorithm"] for r in rows]
    assert names[:3] == ["none", "gloo", "ring"] and set(names[3:]) <= {"hierarchical"}
    for row in rows:
        assert (row["hosts"], row["ranks"], row["per_host"], row["racks"], row["reducers"]) == (4, 8, 2, [2, 2], 0)
        assert sorted(row["link_bytes"]["per_host"]) == ["h0", "h1", "h2", "h3"]
        assert sorted(row["link_bytes"]["uplinks"]) == ["rack0", "rack1"]
        if row["algorithm"] != "none":
            assert row["params_identical"] is True and row["link_bytes"]["tx_per_uplink"] >= row["grad_bytes"], row
    assert next(r for r in rows if r["algorithm"] == "ring")["plan"] == "ring:rank-order"
    assert "8 workers" in done.stdout and not train.testbed.leftover_namespaces()


@on_testbed(150)
@pytest.mark.tf  # scripts/test runs it in the TensorFlow venv (-m tf)
def test_tf_strategy_and_collectives_tf_across_hosts(tmp_path):
    # --framework tf end to end, tiny (2 x 64x64, one timed round): TensorFlow's strategy over
    # gRPC between the hosts, collectives.tf's ring and reduction server (one reducer) in the
    # same processes, the weights equal on both workers and to the strategy's.
    pytest.importorskip("tensorflow")
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(TRAIN_PY), "--framework", "tf", "--tf-ops", "numpy", "--hosts", "2",
                           "--reducers", "1", "--rate", "100mbit", "--width", "64", "--layers", "2", "--batch", "4",
                           "--warmup", "1", "--steps", "1", "--timeout", "60", "--json", str(rows_file)],
                          env=clean_environ(), cwd=tmp_path, capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert [(r["algorithm"], r["tf_ops"]) for r in rows] == [
        ("none", "numpy"), ("mwms", "numpy"), ("ring", "numpy"), ("reduction_server", "numpy")]
    for row in rows:
        assert row["hosts"] == 2 and row["reducers"] == 1 and row["framework"] == "tf", row
        if row["algorithm"] != "none":
            assert row["params_identical"] is True and row["max_abs_diff_vs_mwms"] < 1e-4, row
            assert row["link_bytes"]["tx_per_step"] >= row["grad_bytes"] / 2, row  # the gradients crossed
    assert "bar (2 workers + 1 reducer): collectives reduction_server (tf.numpy_function)" in done.stdout
    assert not train.testbed.leftover_namespaces()

"""The report's pages: report.md (the summary, with the plots as PNG files beside it) and
report.html (self-contained: the same tables, the plots embedded as base64 PNG)."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .advisor import Advice, Option
from .calibration import Check, Stored, median_error
from .prices import Instance

__all__ = ["Report", "Sweep", "write"]

PLOTS = ("reducers", "cluster_sizes")
_COLOURS = {"ring": "#1f77b4", "hierarchical": "#ff7f0e", "reduction_server": "#2ca02c",
            "hierarchical+reduction_server": "#d62728"}
_METRICS = (("step_s", "step time (ms)", 1e3), ("samples_per_s", "samples/s", 1.0), ("usd_h", "$/h", 1.0),
            ("samples_per_usd", "samples per $", 1.0))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Options along one axis (reducer counts or worker counts), per plan."""
    axis: str  # the x label
    x: List[int]
    series: Dict[str, List[Option]]  # plan -> one option per x


@dataclasses.dataclass(frozen=True)
class Report:
    title: str
    advice: Advice
    inputs: List[Tuple[str, str, str]]  # quantity, value, source
    rows_used: List[Instance]
    options: List[Option]  # at the requested cluster size
    given: List[Option]  # with the reducer count given by --reducers
    sizing: List[Tuple[Instance, float, int, Optional[int]]]  # type, its bandwidth (Gbit/s), the rule's R, the advised R
    worker_Gbps: float  # one worker's NIC goodput, for the sizing rule's sentence
    workers: int
    by_reducers: Sweep
    by_workers: Sweep
    calibration: Stored
    measured: List[Check]  # the runs given with --json, against the model


def _plot(sweep: Sweep, log_x: bool, marks: Dict[str, float]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=90)
    for ax, (field, label, scale) in zip(axes.flat, _METRICS):
        for plan, options in sweep.series.items():
            ys = [getattr(o, field) * scale for o in options]
            ax.plot(sweep.x, ys, "-", color=_COLOURS[plan], label=plan, linewidth=2, marker="o" if len(ys) < 16 else None,
                    markersize=3)
        for name, x in marks.items():
            ax.axvline(x, color="#555555", linestyle=":", linewidth=1)
            ax.annotate(name, (x, 0.97), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top", ha="right")
        if log_x:
            ax.set_xscale("log", base=2)
        values = [getattr(o, field) for options in sweep.series.values() for o in options]
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xlabel(sweep.axis)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    plt.close(figure)
    return out.getvalue()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def _options_table(options: Sequence[Option]) -> Tuple[List[str], List[List[str]]]:
    head = ["plan", "reducers", "all-reduce ms", "paced by", "step ms", "samples/s", "of limit", "$/h",
            "samples per $"]
    rows = [[o.plan, f"{o.reducers} x {o.reducer.type}" if o.reducers else "0", _ms(o.allreduce_s), o.bottleneck,
             _ms(o.step_s), f"{o.samples_per_s:,.0f}", f"{o.of_limit:.0%}", f"{o.usd_h:,.2f}", f"{o.samples_per_usd:,.0f}"]
            for o in options]
    return head, rows


def _tables(report: Report) -> List[Tuple[str, str, List[str], List[List[str]]]]:
    """(heading, text before the table, header, rows) for each section, shared by both pages."""
    r = report
    sections = []
    sections.append(("Inputs", "Every number the model uses, with where it comes from.",
                     ["quantity", "value", "source"], [list(i) for i in r.inputs]))
    unchecked = [i.type for i in r.rows_used if i.checked == "no"]
    sections.append(("Price book rows used",
                     "List prices as of each row's date, read from the price book's files (the file column), not "
                     "fetched from the clouds; spot prices vary by the hour. "
                     + (f"{len(unchecked)} of these {len(r.rows_used)} rows were never compared with their source "
                        "page (checked: no): check them there before buying. " if unchecked else "")
                     + "Replace or add rows with `--prices FILE` (TOML, the form of collectives/report/prices/*.toml).",
                     ["type", "cloud", "region", "GPUs", "vCPUs", "NIC Gbit/s", "$/h on demand", "$/h spot", "date",
                      "checked", "file", "source"],
                     [[i.type, i.cloud, i.region, f"{i.gpus} {i.gpu_model}".strip(), str(i.vcpus), f"{i.nic_gbps:g}",
                       f"{i.on_demand_usd_h:g}", f"{i.spot_usd_h:g}", i.date, i.checked, i.origin, i.source]
                      for i in r.rows_used]))
    head, rows = _options_table(r.options)
    sections.append((f"Options at {r.workers} workers",
                     "Per plan and reducer type, the count the advisor found best; the limit is the samples/s "
                     "with no communication at all.", head, rows))
    if r.given:
        head, rows = _options_table(r.given)
        sections.append((f"Given: {r.given[0].reducers} reducers", "The reducer count given with --reducers, "
                         "per plan and reducer type.", head, rows))
    sections.append(("Sizing rule",
                     f"Total reducer bandwidth >= total worker bandwidth: R >= {r.workers} x "
                     f"{r.worker_Gbps:.1f} Gbit/s / (one reducer's bandwidth), each a goodput "
                     "(a reducer's bandwidth: the lesser of its NIC and its summing rate).",
                     ["reducer type", "one reducer (Gbit/s)", "R by the rule", "R advised"],
                     [[i.type, f"{bw:.1f}", str(rule), str(adv) if adv is not None else "-"] for i, bw, rule, adv in r.sizing]))
    plans = list(r.by_workers.series)
    rows = []
    for k, w in enumerate(r.by_workers.x):
        options = [r.by_workers.series[p][k] for p in plans]
        best = max(options, key=lambda o: o.samples_per_usd)
        rows.append([str(w)] + [f"{o.samples_per_usd:,.0f}" + (f" ({o.reducers} x {o.reducer.type})" if o.reducers else "")
                                for o in options]
                    + [best.plan])
    sections.append(("Across cluster sizes", "Samples per dollar per plan (reducers, where any, in brackets: "
                     "the advisor's count at that size).", ["workers"] + plans + ["best"], rows))
    c = r.calibration
    cal = c.calibration
    text = (f"Alpha-beta model with pipelining (collectives/report/simulator.py), fitted on {len(c.fitted_on)} testbed runs "
            f"({c.date}, `{c.command}`): alpha {cal.alpha_s * 1e3:.3f} ms per ring step on the testbed, reduction-server "
            f"latency {cal.rs_steps:.2f} steps, efficiency {cal.ring_efficiency:.3f} (rings) and {cal.rs_efficiency:.3f} "
            f"(reduction server) of the links' goodput, goodput {cal.goodput_fraction:.3f} of the link rate. "
            f"Held-out runs (not fitted on): median |error| {median_error(c.checks):.1%}, "
            f"max {max(abs(k.error) for k in c.checks):.1%}.")
    sections.append(("Simulator validation", text, ["run", "configuration", "measured ms", "modelled ms", "error", "note"],
                     [[k.source, k.description, _ms(k.measured_s), _ms(k.modelled_s), f"{k.error:+.1%}", k.note]
                      for k in c.checks]))
    if r.measured:
        sections.append(("Measured runs given", f"The runs of the JSON given with --json against the model: median "
                         f"|error| {median_error(r.measured):.1%}.",
                         ["run", "configuration", "measured ms", "modelled ms", "error", "note"],
                         [[k.source, k.description, _ms(k.measured_s), _ms(k.modelled_s), f"{k.error:+.1%}", k.note]
                          for k in r.measured]))
    return sections


def _markdown(report: Report, sections, plot_names: Dict[str, str]) -> str:
    def row(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    lines = [f"# {report.title}", "", f"**Advice:** {report.advice.line}", ""]
    for heading, text, head, rows in sections:
        lines += [f"## {heading}", "", text, "", row(head), row(["---"] * len(head))] + [row(r) for r in rows] + [""]
        if heading.startswith("Options"):
            lines += [f"![step time, samples/s, $/h and samples per $ against reducer counts]({plot_names['reducers']})", ""]
        if heading == "Across cluster sizes":
            lines += [f"![step time, samples/s, $/h and samples per $ against cluster size]({plot_names['cluster_sizes']})", ""]
    return "\n".join(lines)


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eee; }
.advice { background: #fff3bf; border: 2px solid #e0a800; padding: 0.8em; font-size: 1.1em; }
img.plot { width: 100%; max-width: 990px; display: block; margin: 0.5em 0 1.5em; }
"""


def _html(report: Report, sections, plots: Dict[str, bytes]) -> str:
    def e(text: str) -> str:  # escaped, with the Markdown's `code` as <code>
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(report.title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{e(report.title)}</h1>",
             f"<p class='advice' id='advice'><b>Advice:</b> {e(report.advice.line)}</p>"]
    for heading, text, head, rows in sections:
        parts += [f"<h2>{e(heading)}</h2>", f"<p>{e(text)}</p>", "<table><tr>"
                  + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
        for name, after in (("reducers", "Options"), ("cluster_sizes", "Across cluster sizes")):
            if heading.startswith(after):
                data = base64.b64encode(plots[name]).decode()
                parts.append(f"<img class='plot' id='plot-{name}' alt='{e(name)} plot' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(report: Report, out: str) -> Tuple[Path, Path]:
    """Writes DIR/report.md (with DIR/reducers.png and DIR/cluster_sizes.png) and DIR/report.html."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    advised = report.advice.best
    marks = {}
    if advised.reducers:
        marks[f"advised: {advised.reducers}"] = advised.reducers
        rule = next((rule for i, _, rule, _ in report.sizing if i.type == advised.reducer.type), None)
        if rule is not None and rule != advised.reducers:
            marks[f"sizing rule: {rule}"] = rule
    plots = {"reducers": _plot(report.by_reducers, False, marks),
             "cluster_sizes": _plot(report.by_workers, True, {f"{report.workers} workers": report.workers})}
    names = {}
    for name, data in plots.items():
        names[name] = f"{name}.png"
        (folder / names[name]).write_bytes(data)
    sections = _tables(report)
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(_markdown(report, sections, names))
    page.write_text(_html(report, sections, plots))
    return md, page

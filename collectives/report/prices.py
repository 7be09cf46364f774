"""The price book: cloud instance types with their hourly prices, vCPUs, GPUs and NIC bandwidth.

The book ships as TOML files beside this module (prices/gcp.toml, aws.toml, azure.toml), one
``[[instance]]`` table per type; users add rows or replace shipped ones with files of the same
form (``collectives-report --prices FILE``). Every row names its source page, the date its
prices are of, and whether anyone has compared it with that page since (``checked``: the date
that was done, or "no"); the report prints the rows it used with all three. Nothing here is
fetched: the prices are what the files say, list prices as of their dates.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Optional

__all__ = ["Instance", "PriceBook", "load"]

_REQUIRED = ("type", "cloud", "region", "vcpus", "nic_gbps", "on_demand_usd_h", "spot_usd_h", "source", "date")


@dataclasses.dataclass(frozen=True)
class Instance:
    type: str
    cloud: str
    region: str
    vcpus: int
    nic_gbps: float  # the VM's network bandwidth over TCP, each way
    on_demand_usd_h: float
    spot_usd_h: float
    source: str  # where the figures come from (a page), and how current they are
    date: str  # when they were taken (YYYY-MM)
    origin: str  # the file the row was read from
    checked: str = "no"  # when the row was last compared with its source page (YYYY-MM-DD), or "no"
    gpus: int = 0
    gpu_model: str = ""
    intra_GBps: Optional[float] = None  # one GPU's bandwidth to the host's other GPUs, each way

    def usd_h(self, pricing: str) -> float:
        """The hourly price under `pricing` ("on-demand" or "spot")."""
        if pricing == "spot":
            return self.spot_usd_h
        if pricing == "on-demand":
            return self.on_demand_usd_h
        raise ValueError(f"pricing must be 'on-demand' or 'spot', not {pricing!r}")

    @property
    def cited(self) -> str:
        """How a figure from this row is credited: "price book: a2-highgpu-8g (gcp.toml, 2024-06, unchecked)"."""
        checked = "unchecked" if self.checked == "no" else f"checked {self.checked}"
        return f"price book: {self.type} ({Path(self.origin).name}, {self.date}, {checked})"


class PriceBook:
    """Rows by type; a later file's row replaces an earlier one of the same type."""

    def __init__(self, rows: Iterable[Instance]):
        self.rows: Dict[str, Instance] = {}
        for row in rows:
            self.rows[row.type] = row

    def __getitem__(self, type_name: str) -> Instance:
        try:
            return self.rows[type_name]
        except KeyError:
            known = ", ".join(sorted(self.rows))
            raise KeyError(f"instance type {type_name!r} is not in the price book (known: {known}); "
                           f"add a row with --prices FILE") from None

    def reducer_types(self, cloud: str) -> List[Instance]:
        """The CPU-only types of `cloud`, cheapest first: the candidates for reducers."""
        return sorted((r for r in self.rows.values() if r.cloud == cloud and r.gpus == 0),
                      key=lambda r: (r.on_demand_usd_h, r.type))


def _rows(text: str, origin: str) -> List[Instance]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{origin}: not valid TOML: {e}") from None
    rows = []
    fields = {f.name for f in dataclasses.fields(Instance)} - {"origin"}
    for i, table in enumerate(data.get("instance", [])):
        missing = [k for k in _REQUIRED if k not in table]
        unknown = sorted(set(table) - fields)
        if missing or unknown:
            raise ValueError(f"{origin}: [[instance]] #{i + 1} ({table.get('type', '?')}): "
                             + (f"missing {', '.join(missing)}" if missing else f"unknown keys {', '.join(unknown)}"))
        row = Instance(origin=origin, **table)
        if row.nic_gbps <= 0 or row.on_demand_usd_h < 0 or row.spot_usd_h < 0 or row.vcpus <= 0:
            raise ValueError(f"{origin}: {row.type}: nic_gbps and vcpus must be positive, prices not negative")
        if not re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", str(row.date)):
            raise ValueError(f"{origin}: {row.type}: date {row.date!r}: the month the prices are of, YYYY-MM")
        if row.checked != "no" and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(row.checked)):
            raise ValueError(f"{origin}: {row.type}: checked {row.checked!r}: the day the row was compared with "
                             "its source page (YYYY-MM-DD), or \"no\"")
        rows.append(row)
    return rows


def load(extra: Iterable[str] = ()) -> PriceBook:
    """The shipped book, then the rows of each file in `extra` (replacing rows of the same type)."""
    rows: List[Instance] = []
    shipped = resources.files(__package__) / "prices"
    for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            rows += _rows(entry.read_text(), f"collectives/report/prices/{entry.name}")
    for path in extra:
        rows += _rows(Path(path).read_text(), str(path))
    return PriceBook(rows)

"""Which kernel runs a layer at a given M: the crossover table `tools/bench_cuda.py` measured, stored here.

A table maps "out,in" shapes and a mode to [[m_max, kernel], ...] in increasing m_max (null = no bound): the
first entry with M <= m_max wins. Shapes the table has not measured take its "default" row.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

KERNELS = ("bf16", "fp8", "fp8_scaled_mm")
# Without a measured table: the byte-once 16-bit kernels while the weight read dominates, then the expanded
# codes through torch._scaled_mm (faster than the in-loop fp8 kernel at every shape measured so far).
FALLBACK = [[64, "bf16"], [None, "fp8_scaled_mm"]]
TABLE_NAME = "crossover.json"


def check_rows(rows, where: str) -> list:
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: expected a non-empty list of [m_max, kernel], got {rows!r}")
    last = 0
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2 and row[1] in KERNELS):
            raise ValueError(f"{where}[{i}]: expected [m_max, one of {', '.join(KERNELS)}], got {row!r}")
        m_max = row[0]
        if m_max is None:
            if i != len(rows) - 1:
                raise ValueError(f"{where}[{i}]: only the last row may have no bound (null)")
        elif not isinstance(m_max, int) or isinstance(m_max, bool) or m_max <= last:
            raise ValueError(f"{where}[{i}]: m_max must be an int above {last}, got {m_max!r}")
        else:
            last = m_max
    if rows[-1][0] is not None:
        raise ValueError(f"{where}: the last row must have m_max null so every M has a kernel")
    return rows


def pick(rows: list, m: int) -> str:
    for m_max, kernel in rows:
        if m_max is None or m <= m_max:
            return kernel
    raise AssertionError("check_rows guarantees an unbounded last row")


def crossover_rows(timings: dict[int, dict[str, float]]) -> list:
    """[[m_max, kernel], ...] from {M: {kernel: ms}}: the fastest kernel at each measured M covers the Ms up to
    it; runs of one kernel merge; past the largest M the last winner holds."""
    rows: list = []
    for m in sorted(timings):
        ok = {k: t for k, t in timings[m].items() if k in KERNELS and t is not None}
        if not ok:
            continue
        best = min(ok, key=ok.get)
        if rows and rows[-1][1] == best:
            rows[-1][0] = m
        else:
            rows.append([m, best])
    if not rows:
        raise ValueError("no kernel timings to build a crossover table from")
    rows[-1][0] = None
    return rows


class Table:
    def __init__(self, data: dict):
        self.default = check_rows(data.get("default", FALLBACK), "default")
        self.shapes = {}
        for shape, modes in data.get("shapes", {}).items():
            for mode, rows in modes.items():
                self.shapes[(shape, mode)] = check_rows(rows, f"shapes[{shape!r}][{mode!r}]")

    def rows(self, out_features: int, in_features: int, mode: str) -> list:
        return self.shapes.get((f"{out_features},{in_features}", mode), self.default)

    def kernel(self, out_features: int, in_features: int, mode: str, m: int) -> str:
        return pick(self.rows(out_features, in_features, mode), m)


_INSTALLED: list = []  # a table installed for this process (the benchmark, once it has measured one)


@lru_cache(maxsize=1)
def _packaged_table() -> Table:
    try:
        text = resources.files(__package__).joinpath(TABLE_NAME).read_text()
    except FileNotFoundError:
        return Table({})
    return Table(json.loads(text))


def measured_table() -> Table:
    """The installed table, else the packaged one, else the fallback rule (16-bit kernels to M = 64, expanded
    fp8 above)."""
    return _INSTALLED[0] if _INSTALLED else _packaged_table()


def install(data: dict | None) -> None:
    """Dispatch by `data` (a table as crossover.json holds it, checked first) in this process from now on;
    None goes back to the packaged table. `tools/bench_cuda.py` installs what it has just measured."""
    table = None if data is None else Table(data)
    _INSTALLED[:] = [] if table is None else [table]

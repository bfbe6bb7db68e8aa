"""A Markdown report a person can read without running anything.

A report is a title, a list of sections (text, tables, figures) and the run's provenance
(command, versions, files, seeds ...). Figures are linked by paths relative to the report, so the
report and its PNGs can be moved together.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..utils import atomic_write

__all__ = ["write_report", "fom_table", "format_value"]

#: figure-of-merit columns of :func:`fom_table`, with their headers
FOM_COLUMNS = (
    ("k_10pct", "k(|P/P_ref-1|<=0.1)"),
    ("k_30pct", "k(|P/P_ref-1|<=0.3)"),
    ("k_r09", "k(r>=0.9)"),
    ("k_r07", "k(r>=0.7)"),
)


def format_value(value, fmt: str = ".4g") -> str:
    """A table cell: floats with ``fmt``, arrays summarised, everything else ``str``."""
    if isinstance(value, (float, np.floating)):
        return format(float(value), fmt)
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, np.ndarray):
        if value.size <= 6:
            return "[" + ", ".join(format_value(v, fmt) for v in value.ravel()) + "]"
        return f"array{value.shape}"
    if isinstance(value, (list, tuple)) and len(value) <= 6:
        return "[" + ", ".join(format_value(v, fmt) for v in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def fom_table(foms: Mapping[str, Mapping]) -> dict:
    """Figures-of-merit table: one row per map, the four headline k values (h/Mpc).

    Parameters
    ----------
    foms : mapping of label to dict
        Outputs of :func:`.metrics.figures_of_merit`, e.g. ``{"JERALD": ..., "FastPM": ...}``.

    Returns
    -------
    dict with ``columns`` and ``rows``, for a section's ``table``.
    """
    columns = ["map"] + [header + " [h/Mpc]" for _, header in FOM_COLUMNS]
    rows = [[label] + [fom[key] for key, _ in FOM_COLUMNS] for label, fom in foms.items()]
    return {"columns": columns, "rows": rows}


def _table_lines(table, fmt: str) -> list[str]:
    if isinstance(table, Mapping) and "columns" in table:
        columns = list(table["columns"])
        rows = [list(r) for r in table["rows"]]
    elif isinstance(table, Mapping):  # {row label: {column: value}}
        columns = ["", *dict.fromkeys(c for row in table.values() for c in row)]
        rows = [[label, *(row.get(c, "") for c in columns[1:])] for label, row in table.items()]
    else:  # sequence of dicts
        table = list(table)
        columns = list(dict.fromkeys(c for row in table for c in row))
        rows = [[row.get(c, "") for c in columns] for row in table]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(
                f"report table row {row} has {len(row)} cells, expected {len(columns)}"
            )
    lines = ["| " + " | ".join(format_value(c, fmt) for c in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(format_value(v, fmt) for v in row) + " |" for row in rows]
    return lines


def _figure_link(fig, report_dir: Path) -> str:
    caption, target = fig if isinstance(fig, (tuple, list)) else (Path(fig).stem, fig)
    target = Path(target)
    try:
        rel = os.path.relpath(target.resolve(), report_dir.resolve())
    except ValueError:  # another drive on Windows
        rel = str(target)
    return f"![{caption}]({Path(rel).as_posix()})"


def write_report(
    path,
    sections: Sequence[Mapping],
    title: str = "JERALD report",
    provenance: Mapping | None = None,
    fmt: str = ".4g",
) -> Path:
    """Write a Markdown report.

    Parameters
    ----------
    path : str or Path
        Output ``.md`` file (written atomically).
    sections : sequence of dict
        Each with ``title`` and any of:

        * ``text``: a paragraph (Markdown);
        * ``table``: ``{"columns": [...], "rows": [[...], ...]}``, a list of dicts (one per row),
          or ``{row label: {column: value}}`` -- e.g. :func:`fom_table`;
        * ``tables``: a list of such tables;
        * ``figures``: PNG paths, or ``(caption, path)`` pairs, linked relative to the report.
    title : str
    provenance : mapping, optional
        What produced the numbers (command line, package versions, input files, seeds, device);
        written as a final table with the report's creation time.
    fmt : str
        Format of floating-point cells.

    Returns
    -------
    Path of the report.
    """
    path = Path(path)
    report_dir = path.parent
    lines = [f"# {title}", ""]
    for i, sec in enumerate(sections):
        if "title" not in sec:
            raise ValueError(f"report section {i} has no 'title'")
        lines += [f"## {sec['title']}", ""]
        if sec.get("text"):
            lines += [str(sec["text"]).strip(), ""]
        tables = list(sec.get("tables", []))
        if sec.get("table") is not None:
            tables.insert(0, sec["table"])
        for table in tables:
            lines += _table_lines(table, fmt) + [""]
        for fig in sec.get("figures", []):
            lines += [_figure_link(fig, report_dir), ""]
    prov = dict(provenance or {})
    prov.setdefault("report written", datetime.datetime.now().isoformat(timespec="seconds"))
    lines += ["## Provenance", ""]
    lines += _table_lines({"columns": ["item", "value"], "rows": list(prov.items())}, fmt) + [""]
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(lines))
    return path

"""MkDocs hook: the results page, generated from the JSON files under benchmarks/results/.

A *record* is a JSON object with `title`, `group`, `command`, `date`, `machine`, an optional
`note`, and either `tables` (each with `columns` and `rows`, and optionally its own `caption`,
`command`, `date` and `machine`) or `seed_study`: the name of a study's file, shown here per exit
and budget: the `summary.json` that `boostpipe study` writes. Every other JSON file under
benchmarks/results/ must be such a study, named by one record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "<!-- results -->"
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
GROUPS = ("accuracy", "cost and speed")
PROVENANCE = ("command", "date", "machine")


def _cell(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def load(folder: Path = RESULTS) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(records, studies) by file name; raises on a file that is neither, or a study no record
    names, so a result cannot sit in the folder without reaching the page."""
    records, studies = {}, {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        (records if "title" in data else studies)[path.name] = data
    for name, record in records.items():
        missing = [key for key in ("group", *PROVENANCE) if not record.get(key)]
        if missing or record["group"] not in GROUPS:
            raise ValueError(f"{name}: needs {', '.join(missing) or 'a known group'}")
        if "seed_study" in record and record["seed_study"] not in studies:
            raise ValueError(f"{name}: seed_study {record['seed_study']} not found")
    named = {record.get("seed_study") for record in records.values()}
    if unnamed := sorted(set(studies) - named):
        raise ValueError(f"no record names {', '.join(unnamed)}")
    return records, studies


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _summary(summary: dict[str, Any]) -> list[str]:
    """A `boostpipe study` summary as it wrote it: per row, each variant's mean +- sd, and each
    later variant's paired difference from the first with its interval and verdict."""
    rows = summary["rows"]
    variants = list(rows[0]["mean"])
    columns = ["test top-1 (%)", *variants]
    for variant in variants[1:]:
        columns += [f"{variant} - {variants[0]} [95 % CI]", "verdict"]
    lines = []
    for row in rows:
        cells = [row["name"].replace("_", " ")]
        cells += [f"{row['mean'][v]:.2f} ± {row['sd'][v]:.2f}" for v in variants]
        for v in variants[1:]:
            cells += [
                f"{row['diff'][v]:+.2f} [{row['low'][v]:+.2f}, {row['high'][v]:+.2f}]",
                row["verdict"][v],
            ]
        lines.append(cells)
    sets = summary.get("set", "-")
    note = f"Mean ± sd over {summary['seeds']} seeds; paired by seed (Student's t). Set: `{sets}`."
    return [*_table(columns, lines), note, ""]


def _provenance(item: dict[str, Any], defaults: dict[str, Any], source: str) -> str:
    given = {key: item.get(key, defaults[key]) for key in PROVENANCE}
    return (
        f"**Command:** `{given['command']}` · **Date:** {given['date']} · "
        f"**Machine:** {given['machine']} · **Source:** `benchmarks/results/{source}`"
    )


def render(folder: Path = RESULTS) -> str:
    records, studies = load(folder)
    index = []
    body = []
    for group in GROUPS:
        body += [f"## {group.capitalize()}", ""]
        for name, record in records.items():
            if record["group"] != group:
                continue
            body += [f"### {record['title']}", ""]
            if record.get("note"):
                body += [record["note"], ""]
            body += [_provenance(record, record, name), ""]
            index.append([record["title"], *(record[k] for k in PROVENANCE), name])
            if "seed_study" in record:
                body += _summary(studies[record["seed_study"]])
                body += [f"Runs: `benchmarks/results/{record['seed_study']}`.", ""]
            for table in record.get("tables", []):
                if table.get("caption"):
                    body += [f"*{table['caption']}*", ""]
                if any(key in table for key in PROVENANCE):  # measured apart from the rest
                    body += [_provenance(table, record, name), ""]
                    title = f"{record['title']}: {table.get('caption', '')}".rstrip(": ")
                    index.append([title, *(table.get(k, record[k]) for k in PROVENANCE), name])
                body += _table(table["columns"], table["rows"])
    index_lines = _table(["result", "command", "date", "machine", "file"], [
        [title, f"`{command}`", date, machine, f"`{file}`"]
        for title, command, date, machine, file in index
    ])  # fmt: skip
    return "\n".join(["## Index", "", *index_lines, *body])


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown

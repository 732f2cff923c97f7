"""Report file formats: rows in, a CSV or XLSX file out, in constant memory."""

import csv
import datetime
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from pathlib import Path

import xlsxwriter

# A spreadsheet treats a cell starting with one of these as a formula (CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# One row of an XLSX sheet is the header.
XLSX_MAX_DATA_ROWS = 1_048_575


class TooManyRows(Exception):
    def __init__(self, rows: int, limit: int):
        super().__init__(f"{rows} rows do not fit in one sheet (at most {limit})")


Progress = Callable[[int], None]


def _csv_cell(value: object) -> object:
    if isinstance(value, str):
        return "'" + value if value.startswith(FORMULA_PREFIXES) else value
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence], *, every: int, on_progress: Progress) -> int:
    """Write header and rows as UTF-8 CSV; call on_progress(rows_written) every `every` rows. Returns the row count."""
    written = 0
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_csv_cell(value) for value in row])
            written += 1
            if written % every == 0:
                on_progress(written)
    return written


def _xlsx_cell(value: object) -> object:
    if isinstance(value, Decimal):
        # Excel stores numbers as doubles; report amounts have two decimals and fit exactly enough.
        return float(value)
    return value


def write_xlsx(
    path: Path, header: Sequence[str], rows: Iterable[Sequence], *, every: int, on_progress: Progress
) -> int:
    """Write header and rows to one sheet, flushing each row to disk; on_progress as in write_csv."""
    workbook = xlsxwriter.Workbook(
        str(path),
        {
            # Each row goes to a temporary file as soon as it is complete: memory stays flat.
            "constant_memory": True,
            # Cells are data, never formulas or links, whatever text they hold.
            "strings_to_formulas": False,
            "strings_to_urls": False,
            "strings_to_numbers": False,
            "remove_timezone": True,
            "default_date_format": "yyyy-mm-dd hh:mm:ss",
            # Row data spills next to the output, so the caller's temporary directory cleans it up.
            "tmpdir": str(path.parent),
        },
    )
    sheet = workbook.add_worksheet("Report")
    sheet.write_row(0, 0, header, workbook.add_format({"bold": True}))
    written = 0
    for row in rows:
        if written == XLSX_MAX_DATA_ROWS:
            raise TooManyRows(written + 1, XLSX_MAX_DATA_ROWS)
        written += 1
        sheet.write_row(written, 0, [_xlsx_cell(value) for value in row])
        if written % every == 0:
            on_progress(written)
    # Only a complete sheet is assembled: after a failure (a time limit) the half-written
    # workbook is abandoned with its temporary directory instead of zipped for nothing.
    workbook.close()
    return written


WRITERS = {"csv": write_csv, "xlsx": write_xlsx}

"""Tables of examples for training and evaluation: read from a file or a DataFrame, checked once.

Both ``sage finetune train --data FILE`` and ``sage eval FILE`` (and their notebook twins, which pass a
pandas DataFrame) start from a table whose columns the person names. Reading and column checks live here,
so that a missing column or an empty cell is the same clear error whatever face the table came from, and
before anything slow starts. Only the standard library is used for .csv and .jsonl; .parquet goes through
pandas (and its pyarrow engine) imported when such a file is read.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import NotFound, SageError

SUFFIXES = (".csv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Table:
    """Records (one dict per row) and the column names, with where they came from for error messages."""

    source: str
    columns: tuple[str, ...]
    records: tuple[Mapping[str, Any], ...]

    def column(self, name: str, option: str) -> list[Any]:
        """The values of column ``name``, or an error naming the option that chose it and the columns there are."""
        if name not in self.columns:
            raise SageError(
                f"{self.source} has no column {name!r} (its columns: {', '.join(self.columns) or 'none'}). "
                f"Name the right one with {option} COLUMN."
            )
        return [record.get(name) for record in self.records]


def read_table(path: str | Path) -> Table:
    """A .csv (header row), .jsonl (one object a line) or .parquet file as a :class:`Table`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise NotFound(f"The data file {file} does not exist. Give a .csv, .jsonl or .parquet file.")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            records = tuple(reader)
            return Table(str(file), tuple(reader.fieldnames or ()), records)
    if suffix == ".jsonl":
        records_list: list[Mapping[str, Any]] = []
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise SageError(f"{file} line {number} is not JSON ({error}). Fix that line.") from None
                if not isinstance(record, dict):
                    raise SageError(f"{file} line {number} is not a JSON object. Each line must be one row.")
                records_list.append(record)
        return Table(str(file), _columns(records_list), tuple(records_list))
    if suffix == ".parquet":
        try:
            import pandas as pd

            frame = pd.read_parquet(file)
        except ImportError as error:
            raise SageError(f"Reading {file} needs pandas with pyarrow ({error}). Install them with "
                            "`pip install pandas pyarrow`, or convert the file to .csv or .jsonl.") from None
        return from_dataframe(frame, str(file))
    raise SageError(f"{file} is a {suffix or 'suffix-less'} file; the data must be .csv, .jsonl or .parquet.")


def from_dataframe(frame: Any, source: str = "The DataFrame") -> Table:
    """A pandas DataFrame (or anything with ``columns`` and ``to_dict("records")``) as a :class:`Table`."""
    if not hasattr(frame, "columns") or not hasattr(frame, "to_dict"):
        raise SageError(f"{source} is a {type(frame).__name__}, not a DataFrame. Pass a pandas DataFrame.")
    return Table(source, tuple(str(c) for c in frame.columns), tuple(frame.to_dict("records")))


def from_records(records: Iterable[Mapping[str, Any]], source: str = "The rows") -> Table:
    """A list of dicts as a :class:`Table` (the API's plain-Python input)."""
    rows = tuple(records)
    return Table(source, _columns(rows), rows)


def _columns(records: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    return tuple(seen)


def is_missing(value: Any) -> bool:
    """True for None, NaN (pandas' empty cell) and blank strings."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and not value.strip()


def require_pandas() -> Any:
    """pandas, or one paragraph saying how to get it (it is the notebook extra, not a core dependency)."""
    try:
        import pandas
    except ImportError:
        raise SageError("A DataFrame needs pandas: `pip install -e '.[notebook]'` in the sage_magic checkout "
                        "(or `pip install pandas`).") from None
    return pandas

"""Records from tables: a Parquet file, or a ``datasets`` dataset saved with ``save_to_disk``
(what TRL users bring), beside JSONL, behind one reader with one bad-record policy.

:func:`read_records` picks the reader by the path: a directory is a saved dataset, a
``*.parquet`` file is Parquet, anything else is JSONL (:func:`policy_trainer.data.read_jsonl`).
A table's records are numbered by row, from 1, where JSONL's are numbered by line; errors and
the bad-line policy are otherwise the same. The libraries are optional: ``datasets`` (which
brings ``pyarrow``) is imported only when a table is read, and its absence is one line saying
what to install.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

from policy_trainer.data import BadLinePolicy, RecordFile, read_jsonl
from policy_trainer.errors import UserError

TABLE_ROWS_PER_BATCH = 1024
TABLE_LIBRARY_HINT = "pip install datasets (it brings pyarrow)"


def read_records(path: str | Path, parse: Callable[[dict, int], object],
                 on_bad: BadLinePolicy = "skip", hint: str = "") -> RecordFile:
    """Records from a JSONL file, a Parquet file (``*.parquet``) or a directory holding a
    ``datasets`` dataset saved with ``save_to_disk``: the same ``parse`` and bad-line policy
    for all; a table's records are numbered by row (from 1) instead of line."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        return read_table(path, parse, on_bad, hint)
    return read_jsonl(path, parse, on_bad, hint)


def read_table(path: Path, parse: Callable[[dict, int], object], on_bad: BadLinePolicy,
               hint: str) -> RecordFile:
    """Every row of a Parquet file or saved dataset through ``parse(row, n)``. A null cell is an
    absent key (a column exists in every row of a table, filled with nulls where a record
    lacks it), so a row parses as the JSON object it came from."""
    result = RecordFile(str(path), on_bad, hint, unit="row")
    for n, row in enumerate(_table_rows(path), start=1):
        result.lines += 1
        try:
            result.records.append(parse({k: v for k, v in row.items() if v is not None}, n))
        except ValueError as e:
            result.add_bad(n, str(e))
    result.sha256 = _sha256_of(path)
    result.enforce()
    return result


def _table_rows(path: Path) -> Iterator[dict]:
    """The rows of a table as dicts of Python values, in order, a batch at a time."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_file():  # Parquet: read with pyarrow (datasets' own reader), no cache written
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading Parquet needs pyarrow: "
                            f"{TABLE_LIBRARY_HINT}") from None
        try:
            batches = pq.ParquetFile(path).iter_batches(TABLE_ROWS_PER_BATCH)
        except Exception as e:  # pyarrow.ArrowInvalid and friends: not a Parquet file
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        for batch in batches:
            yield from batch.to_pylist()
        return
    dataset = _load_saved_dataset(path)
    for batch in dataset.iter(batch_size=TABLE_ROWS_PER_BATCH):  # a dict of columns
        for values in zip(*batch.values()):
            yield dict(zip(batch, values))


def _load_saved_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} is a directory: reading a saved dataset needs the datasets "
                        f"library: {TABLE_LIBRARY_HINT}") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: a directory, but not a dataset saved by `datasets` "
                        "(save_to_disk); give a JSONL or Parquet file, or such a directory"
                        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            splits = ", ".join(str(path / name) for name in loaded)
            raise UserError(f"{path} holds a DatasetDict with splits {sorted(loaded)}: pass one "
                            f"split's directory ({splits})")
        [loaded] = loaded.values()
    return loaded


def _sha256_of(path: Path) -> str:
    """Of a file's bytes, or of every file under a directory (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()

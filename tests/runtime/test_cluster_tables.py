"""The combined particle table of ``latticewatch batch``: rebuilt from the per-frame tables, never a row twice."""

import csv

import pytest

from latticewatch.runtime.scaleout import combine_tables, expand_sources
from latticewatch.sinks.reports import CSV_COLUMNS


def _frame_table(out, name, regions):
    with open(out / f"{name}_particles.csv", "w", newline="") as fh:  # as `write_reports` writes it
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({"frame_id": name, "region_id": i, "area_nm2": 1.5 * i} for i in range(regions))


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_combined_table_holds_each_row_once_whatever_ran_before(tmp_path):
    _frame_table(tmp_path, "a", 2)
    _frame_table(tmp_path, "b", 0)
    _frame_table(tmp_path, "c", 3)
    table, _ = combine_tables(tmp_path)
    _frame_table(tmp_path, "a", 2)  # a frame analysed again rewrites its own table
    table, _ = combine_tables(tmp_path)
    rows = _rows(table)
    assert [(r["frame_id"], r["region_id"]) for r in rows] == [("a", "0"), ("a", "1"), ("c", "0"), ("c", "1"),
                                                                ("c", "2")]
    assert list(rows[0]) == CSV_COLUMNS


def test_no_frame_gives_a_header_only_table(tmp_path):
    table, _ = combine_tables(tmp_path)
    assert table.read_text().splitlines() == [",".join(CSV_COLUMNS)]


def test_the_parquet_copy_holds_the_same_rows(tmp_path):
    parquet = pytest.importorskip("pyarrow.parquet", reason="pyarrow is optional: the Parquet copy needs it")
    _frame_table(tmp_path, "a", 2)
    _frame_table(tmp_path, "c", 1)
    table, path = combine_tables(tmp_path)
    data = parquet.read_table(path)
    assert data.column_names == CSV_COLUMNS
    assert data.column("frame_id").to_pylist() == [r["frame_id"] for r in _rows(table)]
    assert data.column("area_nm2").to_pylist() == [0.0, 1.5, 0.0]


def test_folders_become_their_micrographs_and_files_stay(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.mrc", "a.tif", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"")
    single = tmp_path / "x.mrc"
    assert expand_sources([tmp_path / "d", single, tmp_path / "d" / "a.tif"]) == [
        tmp_path / "d" / "a.tif", tmp_path / "d" / "b.mrc", single]

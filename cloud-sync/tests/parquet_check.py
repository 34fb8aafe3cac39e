#!/usr/bin/env python3
"""Open a cloud-sync dataset snapshot with pyarrow, pandas, polars and DuckDB.

Usage: parquet_check.py DATASETS_DIR DATASET_ID

DATASETS_DIR is the local dataset store (`[datasets] dir`); the manifest is
`manifests/<id>.json` and names each Parquet file. For every file this
checks the sha256 against the manifest, then opens it with every library
that is installed (pyarrow is required; pandas, polars and duckdb are
optional) without any conversion, and prints row counts and column types.
Exits non-zero if a count or a logical type differs from the manifest.

Not run by `cargo test` (it needs Python); see docs/datasets.md.
"""

import hashlib
import json
import pathlib
import sys


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    root = pathlib.Path(sys.argv[1])
    dataset_id = sys.argv[2]
    manifest = json.loads((root / "manifests" / f"{dataset_id}.json").read_text())
    failures = []

    import pyarrow
    import pyarrow.parquet as pq

    for entry in manifest["content"]["files"]:
        path = root / entry["path"]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            failures.append(f"{path}: sha256 differs from the manifest")
            continue
        table = pq.read_table(path)
        print(f"{entry['table']}: {path.name}")
        print(f"  pyarrow  rows={table.num_rows} schema: " + ", ".join(
            f"{f.name}:{f.type}" for f in table.schema))
        if table.num_rows != entry["rows"]:
            failures.append(f"pyarrow: {table.num_rows} rows, manifest {entry['rows']}")
        for column in entry["columns"]:
            field = table.schema.field(column["name"])
            if column["type"] == "list<float64>":
                # Element field name and nullability are not part of the type.
                if not (pyarrow.types.is_list(field.type)
                        and field.type.value_type == pyarrow.float64()):
                    failures.append(f"{column['name']}: pyarrow type {field.type}, expected list<double>")
                continue
            want = {
                "string": pyarrow.string(),
                "int64": pyarrow.int64(),
                "float64": pyarrow.float64(),
                "bool": pyarrow.bool_(),
                "timestamp[ms, UTC]": pyarrow.timestamp("ms", tz="UTC"),
            }[column["type"]]
            if field.type != want:
                failures.append(f"{column['name']}: pyarrow type {field.type}, expected {want}")

        try:
            import pandas
        except ImportError:
            print("  pandas   not installed")
        else:
            frame = pandas.read_parquet(path)
            print(f"  pandas   rows={len(frame)} dtypes: " + ", ".join(
                f"{k}:{v}" for k, v in frame.dtypes.items()))
            if len(frame) != entry["rows"]:
                failures.append(f"pandas: {len(frame)} rows")

        try:
            import polars
        except ImportError:
            print("  polars   not installed")
        else:
            frame = polars.read_parquet(path)
            print(f"  polars   rows={frame.height} schema: " + ", ".join(
                f"{k}:{v}" for k, v in frame.schema.items()))
            if frame.height != entry["rows"]:
                failures.append(f"polars: {frame.height} rows")

        try:
            import duckdb
        except ImportError:
            print("  duckdb   not installed")
        else:
            con = duckdb.connect()
            (count,) = con.execute(
                "SELECT count(*) FROM read_parquet(?)", [str(path)]).fetchone()
            types = con.execute(
                "DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
            print(f"  duckdb   rows={count} types: " + ", ".join(
                f"{name}:{kind}" for name, kind, *_ in types))
            if count != entry["rows"]:
                failures.append(f"duckdb: {count} rows")

    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

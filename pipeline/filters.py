"""Metadata filters: a SQL boolean expression over the metadata columns, evaluated by DuckDB.

    punsafe < 0.1 and aesthetic >= 6
    caption ilike '%flag%' and not (pwatermark > 0.5)
    aesthetic >= q(0.9)                  -- q(p): the column's p-quantile over the same table

The expression is DuckDB's own SQL (no parser of ours); the one rewrite is `column OP q(p)` into a
quantile subquery, as the paper filters by aesthetic quantiles. Used at index build (`index.where`),
by the neighbours stage (`neighbours.where`) and at search and sampling (`--where`).
"""
from __future__ import annotations

import re

import numpy as np

from pipeline.files import UsageError

QUANTILE = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<>|!=|<|>|=)\s*q\(\s*([0-9]*\.?[0-9]+)\s*\)")


def expand_quantiles(where: str) -> str:
    """`aesthetic >= q(0.9)` -> `aesthetic >= (SELECT quantile_cont(aesthetic, 0.9) FROM items)`."""
    return QUANTILE.sub(lambda m: f"{m[1]} {m[2]} (SELECT quantile_cont({m[1]}, {m[3]}) FROM items)", where)


def matching_rows(source, where: str, what: str) -> np.ndarray:
    """Sorted values of the `row` column where `where` holds (NULL counts as false). `source`: a
    pyarrow Table, or a list of Parquet files that DuckDB scans itself (bounded memory at any n).

    A bad expression (unknown column, type mismatch, syntax) is a UsageError naming `what`, DuckDB's
    reason and the known columns."""
    import duckdb

    con = duckdb.connect()
    try:
        if isinstance(source, (list, tuple)):  # shards whose extra columns are all NULL read as NULL-typed: unify
            con.execute("CREATE TABLE items AS SELECT * FROM read_parquet(?, union_by_name = true)",
                        [[str(p) for p in source]])
        else:
            con.register("items", source)
        # The expression is the user's SQL: one SELECT, and no file or network access from inside it.
        con.execute("SET enable_external_access = false")
        columns = [d[0] for d in con.execute("SELECT * FROM items LIMIT 0").description if d[0] != "row"]
        query = f"SELECT row FROM items WHERE ({expand_quantiles(where)}) ORDER BY row"
        try:
            if len(duckdb.extract_statements(query)) != 1:
                raise UsageError(f"{what} {where!r} is not one boolean expression: remove the ';' and what follows")
            result = con.execute(query).fetchnumpy()
        except duckdb.Error as e:
            reason = str(e).splitlines()[0]
            raise UsageError(f"{what} {where!r} cannot be evaluated: {reason}. Known columns: {', '.join(columns)}") from None
    finally:
        con.close()
    return np.asarray(result["row"], dtype=np.int64)


def check_where(schema, where: str, what: str) -> None:
    """Evaluate `where` over an empty table of `schema` (a pyarrow.Schema with a `row` column): finds
    unknown columns and syntax errors before anything is written."""
    matching_rows(schema.empty_table(), where, what)


def check_where_on_embed(embed_dir, where: str, what: str) -> None:
    """`check_where` against an embed folder's metadata columns (the stages' up-front check)."""
    from pipeline.embeddings import metadata_schema
    from pipeline.files import read_json

    check_where(metadata_schema(embed_dir, read_json(embed_dir / "manifest.json")), where, what)


def row_mask(rows: np.ndarray, size: int) -> np.ndarray:
    """bool [size]: True at `rows`."""
    mask = np.zeros(size, bool)
    mask[rows[rows < size]] = True
    return mask

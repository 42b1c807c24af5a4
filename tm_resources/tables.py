"""Reading the request log and replacing one hour of a loop table, as the loop's assets do."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from psycopg.types.json import Jsonb

# The loop reads only model calls; a models listing leaves a row but is no task.
COMPLETION_ENDPOINTS = ("/v1/chat/completions", "/chat/completions", "/v1/messages")


def _clean(v: Any) -> Any:
    # pandas hands NaN / NA for missing values and numpy scalars for the rest; Postgres wants NULL,
    # Python values, and dicts as jsonb.
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, dict):
        return Jsonb(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.generic):
        v = v.item()
        return None if isinstance(v, float) and math.isnan(v) else v
    if isinstance(v, pd.Timestamp):
        return v.to_pydatetime()
    return v


def replace_hour(conn: psycopg.Connection, table: str, hour: datetime, columns: Sequence[str],
                 rows: Iterable[Sequence[Any]]) -> int:
    """Delete `table`'s rows for `hour` and write `rows` in their place, in one transaction."""
    n = 0
    with conn.transaction():
        conn.execute(f"DELETE FROM {table} WHERE hour = %s", (hour,))
        with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row([_clean(v) for v in r])
                n += 1
    return n


def replace_hour_df(conn: psycopg.Connection, table: str, hour: datetime, df: pd.DataFrame,
                    columns: Sequence[str]) -> int:
    """`replace_hour` from a DataFrame; `hour` is added as the first column."""
    data = df[list(columns)].itertuples(index=False, name=None)
    return replace_hour(conn, table, hour, ["hour", *columns], ((hour, *r) for r in data))


def read_requests(conn: psycopg.Connection, start: datetime, end: datetime, columns: Sequence[str]) -> pd.DataFrame:
    """Model-call rows with `start <= ts < end`, oldest first."""
    cur = conn.execute(
        f"SELECT {', '.join(columns)} FROM requests WHERE ts >= %s AND ts < %s AND endpoint = ANY(%s)"
        " ORDER BY ts, id",
        (start, end, list(COMPLETION_ENDPOINTS)),
    )
    return pd.DataFrame(cur.fetchall(), columns=list(columns))


def read_df(conn: psycopg.Connection, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
    cur = conn.execute(sql, params)
    cols = [d.name for d in cur.description or ()]
    return pd.DataFrame(cur.fetchall(), columns=cols)


def vectors(values: Iterable[Any], dim: int) -> np.ndarray:
    """Stack vector column values (pgvector's Vector, arrays or lists) into an (n, dim) float32 matrix."""
    rows = [v.to_numpy() if hasattr(v, "to_numpy") else np.asarray(v) for v in values]
    return np.stack(rows).astype(np.float32, copy=False) if rows else np.empty((0, dim), dtype=np.float32)

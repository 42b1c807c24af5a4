"""Which logged rows are escalations: the one definition the loop's patterns, grades and re-prompt signal share.

A cascade or consensus leaves one row per attempt (tm_gateway/stages/cascade.py): every cheap attempt whose
answer did not go out has `served = false`, and the attempts form a chain by parent_id ending at the client's
row (`served = true`). A chain alone does not mean an escalation: an agreed consensus chains its partners'
rows to the client's row too, and the client got the first cheap model's answer. So a request escalated when
the row SERVED to the client has a parent chain and the cascade stage marked it as answered by the escalation
model (route_reason "...; escalated: <why>", written with ESCALATED below). Not escalations: a cascade whose
cheap answer passed (no chain), an agreed consensus (served by the cheap model), the unserved attempts
themselves, and a request a routing rule sent straight to the frontier (`route` rule:escalate:<type>: a
routing decision, with no cheaper attempt that was refused).

Before this module the loop counted any row with a parent_id, or whose `route` said "escalat", as one: an
agreed consensus counted as escalated (its partner as "escalated away"), and so did every request an escalate
rule routed, which also dropped those requests from the grades' requests_today.
"""

from __future__ import annotations

import pandas as pd

# The cascade stage's mark on the client's row of an escalated request, after the route's own reason.
ESCALATED = "escalated: "
_MARK = "; " + ESCALATED


def _named_as_parent(df: pd.DataFrame) -> pd.Series:
    if "parent_id" not in df or "id" not in df:
        return pd.Series(False, index=df.index)
    parents = set(df.loc[df["parent_id"].notna(), "parent_id"].astype(str))
    return df["id"].astype(str).isin(parents)


def served(df: pd.DataFrame) -> pd.Series:
    """Rows whose answer went to the client: exactly one per request. Read from the `served` column; a frame
    without it (built by hand) takes every row that no other row names as its parent_id, the same rows for
    anything the gateway writes."""
    if "served" in df:
        return df["served"].astype("boolean").fillna(True).astype(bool)
    return ~_named_as_parent(df)


def escalated(df: pd.DataFrame) -> pd.Series:
    """Rows that are an escalated request's answer (see the module docstring): served, chained to the cheap
    attempts by parent_id, and marked by the cascade stage. A frame without route_reason (built by hand) counts
    every served row with a parent_id, which is what a plain cascade's chain means."""
    if "parent_id" not in df:
        return pd.Series(False, index=df.index)
    flag = served(df) & df["parent_id"].notna()
    if "route_reason" in df:
        flag &= df["route_reason"].astype("string").str.contains(_MARK, regex=False, na=False).astype(bool)
    return flag


def _parent_of(df: pd.DataFrame) -> dict[str, str]:
    return {str(i): str(p) for i, p in zip(df["id"], df["parent_id"], strict=True) if p is not None and not pd.isna(p)}


def escalated_away(df: pd.DataFrame) -> pd.Series:
    """The attempts an escalation replaced: every row on the parent chain of an escalated row. An agreed
    consensus's partner is not one (it agreed; the cheap answer it agreed with went out)."""
    out = pd.Series(False, index=df.index)
    if "parent_id" not in df or "id" not in df:
        return out
    parent_of, away = _parent_of(df), set()
    for p in df.loc[escalated(df), "parent_id"].astype(str):
        while p is not None and p not in away:
            away.add(p)
            p = parent_of.get(p)
    return df["id"].astype(str).isin(away)


def first_attempt(df: pd.DataFrame) -> pd.Series:
    """For each escalated row, the id of its chain's first cheap attempt (the answer the plan would have
    served: the cascade's cheap model, a consensus's first model), else NA. A chain that leaves the frame
    stops at the earliest attempt the frame can follow."""
    out = pd.Series(pd.NA, index=df.index, dtype="string")
    if "parent_id" not in df or "id" not in df:
        return out
    parent_of = _parent_of(df)
    for i, p in df.loc[escalated(df), "parent_id"].astype(str).items():
        seen = {p}
        while (up := parent_of.get(p)) is not None and up not in seen:
            seen.add(up)
            p = up
        out[i] = p
    return out

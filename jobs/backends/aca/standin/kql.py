"""KQL: the subset tuneops' queries use. Anything else is a 400, so a query the stand-in does not understand fails.

Semantics are the Kusto Query Language reference's (learn.microsoft.com/kusto/query): `let` statements, `union`
with isfuzzy ("union operator"), `where` with `==` (case-sensitive), `startswith`, `!startswith` ("startswith
operator": case-insensitive), `contains` (case-insensitive) and `contains_cs` ("String operators"), `project` with
renames, `top N by col [asc|desc]` ("top operator": desc by default), `order by`/`sort by` ("sort operator": desc
by default), `take`/`limit`. The tables and columns are the ones the stand-in writes (ArmService._console names
their sources)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_TOKEN_RE = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>\d+)|(?P<op>==|!=|=~|[(),;|=])|(?P<word>!?[A-Za-z_][\w.]*))')


class KqlError(ValueError):
    pass


def _tokens(query: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    query = query.strip()
    while pos < len(query):
        m = _TOKEN_RE.match(query, pos)
        if not m or m.end() == pos:
            raise KqlError(f"cannot parse query at {query[pos:pos + 20]!r}")
        pos = m.end()
        if m.group("str") is not None:
            out.append(("str", json.loads(m.group("str"))))
        elif m.group("num") is not None:
            out.append(("num", int(m.group("num"))))
        elif m.group("op") is not None:
            out.append(("op", m.group("op")))
        else:
            out.append(("word", m.group("word")))
        while pos < len(query) and query[pos].isspace():
            pos += 1
    return out


class _Kql:
    def __init__(self, query: str, tables: dict[str, list[dict]]):
        self.t = _tokens(query)
        self.i = 0
        self.tables = tables
        self.lets: dict[str, Any] = {}

    def peek(self, k=0):
        return self.t[self.i + k] if self.i + k < len(self.t) else ("eof", None)

    def take(self, kind=None, value=None):
        tok = self.peek()
        if (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            raise KqlError(f"expected {value or kind}, got {tok[1]!r}")
        self.i += 1
        return tok[1]

    def run(self) -> list[dict]:
        while self.peek() == ("word", "let"):
            self.take()
            name = self.take("word")
            self.take("op", "=")
            kind, value = self.peek()
            if kind not in ("str", "num"):
                raise KqlError("let supports literals only")
            self.take()
            self.lets[name] = value
            self.take("op", ";")
        rows = self.source()
        while self.peek() == ("op", "|"):
            self.take()
            rows = self.operator(rows)
        if self.peek()[0] != "eof":
            raise KqlError(f"unexpected {self.peek()[1]!r}")
        return rows

    def source(self) -> list[dict]:
        # A fuzzy union none of whose tables resolves is an error in Kusto (SEM0529, "union: must have at least one
        # operand..."); here it gives no rows. It cannot happen through the query endpoint, which always has the
        # _CL table (LogsService.logs_query).
        if self.peek() == ("word", "union"):
            self.take()
            fuzzy = False
            if self.peek() == ("word", "isfuzzy"):
                self.take()
                self.take("op", "=")
                fuzzy = self.take("word") == "true"
            rows = []
            while True:
                self.take("op", "(")
                rows += self.subquery(fuzzy)
                self.take("op", ")")
                if self.peek() != ("op", ","):
                    return rows
                self.take()
        return self.subquery(False)

    def subquery(self, fuzzy: bool) -> list[dict]:
        name = self.take("word")
        # A missing table fails the query unless the union is fuzzy, which drops the legs it cannot resolve ("union
        # operator", isfuzzy). The message is Kusto's (microsoft/finops-toolkit#1776: "'where' operator: Failed to
        # resolve table or column expression named 'Costs_v1_2'"), without the operator's name.
        if name not in self.tables and not fuzzy:
            raise KqlError(f"Failed to resolve table or column expression named '{name}'")
        rows = [dict(r) for r in self.tables.get(name, [])]
        while self.peek() == ("op", "|"):
            self.take()
            rows = self.operator(rows)
        return rows

    def value(self):
        kind, v = self.peek()
        self.take()
        if kind == "word":
            if v not in self.lets:
                raise KqlError(f"unknown name {v}")
            return self.lets[v]
        return v

    def operator(self, rows: list[dict]) -> list[dict]:
        op = self.take("word")
        if op == "where":
            conds = [self.condition()]
            while self.peek() == ("word", "and"):
                self.take()
                conds.append(self.condition())
            return [r for r in rows if all(c(r) for c in conds)]
        if op == "project":
            cols = []
            while True:
                name = self.take("word")
                src = name
                if self.peek() == ("op", "="):
                    self.take()
                    src = self.take("word")
                cols.append((name, src))
                if self.peek() != ("op", ","):
                    break
                self.take()
            return [{n: r.get(s) for n, s in cols} for r in rows]
        if op == "top":
            n = self.take("num")
            self.take("word", "by")
            col = self.take("word")
            desc = self.take("word") == "desc" if self.peek()[1] in ("asc", "desc") else True
            return sorted(rows, key=lambda r: r.get(col), reverse=desc)[:n]
        if op in ("order", "sort"):
            self.take("word", "by")
            col = self.take("word")
            desc = self.take("word") == "desc" if self.peek()[1] in ("asc", "desc") else True
            return sorted(rows, key=lambda r: r.get(col), reverse=desc)
        if op in ("take", "limit"):
            return rows[: self.take("num")]
        raise KqlError(f"operator {op!r} is not supported by the stand-in")

    def condition(self) -> Callable[[dict], bool]:
        col = self.take("word")
        kind, op = self.peek()
        self.take()
        want = self.value()
        if op == "==":
            return lambda r: r.get(col) == want
        if op == "startswith":
            return lambda r: str(r.get(col) or "").lower().startswith(str(want).lower())
        if op == "contains":
            return lambda r: str(want).lower() in str(r.get(col) or "").lower()
        if op == "!startswith":
            return lambda r: not str(r.get(col) or "").lower().startswith(str(want).lower())
        if op == "contains_cs":
            return lambda r: str(want) in str(r.get(col) or "")
        raise KqlError(f"comparison {op!r} is not supported by the stand-in")


def run_kql(query: str, tables: dict[str, list[dict]]) -> list[dict]:
    return _Kql(query, tables).run()


"""The SQL ceiling: the library's own statements driven straight from pgbench.

The scripts in `bench/pgbench/*.sql` name the library's queries instead of copying them:
`@query NAME` and `@fold NAME ...` lines are replaced, when the bench runs, by the named
query rendered for the bench's schema (`substrate_db._queries.rendered_queries`), with each
`%(param)s` turned into the pgbench expression that the script's `-- @bind` lines give.
A change to sql/queries.sql therefore changes the ceiling in the same run, and a new
parameter without a binding stops the bench instead of being guessed. Other lines are
plain pgbench SQL (and meta-commands) with `{schema}` filled in.

pgbench runs in prepared mode (`-M prepared`): bound variables travel as parameters of a
server-side prepared statement, which is what psycopg does after a statement's fifth
execution on a connection.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from substrate_db._queries import render, rendered_queries

SCRIPTS = Path(__file__).resolve().parent / "pgbench"

_PARAM = re.compile(r"%\((\w+)\)[sb]")
_BIND = re.compile(r"^--\s*@bind\s+(\w+)\s*=\s*(.+?)\s*$")
_FOLD = re.compile(r"^@fold\s+(\w+)\s+(.+)$")
_QUERY = re.compile(r"^@query\s+(\w+)\s*$")


class ScriptError(RuntimeError):
    """A pgbench script cannot be built from the named queries."""


def strip_comments(sql: str) -> str:
    """Remove `--` and `/* */` comments outside quotes: pgbench would read `:word` in a
    comment as a variable, and its per-statement report should show the SQL."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"":
            end = i + 1
            while end < n:
                if sql[end] == c:
                    if end + 1 < n and sql[end + 1] == c:  # doubled quote inside
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[i : end + 1])
            i = end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    lines = [line.rstrip() for line in "".join(out).splitlines()]
    return "\n".join(line for line in lines if line.strip())


def _skip_parens(sql: str, start: int) -> int:
    """Index just past the parenthesis group opening at `start` (quotes respected)."""
    depth = 0
    i = start
    while i < len(sql):
        c = sql[i]
        if c in "'\"":
            i = sql.index(c, i + 1) + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ScriptError("unbalanced parentheses in a named query")


def fold(sql: str, aggregates: str) -> str:
    """Turn a statement returning rows into one returning a single row of `aggregates`.

    A data-modifying statement may not sit inside a nested WITH, so the statement is not
    wrapped: its final part becomes one more CTE of its own top-level WITH list.
    """
    body = strip_comments(sql).strip().rstrip(";").strip()
    if re.match(r"(?i)with\b", body):
        i = 4
        while True:
            open_paren = body.find("(", i)
            if open_paren < 0:
                raise ScriptError("a WITH list without a parenthesised CTE")
            i = _skip_parens(body, open_paren)
            rest = body[i:].lstrip()
            if re.match(r"(?i)as\b", rest):  # that group was a column list: body next
                continue
            if rest.startswith(","):
                i = len(body) - len(rest) + 1
                continue
            ctes, final = body[:i], rest
            break
        return f"{ctes},\n__rows AS (\n{final}\n)\nSELECT {aggregates}\nFROM __rows"
    return f"WITH __rows AS (\n{body}\n)\nSELECT {aggregates}\nFROM __rows"


def bind(sql: str, bindings: Mapping[str, str], query: str, script: str) -> str:
    """Replace each %(param)s with its pgbench expression, and psycopg's %% with %."""
    missing = sorted({m for m in _PARAM.findall(sql) if m not in bindings})
    if missing:
        raise ScriptError(
            f"{script}: the named query {query!r} takes parameters the script does not bind: "
            f"{', '.join(missing)}; add `-- @bind NAME = EXPR` lines for them"
        )
    text = _PARAM.sub(lambda m: bindings[m.group(1)], sql)
    return text.replace("%%", "%")


def render_script(name: str, schema: str) -> str:
    """The pgbench script `bench/pgbench/<name>.sql` with its named queries expanded."""
    path = SCRIPTS / f"{name}.sql"
    queries = rendered_queries(schema)
    bindings: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        match = _BIND.match(line)
        if match:
            bindings[match.group(1)] = match.group(2)
    out: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("--"):
            continue
        fold_match, query_match = _FOLD.match(stripped), _QUERY.match(stripped)
        match = fold_match or query_match
        if match is None:
            # Plain pgbench SQL and meta-commands: only the schema to fill in.
            out.append(render(line, schema))
            continue
        query = match.group(1)
        if query not in queries:
            raise ScriptError(f"{path.name}: no named query {query!r} in sql/queries.sql")
        sql = strip_comments(queries[query].sql).rstrip().rstrip(";")
        if fold_match:
            aggregates = [part.strip() for part in _split_top(fold_match.group(2))]
            select = ", ".join(_coalesced(a) for a in aggregates)
            sql = fold(sql, select)
        out.append(bind(sql, bindings, query, path.name))
    return "\n".join(out) + "\n"


def _split_top(text: str) -> list[str]:
    """Split `a = f(x, y), b = g(z)` on top-level commas."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _coalesced(assignment: str) -> str:
    """`col = array_agg(x)` -> `coalesce(array_agg(x), '{}') AS col`: no claimed rows
    must give empty arrays, not NULLs, which \\gset would turn into empty strings."""
    name, _, expr = assignment.partition("=")
    name, expr = name.strip(), expr.strip()
    if not name.isidentifier() or not expr:
        raise ScriptError(f"@fold expects `column = aggregate`, got {assignment!r}")
    if expr.lower().startswith("array_agg("):
        expr = f"coalesce({expr}, '{{}}')"
    return f"{expr} AS {name}"


# -- running pgbench --------------------------------------------------------------------


@dataclass(frozen=True)
class PgbenchResult:
    """What one pgbench run reports."""

    transactions: int
    tps: float
    failed: int
    statement_ms: tuple[float, ...]
    """Average latency of each SQL command of the script, in order (pgbench -r)."""

    @property
    def seconds(self) -> float:
        return self.transactions / self.tps if self.tps else 0.0


_TPS = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M)
_TXNS = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_LATENCY_LINE = re.compile(r"^\s+([\d.]+)\s+\d+\s+(\S.*)$")


def parse_output(text: str) -> PgbenchResult:
    tps, txns = _TPS.search(text), _TXNS.search(text)
    if tps is None or txns is None:
        raise RuntimeError(f"cannot read pgbench's report:\n{text}")
    failed = _FAILED.search(text)
    latencies: list[float] = []
    _, marker, tail = text.partition("statement latencies in milliseconds")
    if marker:
        for line in tail.splitlines()[1:]:
            match = _LATENCY_LINE.match(line)
            if match and not match.group(2).startswith("\\"):
                latencies.append(float(match.group(1)))
    return PgbenchResult(
        transactions=int(txns.group(1)),
        tps=float(tps.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        statement_ms=tuple(latencies),
    )


def run_pgbench(
    pgbench: Path,
    conninfo: str,
    script: str,
    *,
    clients: int,
    seconds: int,
    variables: Mapping[str, str],
    workdir: Path,
    tag: str,
) -> PgbenchResult:
    """Run one pgbench script for `seconds` with `clients` connections."""
    path = workdir / f"{tag}.sql"
    path.write_text(script, encoding="utf-8")
    argv = [
        str(pgbench),
        "--no-vacuum",
        "--protocol=prepared",
        f"--client={clients}",
        # pgbench's threads drive the clients; two cores, so at most two threads.
        f"--jobs={min(clients, 2)}",
        f"--time={seconds}",
        "--report-per-command",
        f"--file={path}",
    ]
    for key, value in variables.items():
        argv.append(f"--define={key}={value}")
    argv.append(conninfo)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(
            f"pgbench failed ({done.returncode}):\n{done.stderr[-3000:]}\n{done.stdout[-2000:]}"
        )
    return parse_output(done.stdout)


def pg_array(values: list[str | None]) -> str:
    """A Postgres array literal of text values (NULL for None), for pgbench -D."""
    items = []
    for value in values:
        if value is None:
            items.append("NULL")
        else:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            items.append(f'"{escaped}"')
    return "{" + ",".join(items) + "}"

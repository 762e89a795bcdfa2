"""Loads the named queries and the migrations shipped with the package.

The SQL lives in `sql/` at the repository root (`queries.sql`, `queries/<area>.sql`,
`migrations/NNNN_name.sql`); the wheel carries the same files as
`substrate_db/sql/`. Installed packages read the packaged copy; a source checkout
(editable install, tests) reads the root copy. Files are read once per process.

`{schema}` in the SQL is replaced with the schema identifier, quoted by psycopg, after
the name was validated: identifiers are fixed by us, values are always parameters.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from psycopg import sql

Returns = Literal["one", "many", "exec"]

_HEADER = re.compile(r"^-- name: (?P<name>[a-z_][a-z0-9_]*) :(?P<returns>one|many|exec)\s*$", re.M)
_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Query:
    """One named query as written in queries.sql, schema placeholder unresolved."""

    name: str
    returns: Returns
    text: str
    doc: str


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file. The checksum is of the file as written, before rendering."""

    version: int
    name: str
    text: str
    checksum: str


def sql_dir() -> Path:
    """The directory holding queries.sql and migrations/ for this installation."""
    packaged = resources.files("substrate_db") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    source = Path(__file__).resolve().parent.parent / "sql"
    if source.is_dir():
        return source
    raise RuntimeError(  # pragma: no cover - a broken installation
        f"substrate-db's SQL files are missing (looked in {packaged} and {source})"
    )


def parse_queries(text: str) -> dict[str, Query]:
    """Split queries.sql into named queries. Comment lines after a header are the doc."""
    headers = list(_HEADER.finditer(text))
    if not headers:
        raise ValueError("queries.sql holds no '-- name: <name> :<returns>' header")
    queries: dict[str, Query] = {}
    for i, match in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body_lines = text[match.end() : end].strip("\n").splitlines()
        doc: list[str] = []
        while body_lines and body_lines[0].startswith("--"):
            doc.append(body_lines.pop(0)[2:].strip())
        # Comments inside a query are kept, but none may hold a placeholder: a `%(x)s`
        # in a comment would still be bound by psycopg.
        body = "\n".join(body_lines).strip()
        name = match["name"]
        if not body:
            raise ValueError(f"query {name!r} in queries.sql has no SQL")
        if name in queries:
            raise ValueError(f"query {name!r} appears twice in queries.sql")
        queries[name] = Query(name, match["returns"], body, " ".join(doc))  # type: ignore[arg-type]
    return queries


@functools.cache
def load_queries() -> dict[str, Query]:
    """The named queries of this installation: `queries.sql`, then every file in
    `queries/` (one per feature area), in name order. A name may be defined once."""
    root = sql_dir()
    files = [root / "queries.sql"]
    if (root / "queries").is_dir():
        files += sorted(p for p in (root / "queries").iterdir() if p.suffix == ".sql")
    queries: dict[str, Query] = {}
    for path in files:
        for name, query in parse_queries(path.read_text(encoding="utf-8")).items():
            if name in queries:
                raise RuntimeError(f"query {name!r} is defined twice (again in {path.name})")
            queries[name] = query
    return queries


@functools.cache
def load_migrations() -> tuple[Migration, ...]:
    """The migrations of this installation, in version order."""
    found: list[Migration] = []
    for path in sorted((sql_dir() / "migrations").iterdir()):
        match = _MIGRATION_FILE.match(path.name)
        if match is None:
            continue
        raw = path.read_bytes()
        found.append(
            Migration(
                version=int(match["version"]),
                name=match["name"],
                text=raw.decode("utf-8"),
                checksum=hashlib.sha256(raw).hexdigest(),
            )
        )
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a version: {versions}")
    return tuple(found)


def render(text: str, schema: str) -> str:
    """Put the quoted schema identifier where the SQL says `{schema}`."""
    return text.replace("{schema}", sql.Identifier(schema).as_string(None))


@dataclass(frozen=True, slots=True)
class Rendered:
    """A query ready to execute for one schema."""

    name: str
    returns: Returns
    sql: str


# An array parameter: `%(name)s` cast to an array type, as in `%(ids)s::bigint[]`.
_ARRAY_PARAM = re.compile(r"%\((\w+)\)s(?=::[a-z ]+\[\])")


def binary_arrays(text: str) -> str:
    """Send array parameters in binary (`%(name)b`, psycopg's binary placeholder).
    psycopg dumps a list in text by escaping each element through a regex; in binary it
    packs them: 2x faster for ints and 5x for strings, which is most of the Python time
    of a bulk enqueue and of a worker's write-backs. The SQL files keep the usual `%(x)s`;
    every array parameter there is cast to its type, so the server never guesses."""
    return _ARRAY_PARAM.sub(r"%(\1)b", text)


@functools.cache
def rendered_queries(schema: str) -> dict[str, Rendered]:
    """Every named query rendered for `schema` (cached: one dict per schema per process)."""
    return {
        q.name: Rendered(q.name, q.returns, binary_arrays(render(q.text, schema)))
        for q in load_queries().values()
    }

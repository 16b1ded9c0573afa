"""Table names as users write them, and the Delta paths they map to.

Users write `schema.table` (exact, case-sensitive) or a bare `table` (meaning `public.table`);
a name containing a dot or a quote is written in PostgreSQL's double-quoted form
(e.g. `"my.schema".orders`). Internally a table is a `TableRef` (schema, name); its
`qualified` text is the canonical spelling used in config keys, app ids and messages.
"""

from __future__ import annotations

from dataclasses import dataclass

_PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")
_SEGMENT_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")

ENGINE_COLUMN_PREFIX = "_cdc_"
APPEND_SUFFIX = "_cdc"


class NameError_(ValueError):
    """A table name that cannot be parsed; the message says what is allowed."""


def pg_identifier(name: str) -> str:
    """`name` as a PostgreSQL identifier for a statement shown to a person: always
    double-quoted (names may hold capitals, `-` or `$`), quotes doubled."""
    return '"' + name.replace('"', '""') + '"'


def _quote_part(part: str) -> str:
    if part and all(c in _PLAIN for c in part) and not part[0].isdigit():
        return part
    return '"' + part.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True, order=True)
class TableRef:
    schema: str
    name: str

    @property
    def qualified(self) -> str:
        """Canonical `schema.table` text; parts needing it are double-quoted."""
        return f"{_quote_part(self.schema)}.{_quote_part(self.name)}"

    def __str__(self) -> str:
        return self.qualified

    @classmethod
    def parse(cls, text: str, *, default_schema: str = "public") -> TableRef:
        parts = _split_qualified(text)
        if len(parts) == 1:
            return cls(default_schema, parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise NameError_(
            f"{text!r} has {len(parts)} dot-separated parts; write schema.table or table "
            '(double-quote a name that contains a dot: "my.schema".orders)'
        )

    def delta_path(self, destination: str, *, append: bool = False) -> str:
        """`D/schema/table` (consolidated) or `D/schema/table_cdc` (append), segments escaped."""
        table = self.name + APPEND_SUFFIX if append else self.name
        return "/".join(
            [destination.rstrip("/"), escape_path_segment(self.schema), escape_path_segment(table)]
        )


def _split_qualified(text: str) -> list[str]:
    if not isinstance(text, str) or not text.strip():
        raise NameError_("a table name must be a non-empty string")
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise NameError_(f"{text!r}: unterminated double quote")
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            part, i = "".join(buf), j + 1
        else:
            j = text.find(".", i)
            j = n if j < 0 else j
            part, i = text[i:j], j
            if '"' in part:
                raise NameError_(f"{text!r}: a quote may only wrap a whole name part")
        if not part:
            raise NameError_(f"{text!r}: empty name part")
        if part != part.strip():
            raise NameError_(f"{text!r}: name parts may not start or end with spaces")
        if "\x00" in part or len(part.encode()) > 63:
            raise NameError_(f"{text!r}: a name part must be 1-63 bytes without NUL")
        parts.append(part)
        if i >= n:
            return parts
        if text[i] != ".":
            raise NameError_(f"{text!r}: expected '.' after a quoted name part")
        i += 1
        if i >= n:
            raise NameError_(f"{text!r}: ends with a dot")


def escape_path_segment(segment: str) -> str:
    """A name as one path segment: letters, digits, `_` and `-` kept; every other byte `~XX`.

    This keeps `/`, `.`, `..`, spaces and non-ASCII from changing the path's meaning on a file
    system or in an object-store key, and stays reversible. `~` rather than `%`: delta-rs
    percent-decodes a table path when it reads its log back, so a `%XX` segment would name a
    different directory than the one it wrote.
    """
    out: list[str] = []
    for ch in segment:
        if ch in _SEGMENT_SAFE:
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode())
    return "".join(out)


def unescape_path_segment(escaped: str) -> str:
    """The inverse of `escape_path_segment`."""
    raw = bytearray()
    i = 0
    while i < len(escaped):
        if escaped[i] == "~":
            raw.append(int(escaped[i + 1:i + 3], 16))
            i += 3
        else:
            raw += escaped[i].encode()
            i += 1
    return raw.decode()


def is_engine_column(name: str) -> bool:
    """Source columns may not use the engine's `_cdc_` prefix (in any case)."""
    return name.lower().startswith(ENGINE_COLUMN_PREFIX)


def case_collisions(names: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Pairs of names equal ignoring case (Delta column names are case-insensitive)."""
    seen: dict[str, str] = {}
    out: list[tuple[str, str]] = []
    for name in names:
        key = name.lower()
        if key in seen and seen[key] != name:
            out.append((seen[key], name))
        else:
            seen.setdefault(key, name)
    return out

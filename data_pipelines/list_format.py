"""One parser for "relative/path label" list files, shared by training and tools/check_lists.py.

Training stops at the first bad line; the checker wants every bad line of a 437,513-line
iNaturalist list in one pass. Both read the file through `parse_list`, which never raises: it
returns the entries it could read and the problems it found (each naming file:line), plus
what identifies the file (its git blob SHA-1) and whether its last line ends with a newline
(the official lists all do, so a missing one hints at a truncated copy).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LIST_FORMAT = "'relative/path label' (label a non-negative integer, 0-based)"
SHOWN = 5  # examples kept per kind of problem; the count is always exact


def git_blob_sha1(data: bytes) -> str:
    """`git hash-object` of these bytes: how the lists README identifies the official files."""
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


class LineOrigins(Sequence):
    """"file:line" of each entry, made on demand: 437,513 such strings would cost ~40 MB per
    process (and per loader worker) for what only error messages read."""

    def __init__(self, path: str, linenos: np.ndarray):
        self.path, self.linenos = path, linenos

    def __len__(self) -> int:
        return len(self.linenos)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"{self.path}:{int(self.linenos[i])}"


@dataclass
class ParsedList:
    path: str
    paths: list = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    linenos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    problems: list = field(default_factory=list)   # at most SHOWN per kind, then a count
    fatal: bool = False                            # unreadable: nothing was parsed
    sha1: str = ""
    size: int = 0
    ends_with_newline: bool = True

    def where(self, i: int) -> str:
        return f"{self.path}:{int(self.linenos[i])}"

    @property
    def origins(self) -> LineOrigins:
        return LineOrigins(self.path, self.linenos)


def _bad_line(path: str, lineno: int, raw: str):
    """(kind, message) for a non-empty line that is not 'path label'."""
    where = f"{path}:{lineno}"
    parts = raw.strip().rsplit(None, 1)
    if len(parts) != 2:
        return "malformed", f"{where}: malformed line {raw!r}; expected {LIST_FORMAT}"
    try:
        label = int(parts[1])
    except ValueError:
        return "label", (f"{where}: label {parts[1]!r} is not an integer; expected "
                         f"{LIST_FORMAT}")
    if label < 0:
        return "negative", f"{where}: label {label} is negative; expected {LIST_FORMAT}"
    return None, (parts[0], label)


def parse_list(path: str) -> ParsedList:
    """Every entry and every problem of one list file, in one pass (~0.4 s per 437k lines)."""
    if not os.path.isfile(path):
        out = ParsedList(path, fatal=True)
        out.problems.append(f"{path}: list file not found; expected a text file with one "
                            f"{LIST_FORMAT} per line")
        return out
    with open(path, "rb") as f:
        return parse_bytes(path, f.read())


def parse_bytes(path: str, data: bytes) -> ParsedList:
    """`parse_list` of a list's content; `path` names it in the messages."""
    out = ParsedList(path)
    out.sha1, out.size = git_blob_sha1(data), len(data)
    out.ends_with_newline = not data or data.endswith(b"\n")
    if data[:2] == b"\x1f\x8b":
        out.fatal = True
        out.problems.append(f"{path}: gzip-compressed; expected plain text (gunzip it first)")
        return out
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        out.fatal = True
        out.problems.append(f"{path}: not UTF-8 text ({exc}); expected one {LIST_FORMAT} "
                            f"per line")
        return out
    del data
    paths, labels, linenos = [], [], []
    bad: dict[str, list] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        parts = raw.rsplit(None, 1)
        if len(parts) == 2 and parts[1].isdigit() and parts[1].isascii():
            p = parts[0]
            paths.append(p if not p[:1].isspace() else p.lstrip())
            labels.append(int(parts[1]))
            linenos.append(lineno)
            continue
        if not raw.strip():
            continue
        kind, result = _bad_line(path, lineno, raw)
        if kind is None:   # an unusual but valid label such as '+3'
            paths.append(result[0])
            labels.append(result[1])
            linenos.append(lineno)
        else:
            bad.setdefault(kind, []).append(result)
    out.paths = paths
    out.labels = np.fromiter(labels, dtype=np.int64, count=len(labels))
    out.linenos = np.fromiter(linenos, dtype=np.int64, count=len(linenos))
    for kind, messages in bad.items():
        out.problems += messages[:SHOWN]
        if len(messages) > SHOWN:
            out.problems.append(f"{path}: {len(messages) - SHOWN} more lines like the above "
                                f"({len(messages)} in all)")
    if not paths and not bad:
        out.fatal = True
        out.problems.append(f"{path}: no entries; expected one {LIST_FORMAT} per line")
    return out

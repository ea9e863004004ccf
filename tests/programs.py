"""The table of programs the project runs (deps/programs.txt): where each comes from; finding one or saying why not."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "deps" / "programs.txt"
VENV_BIN = REPO / ".venv" / "bin"
# Where a program may be: the virtualenv's scripts, then root's PATH on Debian (tests may run with a user's PATH),
# then where Debian's frr package puts FRR's daemons (bfdd, bgpd, zebra: never on PATH).
FRR_DAEMONS = "/usr/lib/frr"
SEARCH_PATH = os.pathsep.join(
    [str(VENV_BIN), os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
     "/sbin", "/bin", FRR_DAEMONS]
)
SYSTEM_PATH = os.pathsep.join(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin",
                               FRR_DAEMONS])
USES = frozenset({"agent", "test", "bench"})


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    program: str | None  # None: a package that installs no program the project runs
    package: str  # a Debian package, pip:NAME for a distribution in the virtualenv, build:NAME built by the tests
    uses: frozenset[str]
    line: int

    @property
    def debian(self) -> bool:
        return not self.package.startswith(("pip:", "build:"))

    @property
    def pip(self) -> bool:
        return self.package.startswith("pip:")

    @property
    def built(self) -> bool:
        return self.package.startswith("build:")

    def how_to_install(self) -> str:
        if self.pip:
            return f"Python distribution {self.package[4:]}, installed into .venv by `make` from pyproject.toml"
        if self.built:
            return f"built with the tests' {self.package[6:]} by `make {self.package[6:]}` (tests/k8s/build.py)"
        target = "`make bench`" if self.uses == {"bench"} else "`make demo` / `make test`"
        return f"Debian package {self.package}, installed by {target}"


class TableError(ValueError):
    """deps/programs.txt is malformed."""


def rows(table: Path = TABLE) -> list[Row]:
    """Every row of the table, in order."""
    found: list[Row] = []
    for number, raw in enumerate(table.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 3:
            raise TableError(f"{table}:{number}: want `program package uses`, got {raw!r}")
        uses = frozenset(fields[2].split(","))
        if not uses or uses - USES:
            raise TableError(f"{table}:{number}: uses {fields[2]!r}: each must be one of {sorted(USES)}")
        found.append(Row(None if fields[0] == "-" else fields[0], fields[1], uses, number))
    return found


def programs(table: Path = TABLE) -> dict[str, Row]:
    """Program name -> its row."""
    by_name: dict[str, Row] = {}
    for row in rows(table):
        if row.program is not None:
            if row.program in by_name:
                raise TableError(f"{table}:{row.line}: {row.program} is listed twice")
            by_name[row.program] = row
    return by_name


def find(program: str, system: bool = False) -> str | None:
    """The path the program runs from here (system: outside the virtualenv, as Debian installed it), or None."""
    return shutil.which(program, path=SYSTEM_PATH if system else SEARCH_PATH)


def missing(names: Iterable[str], table: Path = TABLE) -> list[str]:
    """One problem per program that cannot be found, naming what provides it; a program the table lacks is a bug."""
    known = programs(table)
    problems: list[str] = []
    for name in names:
        if name not in known:
            shown = table.relative_to(REPO) if table.is_relative_to(REPO) else table
            raise KeyError(f"{name} is not in {shown}: add it with the package that provides it")
        if known[name].built:
            raise KeyError(f"{name} is built by the tests ({known[name].how_to_install()}): ask the builder for it")
        if find(name) is None:
            problems.append(f"missing tool: {name} ({known[name].how_to_install()})")
    return problems


def path(program: str) -> str:
    """The program's path; RuntimeError naming its package when it is not installed (never a silent skip)."""
    problems = missing([program])
    if problems:
        raise RuntimeError(problems[0])
    found = find(program)
    assert found is not None
    return found

"""The layout's import rules (docs/architecture.md, "Layout"), read from the source with `ast`: every room imports
only the rooms below it; l3, l4 and l7 are peers and never import each other, nor do the data planes inside l4;
only ops picks a particular source (the agent knows the seam, `lbagent.sources`); and planning and rendering are
pure: a module under lbagent/plan/ or named `render` imports nothing that does I/O, directly or through another
lbagent module, and never calls open()."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The shared kernel: importable by every room.
KERNEL = {"lbagent", "lbagent.model", "lbagent.logfmt", "lbagent.files", "lbagent.tls", "lbagent.routing",
          "lbagent.supervisor", "lbagent.verdicts", "lbagent.netlinkmsg", "lbagent.watched", "lbagent.memory"}
# Room -> the rooms its modules may import. "sources:seam" is `lbagent.sources` alone (the Source protocol).
MAY_IMPORT: dict[str, set[str]] = {
    "kernel": {"kernel"},
    "sources": {"kernel", "sources"},
    "health": {"kernel", "health"},
    "plan": {"kernel", "health", "plan"},
    "l3": {"kernel", "health", "plan", "l3"},
    "l4": {"kernel", "health", "plan", "l4"},
    "l7": {"kernel", "health", "plan", "l7"},
    "agent": {"kernel", "sources:seam", "health", "plan", "l3", "l4", "l7", "agent"},
    "ops": {"kernel", "sources", "health", "plan", "l3", "l4", "l7", "agent", "ops"},
}
RANK = {"kernel": 0, "sources": 1, "health": 2, "plan": 3, "l3": 4, "l4": 4, "l7": 4, "agent": 5, "ops": 6}
DATA_PLANES = {"lbagent.l4.nftables", "lbagent.l4.iptables", "lbagent.l4.ipvs"}
# What a pure module (planning, rendering) must not import: processes, sockets, netlink, the event loop, files.
IO_MODULES = {
    "asyncio", "concurrent", "ctypes", "fcntl", "grp", "http", "io", "mmap", "multiprocessing", "os", "pathlib",
    "prometheus_client", "pwd", "pyroute2", "selectors", "shutil", "signal", "socket", "ssl", "subprocess",
    "tempfile", "threading", "urllib",
}
IO_ALLOWED = {"os.path"}  # path arithmetic only


def room(module: str) -> str | None:
    if module in KERNEL:
        return "kernel"
    if module == "lbagent.health":
        return "health"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in MAY_IMPORT and parts[1] not in ("kernel", "health"):
        return parts[1]
    return None


def is_pure(module: str) -> bool:
    """Planning and rendering: everything under lbagent/plan/ and every module named render."""
    return module.startswith("lbagent.plan.") or module == "lbagent.plan" or module.rsplit(".", 1)[-1] == "render"


def data_plane(module: str) -> str | None:
    return next((d for d in DATA_PLANES if module == d or module.startswith(d + ".")), None)


def imports(module: str, text: str, modules: Mapping[str, str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in `text`, relative ones resolved; `from P import name` counts as
    P.name when that is a module."""
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules else target, node.lineno))
    return list(dict.fromkeys(found))


def _is_package(module: str, modules: Mapping[str, str]) -> bool:
    return any(other.startswith(module + ".") for other in modules)


def opens(text: str) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"]


def io_imports(module: str, text: str, modules: Mapping[str, str]) -> list[str]:
    return sorted({name for name, _ in imports(module, text, modules)
                   if not name.startswith("lbagent") and name not in IO_ALLOWED
                   and name.split(".")[0] in IO_MODULES})


def check(modules: Mapping[str, str]) -> list[str]:
    """Every broken rule, one line each: the importing module, the imported one and the rule. `modules`: dotted
    module name -> source text, for every module of the package."""
    problems: list[str] = []
    graph = {m: [(t, line) for t, line in imports(m, text, modules) if t.startswith("lbagent")]
             for m, text in modules.items()}

    def io_path(m: str, seen: set[str]) -> list[str] | None:
        """The first chain of lbagent imports from `m` to a module that imports an I/O module, ending in it."""
        if m in seen or m not in modules:
            return None
        seen.add(m)
        direct = io_imports(m, modules[m], modules)
        if direct:
            return [m, direct[0]]
        for target, _ in graph[m]:
            chain = io_path(target, seen)
            if chain is not None:
                return [m, *chain]
        return None

    for m, text in sorted(modules.items()):
        mine = room(m)
        if mine is None:
            problems.append(f"{m}: in no room of the layout (kernel modules: {', '.join(sorted(KERNEL))})")
            continue
        for target, line in graph[m]:
            theirs = room(target)
            if theirs is None:
                continue  # reported as the module's own problem
            allowed = MAY_IMPORT[mine]
            seam = theirs == "sources" and target == "lbagent.sources" and "sources:seam" in allowed
            where = f"{m} (line {line}) imports {target}"
            if theirs not in allowed and not seam:
                if RANK[theirs] > RANK[mine]:
                    others = sorted(r.replace("sources:seam", "lbagent.sources") for r in allowed - {mine})
                    rule = f"upward: {mine} may import only {', '.join(others)} (and itself)"
                elif RANK[theirs] == RANK[mine]:
                    rule = f"sideways: {mine} and {theirs} are peers and never import each other"
                else:
                    rule = ("past the source seam: only ops picks a source; the agent imports lbagent.sources "
                            "alone, and nothing below it knows where the model comes from")
                problems.append(f"{where}: {rule}")
            mine_dp, theirs_dp = data_plane(m), data_plane(target)
            if mine_dp and theirs_dp and mine_dp != theirs_dp:
                problems.append(f"{where}: sideways: the data planes {mine_dp} and {theirs_dp} never import each "
                                f"other (what they share lives in lbagent.l4)")
        if is_pure(m):
            for name in io_imports(m, text, modules):
                problems.append(f"{m} imports {name}: planning and rendering are pure and do no I/O")
            for target, _ in graph[m]:
                chain = io_path(target, set())
                if chain is not None:
                    problems.append(f"{m} imports {target}: planning and rendering are pure, and "
                                    f"{' -> '.join(chain[:-1])} imports {chain[-1]} (I/O)")
            for line in opens(text):
                problems.append(f"{m} (line {line}) calls open(): planning and rendering are pure and do no I/O")
    return problems


def package_modules(root: Path = REPO / "lbagent") -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text()
    return out


def test_the_package_keeps_the_layout() -> None:
    problems = check(package_modules())
    assert not problems, "the layout's import rules are broken (docs/architecture.md):\n" + "\n".join(problems)


def test_every_room_exists() -> None:
    modules = package_modules()
    found = {room(m) for m in modules}
    assert found == set(MAY_IMPORT), found ^ set(MAY_IMPORT)
    assert {data_plane(m) for m in modules} - {None} == DATA_PLANES


# A small package that breaks every rule once (and keeps them where the comments of the expected list do not say
# otherwise: ops may import a source, the agent the seam, a data plane the shared lbagent.l4, a pure module os.path).
BAD = {
    "lbagent": "",
    "lbagent.model": "import json\n",
    "lbagent.files": "import os\n",
    "lbagent.sources": "from lbagent import model\n",
    "lbagent.sources.file": "",
    "lbagent.sources.file.config": "from lbagent.plan import services\n",
    "lbagent.health": "import asyncio\nfrom lbagent.sources.file import config\n",
    "lbagent.plan": "",
    "lbagent.plan.services": "import subprocess\nfrom lbagent import files, model\n",
    "lbagent.plan.http": "from . import services\nfrom os.path import join\n",
    "lbagent.l3": "",
    "lbagent.l3.render": "from lbagent.l4.nftables import render\n\nopen('/tmp/x', 'w')\n",
    "lbagent.l4": "",
    "lbagent.l4.nft": "import asyncio\n",
    "lbagent.l4.nftables": "",
    "lbagent.l4.nftables.render": "from lbagent.plan import http\n",
    "lbagent.l4.ipvs": "",
    "lbagent.l4.ipvs.apply": "from lbagent.l4.nftables.apply import run_nft\nfrom lbagent.l4 import nft\n",
    "lbagent.l4.nftables.apply": "from ..nft import run_nft\n",
    "lbagent.l7": "",
    "lbagent.l7.haproxy": "from lbagent.agent import agent\n",
    "lbagent.agent": "",
    "lbagent.agent.agent": ("from lbagent import sources\nfrom lbagent.sources.file import config\n"
                            "from lbagent.ops import cli\n"),
    "lbagent.ops": "",
    "lbagent.ops.cli": "from lbagent.agent import agent\nfrom lbagent.sources.file import config\n",
    "lbagent.stray": "",
}


def test_the_checker_names_the_importer_the_imported_and_the_rule() -> None:
    """The checker itself, on the bad package above: each broken rule once, naming both modules and the rule."""
    assert sorted(check(BAD)) == [
        "lbagent.agent.agent (line 2) imports lbagent.sources.file.config: past the source seam: only ops "
        "picks a source; the agent imports lbagent.sources alone, and nothing below it knows where the model "
        "comes from",
        "lbagent.agent.agent (line 3) imports lbagent.ops.cli: upward: agent may import only health, kernel, "
        "l3, l4, l7, lbagent.sources, plan (and itself)",
        "lbagent.health (line 2) imports lbagent.sources.file.config: past the source seam: only ops picks a "
        "source; the agent imports lbagent.sources alone, and nothing below it knows where the model comes "
        "from",
        "lbagent.l3.render (line 1) imports lbagent.l4.nftables.render: sideways: l3 and l4 are peers and "
        "never import each other",
        "lbagent.l3.render (line 3) calls open(): planning and rendering are pure and do no I/O",
        "lbagent.l3.render imports lbagent.l4.nftables.render: planning and rendering are pure, and "
        "lbagent.l4.nftables.render -> lbagent.plan.http -> lbagent.plan.services imports subprocess (I/O)",
        "lbagent.l4.ipvs.apply (line 1) imports lbagent.l4.nftables.apply: sideways: the data planes "
        "lbagent.l4.ipvs and lbagent.l4.nftables never import each other (what they share lives in "
        "lbagent.l4)",
        "lbagent.l4.nftables.render imports lbagent.plan.http: planning and rendering are pure, and "
        "lbagent.plan.http -> lbagent.plan.services imports subprocess (I/O)",
        "lbagent.l7.haproxy (line 1) imports lbagent.agent.agent: upward: l7 may import only health, kernel, "
        "plan (and itself)",
        "lbagent.plan.http imports lbagent.plan.services: planning and rendering are pure, and "
        "lbagent.plan.services imports subprocess (I/O)",
        "lbagent.plan.services imports lbagent.files: planning and rendering are pure, and lbagent.files "
        "imports os (I/O)",
        "lbagent.plan.services imports subprocess: planning and rendering are pure and do no I/O",
        "lbagent.sources.file.config (line 1) imports lbagent.plan.services: upward: sources may import only "
        "kernel (and itself)",
        "lbagent.stray: in no room of the layout (kernel modules: lbagent, lbagent.files, lbagent.logfmt, "
        "lbagent.memory, lbagent.model, lbagent.netlinkmsg, lbagent.routing, lbagent.supervisor, lbagent.tls, "
        "lbagent.verdicts, lbagent.watched)",
    ]


def test_one_bad_import_in_the_real_package_fails() -> None:
    """Planning made to import the nft runner: upward, and impure for every renderer that imports the plan too."""
    modules = package_modules()
    modules["lbagent.plan.services"] += "\nfrom lbagent.l4 import nft\n"
    line = modules["lbagent.plan.services"].count("\n")
    problems = check(modules)
    assert f"lbagent.plan.services (line {line}) imports lbagent.l4.nft: upward: plan may import only health, " \
        "kernel (and itself)" in problems
    assert "lbagent.plan.services imports lbagent.l4.nft: planning and rendering are pure, and lbagent.l4.nft " \
        "imports asyncio (I/O)" in problems
    assert "lbagent.l4.nftables.render imports lbagent.plan.services: planning and rendering are pure, and " \
        "lbagent.plan.services -> lbagent.l4.nft imports asyncio (I/O)" in problems

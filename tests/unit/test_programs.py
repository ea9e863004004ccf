"""Every program the code runs is in deps/programs.txt, and every row's package really provides it and is installed."""

from __future__ import annotations

import ast
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import programs
from tests.k8s import build

REPO = programs.REPO
PYTHON_SOURCES = ("lbagent", "tests", "bench")
# Shell scripts the project runs on a machine it installs (.ci/fresh-root runs on the CI host, before any install:
# it installs its own debootstrap and needs only git and Debian's base).
SHELL_SOURCES = ("systemd/install.sh", ".ci/run")
# Calls that run their argv: subprocess, asyncio, and the labs' and guests' own helpers (exec, spawn, _run, ...).
RUNS = re.compile(r"^(_?run|run_tool|Popen|check_output|check_call|call|create_subprocess_exec|exec|spawn|_nft)$")
WHICH = frozenset({"which", "_which", "_tool", "path", "find"})
# Words that may stand before a command.
LEADING = frozenset({"!", "then", "do", "else", "if", "elif", "while", "until", "time"})
NAME = re.compile(r"[a-z][a-z0-9_.+-]*")
# Shell words in command position that are not programs.
SHELL_WORDS = frozenset({
    "if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while", "until", "case", "esac", "function",
    "return", "exit", "set", "local", "export", "shift", "trap", "cd", "read", "echo", "printf", "eval", "exec",
    "command", "wait", "break", "continue", "true", "false", "test", "[", "[[", "]]", "{", "}", "!", "mapfile",
    "declare", "source", ".", ":", "unset", "readonly",
})


def _const(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _shell_commands(script: str) -> Iterator[str]:
    """The first word of each simple command in a shell text (good enough for the short scripts run here)."""
    functions = set(re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(\)", script, re.M))
    # Comments and quoted text (messages, awk programs) are not commands.
    script = re.sub(r"'[^']*'|\"(?:[^\"\\]|\\.)*\"|#.*", " QUOTED ", script)
    for segment in re.split(r"\n|\|\||&&|[|;&(]|\$\(|`", script):
        words = segment.strip().split()
        while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in LEADING):
            words = words[1:]
        if words and NAME.fullmatch(words[0]) and words[0] not in SHELL_WORDS | functions:
            yield words[0]


def _argv_programs(argv: ast.List | ast.Tuple) -> Iterator[str]:
    """Programs an argv literal runs: its first word, the one `ip netns exec NS` runs, and `sh -c` texts."""
    words = [_const(e) for e in argv.elts]
    if words and words[0]:
        yield words[0]
    if words[:3] == ["ip", "netns", "exec"] and len(words) > 4 and words[4]:
        yield words[4]
    for i, word in enumerate(words[:-1]):
        if word == "-c" and i > 0 and words[i - 1] in {"sh", "bash"}:
            text = argv.elts[i + 1]
            if isinstance(text, ast.JoinedStr):
                yield from _shell_commands("".join(_const(v) or " X " for v in text.values))
            elif _const(text):
                yield from _shell_commands(_const(text) or "")


def programs_the_code_runs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(surely run, maybe run) program -> where. Surely: argv given to a call that runs it, names looked up with
    which(), shell commands. Maybe: a string constant bound to a program-like name (QEMU = "qemu-system-x86_64",
    exabgp: str = "exabgp"); those count only when such a program exists."""
    sure: dict[str, set[str]] = defaultdict(set)
    maybe: dict[str, set[str]] = defaultdict(set)
    for top in PYTHON_SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            if ".venv" in path.parts:
                continue
            where = str(path.relative_to(REPO))
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call):
                    name = _call_name(node)
                    if name in WHICH and node.args and (word := _const(node.args[0])):
                        sure[word].add(f"{where}:{node.lineno}")
                    if RUNS.match(name):
                        for arg in node.args[:2]:
                            if isinstance(arg, ast.List | ast.Tuple):
                                for word in _argv_programs(arg):
                                    sure[word].add(f"{where}:{node.lineno}")
                elif isinstance(node, ast.List | ast.Tuple) and [_const(e) for e in node.elts[:3]] == [
                        "ip", "netns", "exec"]:
                    for word in _argv_programs(node):
                        sure[word].add(f"{where}:{node.lineno}")
                if isinstance(node, ast.Assign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = [t.id for t in targets if isinstance(t, ast.Name)]
                    if (word := _const(node.value)) and any(n.isupper() or n == word for n in names):
                        maybe[word].add(f"{where}:{node.lineno}")
                    if isinstance(node.value, ast.Tuple) and any(n.endswith("TOOLS") for n in names):
                        for element in node.value.elts:
                            if word := _const(element):
                                sure[word].add(f"{where}:{node.lineno}")
    for script in SHELL_SOURCES:
        for word in _shell_commands((REPO / script).read_text()):
            sure[word].add(script)
    for word in {w for w in sure if not NAME.fullmatch(w)}:
        del sure[word]
    return sure, maybe


def _dpkg_owner(path: str) -> str | None:
    """The Debian package that installed the file (merged /usr: the package may have registered /bin or /sbin)."""
    resolved = Path(path).resolve()
    candidates = {path, str(resolved)}
    for p in list(candidates):
        for a, b in (("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/")):
            candidates |= {p.replace(a, b, 1), p.replace(b, a, 1)}
    for candidate in sorted(candidates):
        proc = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return proc.stdout.split(":", 1)[0].strip()
    return None


def _base_package(package: str) -> bool:
    """Whether the package is in Debian's minimal base (Priority: required), so on every Debian 12 machine."""
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Priority}", package], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and proc.stdout.strip() == "required"


def _make_lists() -> dict[str, set[str]]:
    out = subprocess.run(["make", "-s", "--no-print-directory", "print-packages"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return {key: set(value.split()) for key, _, value in (line.partition(":") for line in out.splitlines())}


def test_the_table_parses_and_names_each_program_once() -> None:
    table = programs.programs()
    assert {"ip", "nft", "ping", "bird", "haproxy", "exabgp"} <= set(table)
    assert table["ping"].package == "iputils-ping"


def test_every_program_the_code_runs_has_a_row_naming_its_package() -> None:
    sure, maybe = programs_the_code_runs()
    table = programs.programs()
    for word, where in maybe.items():
        if word not in sure and programs.find(word) is not None:
            sure[word] = where
    problems = []
    for word in sorted(set(sure) - set(table)):
        found = programs.find(word, system=True)
        owner = _dpkg_owner(found) if found else None
        if owner is not None and _base_package(owner):
            continue
        problems.append(f"{word} (run at {', '.join(sorted(sure[word])[:3])}) has no row in deps/programs.txt; "
                        f"Debian package: {owner or 'unknown: not installed here'}")
    assert problems == [], "\n".join(problems)


def test_the_scan_finds_programs_however_the_code_runs_them() -> None:
    """The scan above would notice a new program: argv lists, ip netns exec, sh -c, which(), NAME constants."""
    sure, maybe = programs_the_code_runs()
    assert "tests/lab/lab.py" in " ".join(sure["ping"])  # lab.exec(host, ["ping", ...])
    assert "wrk" in sure  # ["ip", "netns", "exec", ns, "wrk", ...]
    assert "openssl" in sure  # ["sh", "-c", f"echo | openssl s_client ..."]
    assert "haproxy" in sure and "nft" in sure and "conntrack" in sure  # shutil.which("...")
    assert "qemu-system-x86_64" in maybe  # QEMU = "qemu-system-x86_64"
    assert "apt-get" in sure and "systemctl" in sure  # systemd/install.sh
    assert set(_shell_commands("a=1 foo --x | bar; if baz; then qux; fi && $(quux -y)")) == {
        "foo", "bar", "baz", "qux", "quux"}


@pytest.mark.parametrize("row", [r for r in programs.rows() if r.debian], ids=lambda r: f"{r.program}:{r.package}")
def test_each_debian_row_is_on_the_install_list_and_its_package_provides_the_program(row: programs.Row) -> None:
    lists = _make_lists()
    wanted = "bench" if row.uses == {"bench"} else "apt"
    assert row.package in lists[wanted], f"{row.package} (deps/programs.txt:{row.line}) is not in make's {wanted} list"
    if row.program is None:
        return
    found = programs.find(row.program, system=True)
    if found is None and wanted == "bench":
        # make test does not install the benchmarks' packages: the archive must have this one for `make bench`.
        show = subprocess.run(["apt-cache", "show", "--no-all-versions", row.package], capture_output=True, text=True,
                              check=False)
        assert f"Package: {row.package}" in show.stdout, f"apt knows no package {row.package}"
        assert re.search(rf"^Package: {re.escape(row.package)}$", show.stdout, re.M)
        return
    assert found is not None, f"missing tool: {row.program} ({row.how_to_install()})"
    assert _dpkg_owner(found) == row.package, (
        f"{row.program} at {found} comes from {_dpkg_owner(found)}, not {row.package} (deps/programs.txt:{row.line})")


@pytest.mark.parametrize("row", [r for r in programs.rows() if r.built], ids=lambda r: f"{r.program}:{r.package}")
def test_each_built_row_is_what_its_builder_makes(row: programs.Row) -> None:
    assert row.package == f"build:{build.BINARY_NAME}" and row.program == build.KUBECTL_NAME, (
        f"deps/programs.txt:{row.line}: tests/k8s/build.py builds {build.BINARY_NAME} and {build.KUBECTL_NAME} only")
    assert "make " + build.BINARY_NAME in row.how_to_install()
    assert re.search(rf"^{build.BINARY_NAME}:", (REPO / "Makefile").read_text(), re.M)
    with pytest.raises(KeyError, match="built by the tests"):
        programs.missing([row.program])


@pytest.mark.parametrize("row", [r for r in programs.rows() if r.pip], ids=lambda r: f"{r.program}:{r.package}")
def test_each_pip_row_is_a_dependency_in_the_virtualenv(row: programs.Row) -> None:
    distribution = row.package.removeprefix("pip:")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'^name = "{distribution}"$|"{distribution}[<>=!~ ]', pyproject, re.M), (
        f"{distribution} is not in pyproject.toml")
    assert row.program is not None and (programs.VENV_BIN / row.program).exists(), (
        f"{row.program} is not in .venv/bin ({row.how_to_install()})")


def test_install_sh_installs_every_agent_package() -> None:
    agent = {r.package for r in programs.rows() if r.debian and "agent" in r.uses}
    out = subprocess.run(["bash", str(REPO / "systemd" / "install.sh"), "--print-packages"], capture_output=True,
                         text=True, check=True).stdout
    assert set(out.split()) == agent


def test_a_missing_program_is_named_with_its_package(tmp_path: Path) -> None:
    table = tmp_path / "programs.txt"
    table.write_text("# program package uses\nno-such-program-x  some-package  test\n")
    assert programs.missing(["no-such-program-x"], table) == [
        "missing tool: no-such-program-x (Debian package some-package, installed by `make demo` / `make test`)"]
    with pytest.raises(KeyError, match="ping is not in"):
        programs.missing(["ping"], table)

"""config.load in a child process, for the running agent: the same parse and checks as `lbagent check`, and the
model handed back pickled.

The config schemas are pydantic models with thousands of validators: importing them costs 27 MiB, which an agent
that parsed in process would keep for its whole life, for a parse it runs at start and on SIGHUP only (an idle
agent with 1,000 services used 96 MiB, 61 of them imported code; docs/benchmarks.md, "Idle"). A child costs
about 0.4 s more per load (a Python start and the imports), next to 3 s for a 10,000-service file.

    python -m lbagent.sources.file.apart PATH     # writes the pickled outcome to stdout
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from lbagent import model
from lbagent.sources import Problem, SourceError

MODULE = "lbagent.sources.file.apart"


def load(path: str | Path, warnings: list[Problem] | None = None) -> model.Model:
    """config.load(path, warnings) run in a child process; its problems raise SourceError with every one of them,
    as config.ConfigError (a SourceError) would."""
    proc = subprocess.run([sys.executable, "-m", MODULE, str(path)], capture_output=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise SourceError(str(path), [Problem("", str(path), f"the config loader (python -m {MODULE}) exited "
                                                             f"{proc.returncode}: {' / '.join(tail) or 'no output'}")])
    outcome = pickle.loads(proc.stdout)  # our own child's output, over a pipe only we hold
    if outcome[0] == "problems":
        raise SourceError(outcome[1], outcome[2])
    _, loaded, said = outcome
    if warnings is not None:
        warnings.extend(said)
    assert isinstance(loaded, model.Model)
    return loaded


def main(argv: list[str]) -> int:
    from lbagent.sources.file import config  # noqa: PLC0415 - here only: the parent never imports it

    if len(argv) != 1:
        print(f"usage: python -m {MODULE} PATH", file=sys.stderr)
        return 2
    warnings: list[Problem] = []
    try:
        outcome: tuple[object, ...] = ("model", config.load(argv[0], warnings), warnings)
    except config.ConfigError as exc:
        outcome = ("problems", exc.source, list(exc.problems))
    sys.stdout.buffer.write(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

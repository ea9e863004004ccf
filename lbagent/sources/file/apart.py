"""config.load in a child process, for the running agent: the same parse and checks as `lbagent check`, and the
model handed back pickled.

The config schemas are pydantic models with thousands of validators: importing them costs 27 MiB, which an agent
that parsed in process would keep for its whole life, for a parse it runs at start and on SIGHUP only (an idle
agent with 1,000 services used 96 MiB, 61 of them imported code; docs/benchmarks.md, "Idle"). A child costs
about 0.4 s more per load (a Python start and the imports), next to 3 s for a 10,000-service file.

The model comes back in pieces: first the model without its services, routes and static backends, then those in
chunks of CHUNK, each a pickle of its own. `pickle.loads` holds the GIL for its whole run, so a load's worker thread
stops the agent's event loop for as long as one `loads` takes: a whole model of 4,000 routes takes about 0.13 s in
one piece, a chunk of it 8 ms at most (docs/benchmarks.md, "The agent's reload since the parse moved to a child
process").

    python -m lbagent.sources.file.apart PATH     # writes the pickled outcome to stdout
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from lbagent import model
from lbagent.sources import Problem, SourceError

MODULE = "lbagent.sources.file.apart"
# The model's fields sent in chunks, and a chunk's length (250 services unpickle in a few ms).
CHUNKED = ("services", "routes", "backends")
CHUNK = 250


def load(path: str | Path, warnings: list[Problem] | None = None) -> model.Model:
    """config.load(path, warnings) run in a child process; its problems raise SourceError with every one of them,
    as config.ConfigError (a SourceError) would."""
    proc = subprocess.run([sys.executable, "-m", MODULE, str(path)], capture_output=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise SourceError(str(path), [Problem("", str(path), f"the config loader (python -m {MODULE}) exited "
                                                             f"{proc.returncode}: {' / '.join(tail) or 'no output'}")])
    stream = io.BytesIO(proc.stdout)  # our own child's output, over a pipe only we hold
    outcome = pickle.load(stream)
    if outcome[0] == "problems":
        raise SourceError(outcome[1], outcome[2])
    _, shell, said, counts = outcome
    assert isinstance(shell, model.Model)
    parts: dict[str, Any] = {}
    for name, count in counts.items():
        items: list[object] = []
        while len(items) < count:
            items.extend(pickle.load(stream))  # one chunk: the loop may run between two
        parts[name] = tuple(items)
    if warnings is not None:
        warnings.extend(said)
    return replace(shell, **parts)


def main(argv: list[str]) -> int:
    from lbagent.sources.file import config  # noqa: PLC0415 - here only: the parent never imports it

    if len(argv) != 1:
        print(f"usage: python -m {MODULE} PATH", file=sys.stderr)
        return 2
    warnings: list[Problem] = []
    out = sys.stdout.buffer
    try:
        loaded = config.load(argv[0], warnings)
    except config.ConfigError as exc:
        _dump(("problems", exc.source, list(exc.problems)), out)
        return 0
    chunked = {name: getattr(loaded, name) for name in CHUNKED}
    empty: dict[str, Any] = dict.fromkeys(CHUNKED, ())
    _dump(("model", replace(loaded, **empty), warnings,
           {name: len(items) for name, items in chunked.items()}), out)
    for items in chunked.values():
        for start in range(0, len(items), CHUNK):
            _dump(items[start:start + CHUNK], out)
    return 0


def _dump(obj: object, out: BinaryIO) -> None:
    pickle.dump(obj, out, protocol=pickle.HIGHEST_PROTOCOL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

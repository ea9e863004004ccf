"""The drift watchers against the real kernel, in a network namespace the test makes: which nftables commits and
which address removals they report, and which they do not (lbagent's own, other tables, set elements)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.netns import run_python, throwaway_netns

# Runs inside the namespace: both watchers, then commits and removals by this process's children; prints what
# the watchers reported once each step's own marker (a change to another table / address) has been seen.
STEP = r"""
import asyncio, json, subprocess
from lbagent.l4 import drift, nft as runner
from lbagent.l3 import vips

async def main():
    changes, removed, lost = [], [], []
    watcher = drift.NftWatcher(lambda: {("inet", "lbagent")}, changes.append, lambda: lost.append(1))
    sock_task = asyncio.create_task(watcher.run())
    addr_task = asyncio.create_task(vips.watch_removed_addresses("lo", removed.append))

    async def nft(*args, own=False, script=None):
        proc = await asyncio.create_subprocess_exec("nft", *args, stdin=asyncio.subprocess.PIPE)
        if own:
            drift.remember_own(proc.pid)
        await proc.communicate(script.encode() if script else None)
        assert proc.returncode == 0, args

    async def until(predicate):
        async with asyncio.timeout(30):
            while not predicate():
                await asyncio.sleep(0.01)

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # the watchers listen once a marker address removal shows up (the nft socket is opened first)
    n = 0
    while not removed:
        n += 1
        subprocess.run(["ip", "addr", "add", f"198.51.100.{n}/32", "dev", "lo"], check=True)
        subprocess.run(["ip", "addr", "del", f"198.51.100.{n}/32", "dev", "lo"], check=True)
        await asyncio.sleep(0.05)
    removed.clear()
    # lbagent's own commits (nft started by lbagent): not drift, however large
    await nft("-f", "-", own=True, script="table inet lbagent {\n set s { type ipv4_addr; elements = { "
              + ", ".join(f"192.0.2.{i}" for i in range(1, 255)) + " } }\n chain c { type filter hook "
              "prerouting priority 0; ip daddr @s accept\n }\n}\n")
    # lbagent's own commits in process (libnftables): not drift either, the first one (which binds the context's
    # socket) included
    await runner.apply_script("flush chain inet lbagent c\nadd rule inet lbagent c ip daddr @s accept\n")
    await runner.apply_script("add chain inet lbagent d\nadd rule inet lbagent d ip daddr @s accept\n")
    # another table by someone else: not lbagent's
    await nft("add", "table", "inet", "other")
    # someone else's element change in lbagent's table: filtered out in the kernel (the resync repairs it)
    await nft("delete", "element", "inet", "lbagent", "s", "{ 192.0.2.7 }")
    # someone else deletes a rule, then the whole table
    await nft("flush", "chain", "inet", "lbagent", "c")
    await nft("delete", "table", "inet", "lbagent")
    await until(lambda: len(changes) >= 2)
    # a VIP taken off the interface
    subprocess.run(["ip", "addr", "add", "192.0.2.10/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "addr", "add", "2001:db8::10/128", "dev", "lo", "nodad"], check=True)
    subprocess.run(["ip", "addr", "del", "192.0.2.10/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "addr", "del", "2001:db8::10/128", "dev", "lo"], check=True)
    await until(lambda: len(removed) >= 2)
    sock_task.cancel(); addr_task.cancel()
    print(json.dumps({"changes": [[c.what, c.process] for c in changes], "removed": sorted(map(str, removed)),
                      "lost": len(lost)}))

asyncio.run(main())
"""


@pytest.fixture
def netns() -> Iterator[str]:
    with throwaway_netns("drift") as (name,):
        yield name


@pytest.mark.parametrize("pid_namespace", [False, True], ids=["host-pids", "own-pid-namespace"])
def test_watchers_report_foreign_changes_to_lbagents_table_and_removed_addresses(netns: str,
                                                                                  pid_namespace: bool) -> None:
    """In its own pid namespace (a container, or CI's fresh root) the kernel names committers by pids lbagent
    never saw; lbagent's own commits must still be known as its own, or every repair would look like drift."""
    inner = ["unshare", "--pid", "--fork", "--mount-proc"] if pid_namespace else []
    result = run_python(netns, STEP, wrap=inner)
    # exactly the two foreign commits to lbagent's table, each named: not lbagent's own, not the other table,
    # not the element deletion
    assert result["changes"] == [["delete rule inet lbagent", "nft"],
                                 ["delete rule inet lbagent, delete set inet lbagent, delete chain inet lbagent, "
                                  "delete table inet lbagent", "nft"]], result
    assert result["removed"] == ["192.0.2.10", "2001:db8::10"]
    assert result["lost"] == 0

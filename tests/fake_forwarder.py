"""FakeForwarder: the real nftables forwarder with the kernel left out, for tests of the agent's sequencing.

It keeps the real forwarder's promises (what apply answers, what `applied` and `programmed()` say afterwards, which
scripts it would send and that the kernel takes them, how it fails): tests/unit/test_fake_forwarder.py runs the
same steps on both, the real one in a network namespace.
"""

from __future__ import annotations

from lbagent import model
from lbagent.l4.nft import NftError
from lbagent.l4.nftables.apply import NftForwarder
from lbagent.l4.nftables.render import Transaction, render_full


class FakeForwarder(NftForwarder):
    """The real nftables forwarder (full and incremental paths) with the kernel left out: every script it would
    send to nft is kept in `scripts`; with `fail` set, nft refuses every script (the kernel keeps what it had)."""

    def __init__(self, dataplane: model.Dataplane | None = None) -> None:
        super().__init__(dataplane or model.Dataplane())
        self.fail = False
        self.scripts: list[str] = []

    async def _run(self, script: str) -> None:
        if self.fail:
            raise NftError("nft refused")
        self.scripts.append(script)

    async def _run_change(self, transaction: Transaction) -> str:
        await self._run(transaction.script())  # the whole change as one script, as nft would take it
        return "nft"

    async def _run_side_by_side(self, scripts: list[str]) -> None:
        for script in scripts:
            await self._run(script)

    async def _tables_present(self) -> set[str]:
        return set()  # the fake's kernel holds what `applied` says, and nothing when it says nothing

    @property
    def text(self) -> str:
        """The whole table as the forwarder believes the kernel holds it ("" when it does not know)."""
        return render_full(self.applied) if self.applied is not None else ""

"""The IPVS data plane: reads the kernel's services, sends the ops that make them match, and keeps its nft table."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from pyroute2 import AsyncIPVS, IPVSDest, IPVSService
from pyroute2.netlink.exceptions import NetlinkError

from lbagent import model
from lbagent.l4.change import FrontendChange
from lbagent.l4.ipvs import render
from lbagent.l4.ipvs.render import Companion, Op, OpKind, Service, ServiceKey
from lbagent.l4.nft import NftError, run_nft
from lbagent.l4.routes import on_link_paths
from lbagent.logfmt import event
from lbagent.plan.services import Frontend

log = logging.getLogger("lbagent.dataplane")

NftRunner = Callable[[list[str], str | None], Awaitable[str]]


class IpvsError(RuntimeError):
    """The kernel refused an IPVS request; the next apply reads the kernel afresh and repairs from there."""


_NETLINK_GENERIC, _GENL_ID_CTRL, _CTRL_CMD_GETFAMILY, _CTRL_ATTR_FAMILY_NAME = 16, 16, 3, 2
_NLMSG_ERROR, _NLM_F_REQUEST_ACK = 2, 0x1 | 0x4


def load_ipvs() -> None:
    """Make sure the kernel has IPVS, loading ip_vs if it is a module; IpvsError if it has none.

    Looking the IPVS generic netlink family up is what loads the module (the kernel asks modprobe for the family's
    alias), with no modprobe needed here. Until then /proc/sys/net/ipv4/vs does not exist, so the agent's IPVS
    sysctls cannot be written before this. Plain blocking socket calls: safe inside or outside an event loop, where
    pyroute2's synchronous classes are not.
    """
    name = b"IPVS\0"
    attr = struct.pack("=HH", 4 + len(name), _CTRL_ATTR_FAMILY_NAME) + name + b"\0" * (-len(name) % 4)
    body = struct.pack("=BBH", _CTRL_CMD_GETFAMILY, 1, 0) + attr
    request = struct.pack("=IHHII", 16 + len(body), _GENL_ID_CTRL, _NLM_F_REQUEST_ACK, 1, 0) + body
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC) as sock:
            sock.settimeout(10)
            sock.send(request)
            reply = sock.recv(65536)
    except OSError as exc:
        raise IpvsError(f"cannot ask the kernel for IPVS: {exc}") from exc
    kind = struct.unpack_from("=IH", reply)[1]
    code = -struct.unpack_from("=i", reply, 16)[0] if kind == _NLMSG_ERROR else 0
    if code:
        raise IpvsError(f"this kernel has no IPVS (generic netlink family IPVS: {os.strerror(code)}): "
                        "built without CONFIG_IP_VS, or the ip_vs module is not installed")


def _service_msg(key: ServiceKey, attributes: render.Attributes | None = None) -> IPVSService:
    fields: dict[str, object] = {
        "addr": str(key.vip), "port": key.port, "protocol": render.IPPROTO[key.protocol],
        "netmask": render.NETMASK[key.family],
    }
    if attributes is not None:
        fields |= {
            "sched_name": attributes.scheduler, "timeout": attributes.timeout, "netmask": attributes.netmask,
            # The mask leaves the kernel's own HASHED flag alone and sets every other one as given.
            "flags": {"flags": attributes.flags, "mask": render.FLAGS_MASK},
        }
    return IPVSService(**fields)


def _dest_msg(op: Op) -> IPVSDest:
    assert op.dest is not None
    # fwd_method must be explicit: pyroute2's IPVSDest defaults to direct routing.
    return IPVSDest(addr=str(op.dest.address), port=op.dest.port, fwd_method=op.fwd_method, weight=op.weight)


def _read_proc() -> str:
    """/proc/net/ip_vs of this thread's network namespace, where the IPVS sockets were made. Read in the event
    loop's own thread on purpose: a worker thread could be in another namespace, and procfs does not block."""
    try:
        with open("/proc/thread-self/net/ip_vs") as proc:
            return proc.read()
    except OSError as exc:
        raise IpvsError(f"cannot read /proc/net/ip_vs: {exc}") from exc


def _attrs(msg: Any, nla: str) -> dict[str, Any]:
    # The raw attributes: IPVSService/IPVSDest.from_message would keep pyroute2's class defaults for some of them.
    return dict(msg.get(nla)["attrs"])


class IpvsForwarder:
    """IPVS services (NAT to the nodePorts; dsr: direct routing to the nodes) for the frontends, with
    `table inet <dataplane.table>_ipvs` beside them.

    Every apply reads the kernel's services back (all of them, or with a change record only those of the changed
    services and those still draining), so connection counts are current and anything changed behind lbagent's back
    is repaired; the nft table is kept in memory and sent as element changes. See lbagent.l4.ipvs.render for the
    ownership rule, graceful removal and what the nft table does.
    """

    kind = model.DataplaneKind.IPVS

    def __init__(self, dataplane: model.Dataplane, nft: NftRunner = run_nft) -> None:
        self.dataplane = dataplane
        self.table = render.companion_table(dataplane)
        self._nft = nft
        self._companion: Companion | None = None  # what the kernel's nft table holds; None: unknown, write it whole
        self._recorded: set[ServiceKey] = set()
        self._state: dict[ServiceKey, render.Service] = {}  # lbagent's services as after the last apply
        self._draining: set[ServiceKey] = set()
        self._vips: set[model.IPAddress] = set()  # the VIPs of the last apply: whatever is on them is lbagent's
        self.last_ops: list[Op] = []  # what the last apply sent, for logs and tests
        self._not_on_link: frozenset[str] = frozenset()  # dsr backends left out, as last logged ("node address")

    # -- the Forwarder interface ----------------------------------------------------------------------

    async def apply(
        self, frontends: Sequence[Frontend], vips: Sequence[model.IPAddress], force: bool = False,
        change: FrontendChange | None = None,
    ) -> str:
        """`change`: only those services' frontends, before and after (and the draining ones), are read back and
        diffed."""
        scope: set[ServiceKey] | None = None
        if change is not None and not force and self._companion is not None:
            scope = {render.key_of(f) for f in [*change.old(), *change.new()]} | self._draining
        try:
            return await self._apply(await self._on_link(frontends), set(vips), scope, force)
        except BaseException:
            # Whatever got through, the next call reads everything again and rewrites the nft table whole.
            self._companion = None
            raise

    def programmed(self) -> set[model.IPAddress]:
        return render.programmed(self._state)

    def nft_tables(self) -> set[tuple[str, str]]:
        # The IPVS services themselves send no netlink events: the periodic resync repairs them.
        return {("inet", self.table)}

    async def cleanup(self) -> None:
        """Delete every IPVS service lbagent owns (recorded, or on a VIP it was last given), then its nft table."""
        recorded = await self._read_record()
        owned = render.owns(self._vips, recorded | set(self._state))
        async with await self._ipvs() as ipvs:
            for key in await self._services(ipvs, owned):
                await self._send(ipvs, Op(OpKind.DEL_SERVICE, key))
        await self._nft(["-f", "-"], render.render_companion_delete(self.table))
        self._companion, self._recorded, self._state, self._draining = None, set(), {}, set()

    # -- applying ---------------------------------------------------------------------------------------

    async def _on_link(self, frontends: Sequence[Frontend]) -> list[Frontend]:
        """The frontends with their dsr backends limited to the nodes this host reaches on-link: direct routing
        sends the unchanged packet to the node's MAC address, which a node behind a gateway does not have here
        (the kernel would ask for it on the gateway's segment and never get it). Those left out are logged
        whenever the set changes, as the nftables data plane does."""
        addresses = render.dsr_addresses(frontends)
        paths: dict[str, str] = {}
        if addresses:
            paths, _ = await asyncio.to_thread(on_link_paths, addresses, ())
        kept, left_out = render.on_link_only(frontends, paths)
        reported = frozenset(f"{node} {address}" for address, node in left_out.items())
        if reported != self._not_on_link:
            self._not_on_link = reported
            if reported:
                event(log, logging.ERROR, "dsr_node_not_on_link", nodes=",".join(sorted(reported)),
                      error="IPVS direct routing reaches only nodes on this host's segments: left out of dsr "
                            "frontends (route them without a gateway, or use nat)")
        return kept

    async def _apply(
        self, frontends: list[Frontend], vips: set[model.IPAddress], scope: set[ServiceKey] | None, force: bool
    ) -> str:
        if self._companion is None:
            # Known in memory from then on: a resync rewrites the table whole from memory, record included.
            self._recorded = await self._read_record()
        owned = render.owns(vips | self._vips, self._recorded | set(self._state))
        everything = render.desired(frontends)
        want = everything if scope is None else {k: s for k, s in everything.items() if k in scope}
        async with await self._ipvs() as ipvs:
            actual = await self._read(ipvs, owned, scope)
            ops = render.diff(actual, want, owned)
            result = render.after(actual, ops)
            state = result if scope is None else {
                **{k: s for k, s in self._state.items() if k not in scope}, **result
            }
            post = render.companion(self.table, frontends, vips, state)
            # Before the services change, the nft table holds both what was and what will be: a service is recorded
            # as lbagent's before it exists, and keeps its source filter and masquerade until it is gone.
            if self._companion is None or force:
                known = render.companion(self.table, (), (), self._recorded | set(actual) | set(self._state))
                pre = render.merge(known if self._companion is None else self._companion, post)
                await self._nft(["-f", "-"], render.render_companion(pre))
                how = "full"
            else:
                pre = render.merge(self._companion, post)
                script = render.render_companion_delta(self._companion, pre)
                if script:
                    await self._nft(["-f", "-"], script)
                how = "delta" if script or ops else "unchanged"
            self._companion = pre
            for op in ops:
                await self._send(ipvs, op)
        script = render.render_companion_delta(pre, post)
        if script:
            await self._nft(["-f", "-"], script)
        self._companion = post
        self._recorded = set(state)
        self._state = state
        self._draining = render.draining(state, everything)
        self._vips = vips
        self.last_ops = ops
        if ops or how == "full":
            event(log, logging.INFO, "dataplane_applied", kind="ipvs", how=how, ops=len(ops),
                  services=len(state), draining=len(self._draining))
        for op in ops:
            event(log, logging.DEBUG, "ipvs_op", op=str(op))
        return how

    async def _ipvs(self) -> AsyncIPVS:
        """A generic netlink socket bound to the IPVS family, in this thread's network namespace."""
        sock = AsyncIPVS()
        try:
            await sock.setup_endpoint()
        except (NetlinkError, OSError) as exc:
            sock.close()
            raise IpvsError(f"cannot reach IPVS (is the ip_vs module available? modprobe ip_vs): {exc}") from exc
        return sock

    async def _services(self, ipvs: AsyncIPVS, owned: Callable[[ServiceKey], bool]) -> dict[ServiceKey, Service]:
        """The owned services in the kernel, without their real servers."""
        out: dict[ServiceKey, Service] = {}
        try:
            messages = await ipvs.service("dump")
        except NetlinkError as exc:
            raise IpvsError(f"cannot list IPVS services: {exc}") from exc
        for msg in messages:
            parsed = render.service_from_attrs(_attrs(msg, "IPVS_CMD_ATTR_SERVICE"))
            if parsed is not None and owned(parsed[0]):
                out[parsed[0]] = Service(parsed[1])
        return out

    async def _read(
        self, ipvs: AsyncIPVS, owned: Callable[[ServiceKey], bool], scope: Collection[ServiceKey] | None
    ) -> dict[ServiceKey, Service]:
        """The owned services with their real servers and connection counts: all of them in two reads (a netlink
        dump, /proc/net/ip_vs), or only those in `scope`, two netlink requests each."""
        if scope is None:
            services = await self._services(ipvs, owned)
            dests = render.parse_proc(_read_proc())
            return {key: Service(s.attributes, dests.get(key, {})) for key, s in services.items()}
        out = {}
        for key in sorted(scope, key=render.order):
            try:
                messages = await ipvs.service("get", service=_service_msg(key))
                parsed = [render.service_from_attrs(_attrs(m, "IPVS_CMD_ATTR_SERVICE")) for m in messages
                          if m.get("IPVS_CMD_ATTR_SERVICE") is not None]
                if not parsed or parsed[0] is None:
                    continue
                dumped = await ipvs.dest("dump", service=_service_msg(key))
            except NetlinkError as exc:
                if exc.code == errno.ESRCH:  # no such service (or deleted since)
                    continue
                raise IpvsError(f"cannot read the IPVS service {key}: {exc}") from exc
            servers = dict(render.dest_from_attrs(_attrs(m, "IPVS_CMD_ATTR_DEST")) for m in dumped)
            out[key] = Service(parsed[0][1], servers)
        return out

    async def _send(self, ipvs: AsyncIPVS, op: Op) -> None:
        try:
            if op.kind is OpKind.ADD_SERVICE:
                await ipvs.service("add", service=_service_msg(op.key, op.attributes))
            elif op.kind is OpKind.SET_SERVICE:
                # "set", never "update": pyroute2 0.9 maps "update" to the kernel's DELETE.
                await ipvs.service("set", service=_service_msg(op.key, op.attributes))
            elif op.kind is OpKind.DEL_SERVICE:
                await ipvs.service("del", service=_service_msg(op.key))
            elif op.kind is OpKind.ADD_DEST:
                await ipvs.dest("add", service=_service_msg(op.key), dest=_dest_msg(op))
            elif op.kind is OpKind.SET_DEST:
                await ipvs.dest("set", service=_service_msg(op.key), dest=_dest_msg(op))
            else:
                await ipvs.dest("del", service=_service_msg(op.key), dest=_dest_msg(op))
        except NetlinkError as exc:
            # Already gone is what a deletion wants (ESRCH: no such service, ENOENT: no such real server).
            if op.kind in (OpKind.DEL_SERVICE, OpKind.DEL_DEST) and exc.code in (errno.ESRCH, errno.ENOENT):
                return
            raise IpvsError(f"IPVS refused {op}: {exc}") from exc

    async def _read_record(self) -> set[ServiceKey]:
        """The services the nft table records as lbagent's (none when there is no table)."""
        try:
            listing = await self._nft(["-j", "list", "table", "inet", self.table], None)
        except NftError:
            tables = json.loads(await self._nft(["-j", "list", "tables", "inet"], None))
            if any(item.get("table", {}).get("name") == self.table for item in tables.get("nftables", [])):
                raise
            return set()
        return render.recorded(listing, self.table)

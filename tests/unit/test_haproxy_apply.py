"""lbagent.l7.process and lbagent.l7.runtime against the real HAProxy (Debian's 2.6): start, runtime API, seamless
reloads, refusals, supervision, certificates, stop, adoption. The promises FakeProxy keeps too are in
tests/contracts/proxy.py.

No root needed: everything listens on 127.0.0.1, on ports the kernel hands out. The configs are written by hand
here, not by lbagent.l7.render. A test that needs HAProxy fails (never skips) when it is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lbagent.l7.process import ApplyResult, HaproxyProcess, ProxyLayer
from lbagent.l7.runtime import ProxyError, ServerRuntime, parse_servers_state, runtime_commands
from lbagent.plan.http import ServerState

READY, DRAIN, MAINT = ServerState.READY, ServerState.DRAIN, ServerState.MAINT
Runtime = dict[tuple[str, str], tuple[int, ServerState]]
REPO = Path(__file__).resolve().parents[2]


# ---- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture
def haproxy() -> str:
    path = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(path, os.X_OK):
        pytest.fail("these tests run the real HAProxy, which is not installed (apt-get install haproxy)")
    return path


def _haproxy_pids(directory: Path) -> list[int]:
    """Live (not zombie) haproxy processes whose command line names `directory`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"haproxy" in os.path.basename(args[0]) and any(str(directory).encode() in a for a in args):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """Short (unix socket paths are limited), and whatever HAProxy is still running on it is killed afterwards,
    whatever happened in the test."""
    directory = Path(tempfile.mkdtemp(prefix="lbhx-", dir="/tmp"))
    try:
        yield directory
    finally:
        for pid in _haproxy_pids(directory):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)


class Backend:
    """A tiny HTTP/1.1 keep-alive server answering its name; /slow answers after `slow` seconds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        self.slow_started = threading.Event()
        self.slow_requests = 0
        self.slow = 3.0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.startswith("/slow"):
                    backend.slow_requests += 1
                    backend.slow_started.set()
                    time.sleep(backend.slow)
                backend.hits += 1
                body = backend.name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a peer that went away mid-answer is not news here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    one, two = Backend("one"), Backend("two")
    try:
        yield one, two
    finally:
        one.close()
        two.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- configs written by hand ----------------------------------------------------------------------------------

DEFAULT: Runtime = {("app", "s1"): (10, READY), ("app", "s2"): (10, READY)}


def render(
    hp: HaproxyProcess, port: int, backends: tuple[Backend, Backend], generation: int = 1,
    servers: Mapping[tuple[str, str], tuple[int, ServerState]] = DEFAULT, bind: str = "", frontend: str = "",
) -> str:
    """A config like lbagent's: the admin socket, one frontend, one backend with both servers carrying their
    weights (and `disabled` when in maintenance) as of the render."""
    lines = []
    for name, backend in zip(("s1", "s2"), backends, strict=True):
        weight, state = servers[("app", name)]
        lines.append(f"    server {name} 127.0.0.1:{backend.port} weight {weight}"
                     + (" disabled" if state is MAINT else ""))
    server_lines = "\n".join(lines)
    return f"""global
    stats socket {hp.runtime_socket} mode 600 level admin expose-fd listeners
    stats timeout 10s
defaults
    mode http
    option idle-close-on-response
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout http-keep-alive 10s
frontend web
    bind 127.0.0.1:{port}{bind}
{frontend}    http-response set-header X-Generation {generation}
    default_backend app
backend app
    balance roundrobin
{server_lines}
"""


def structure(hp: HaproxyProcess, port: int, backends: tuple[Backend, Backend], generation: int = 1,
              bind: str = "", frontend: str = "") -> str:
    return render(hp, port, backends, generation, DEFAULT, bind, frontend)


# ---- helpers --------------------------------------------------------------------------------------------------


def run(hp: HaproxyProcess, scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            await scenario()
        finally:
            await hp.stop(1.0)

    asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def admin(hp: HaproxyProcess, command: str) -> str:
    reader, writer = await asyncio.open_unix_connection(hp.runtime_socket)
    writer.write(command.encode() + b"\n")
    writer.write_eof()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data.decode()


async def servers(hp: HaproxyProcess) -> dict[tuple[str, str], ServerRuntime]:
    return parse_servers_state(await admin(hp, "show servers state"))


def _get(port: int, path: str = "/") -> tuple[int, str, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode(), response.getheader("X-Generation")
    finally:
        conn.close()


async def get(port: int, path: str = "/") -> tuple[int, str, str | None]:
    return await asyncio.to_thread(_get, port, path)


async def spread(port: int, n: int = 20) -> Counter[str]:
    """Which backend answered each of `n` requests (new connections)."""
    def work() -> Counter[str]:
        out: Counter[str] = Counter()
        for _ in range(n):
            status, body, _ = _get(port)
            out[body if status == 200 else f"status {status}"] += 1
        return out

    return await asyncio.to_thread(work)


def text_of(path: str | Path) -> str:
    return Path(path).read_text()


def mode_of(path: str | Path) -> int:
    return Path(path).stat().st_mode & 0o777


def candidates(hp: HaproxyProcess) -> list[Path]:
    return list(hp.directory.glob("*candidate*"))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


# ---- the pure parts -------------------------------------------------------------------------------------------

# `show servers state` as HAProxy 2.6.12 printed it: s1 drained with weight 0, s2 `disabled` in the config.
SHOW_SERVERS_STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight \
srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state \
bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr \
srv_agent_addr srv_agent_port
3 be 1 s1 127.0.0.1 2 8 0 10 0 1 0 2 0 0 0 0 - 48081 - 0 0 - - 0
3 be 2 s2 127.0.0.1 0 5 20 20 0 1 0 0 8 0 0 0 - 48082 - 0 0 - - 0
3 be 3 s3 127.0.0.1 2 4 7 20 0 1 0 0 8 0 0 0 - 48083 - 0 0 - - 0

"""


def test_parse_servers_state() -> None:
    assert parse_servers_state(SHOW_SERVERS_STATE) == {
        ("be", "s1"): ServerRuntime(0, DRAIN, 8, 2),
        ("be", "s2"): ServerRuntime(20, MAINT, 5, 0),
        ("be", "s3"): ServerRuntime(7, READY, 4, 2),  # CMAINT alone: disabled in the config, set ready since
    }
    with pytest.raises(ProxyError, match="show servers state"):
        parse_servers_state("Unknown command.\n")


def test_runtime_commands_only_differences_in_a_safe_order() -> None:
    current = parse_servers_state(SHOW_SERVERS_STATE)
    desired: Runtime = {("be", "s1"): (0, DRAIN), ("be", "s2"): (30, READY), ("be", "s3"): (1, MAINT),
                        ("be", "gone"): (1, READY)}
    assert runtime_commands(current, desired) == [
        "set server be/s2 weight 30", "set server be/s2 state ready",  # the weight first, then it takes requests
        "set server be/s3 state maint", "set server be/s3 weight 1",  # out first, then the weight
    ]
    assert runtime_commands(current, {k: (v.weight, v.state) for k, v in current.items()}) == []


def test_missing_executable_and_undeclared_admin_socket_are_proxy_errors(runtime_dir: Path) -> None:
    hp = HaproxyProcess("/nonexistent/haproxy", runtime_dir)
    good = f"global\n    stats socket {hp.runtime_socket} mode 600 level admin\n"

    async def scenario() -> None:
        with pytest.raises(ProxyError, match="not an executable"):
            await hp.validate(good)
        with pytest.raises(ProxyError, match="does not declare"):
            await hp.validate("global\n    stats socket /tmp/elsewhere.sock level admin\n")
        assert not hp.up()

    asyncio.run(scenario())
    assert list((runtime_dir / "haproxy").glob("*candidate*")) == []


def test_haproxy_process_is_a_proxy_layer(runtime_dir: Path) -> None:
    layer: ProxyLayer = HaproxyProcess("haproxy", runtime_dir)
    assert layer.runtime_socket == str(runtime_dir / "haproxy" / "api.sock")
    with pytest.raises(ValueError, match="too deep"):
        HaproxyProcess("haproxy", "/tmp/" + "d" * 100)


# ---- the real HAProxy -----------------------------------------------------------------------------------------


def test_start_applies_runtime_state(haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]) -> None:
    hp = HaproxyProcess(haproxy, runtime_dir)
    port = free_port()
    desired: Runtime = {("app", "s1"): (10, READY), ("app", "s2"): (0, READY)}
    text = render(hp, port, backends)  # rendered with s2 at weight 10: the runtime API sets 0

    async def scenario() -> None:
        assert not hp.up()
        result = await hp.apply(text, structure(hp, port, backends), desired, "start")
        assert result == ApplyResult(reloaded=False, runtime_updates=1, started=True)
        assert hp.up() and hp.restarts == 0 and hp.reloads == {} and hp.runtime_updates == 1
        assert hp.last_commands == ["set server app/s2 weight 0"]
        state = await servers(hp)
        assert (state[("app", "s1")].weight, state[("app", "s2")].weight) == (10, 0)
        assert await spread(port) == {"one": 20}, "a server at weight 0 gets no requests"
        assert text_of(hp.config_path) == text and mode_of(hp.config_path) == 0o600
        assert mode_of(hp.master_socket) == 0o600 and mode_of(hp.runtime_socket) == 0o600
        assert candidates(hp) == []

    run(hp, scenario)


def test_runtime_only_change_sends_only_the_differences(
    haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]
) -> None:
    hp = HaproxyProcess(haproxy, runtime_dir)
    port = free_port()
    shape = structure(hp, port, backends)

    async def step(desired: Runtime) -> ApplyResult:
        return await hp.apply(render(hp, port, backends, servers=desired), shape, desired, "routes")

    async def scenario() -> None:
        assert await step(DEFAULT) == ApplyResult(False, 0, True)
        worker = hp.worker_pid
        assert worker is not None

        maint: Runtime = {("app", "s1"): (10, MAINT), ("app", "s2"): (20, READY)}
        assert await step(maint) == ApplyResult(False, 2, False)
        assert hp.last_commands == ["set server app/s1 state maint", "set server app/s2 weight 20"]
        state = await servers(hp)
        assert state[("app", "s1")].state is MAINT and state[("app", "s2")].weight == 20
        assert await spread(port) == {"two": 20}, "a server in maintenance gets no requests"
        assert text_of(hp.config_path) == render(hp, port, backends, servers=maint)

        drain: Runtime = {("app", "s1"): (5, DRAIN), ("app", "s2"): (20, READY)}
        assert await step(drain) == ApplyResult(False, 2, False)
        assert hp.last_commands == ["set server app/s1 state drain", "set server app/s1 weight 5"]
        state = await servers(hp)
        assert state[("app", "s1")] == ServerRuntime(5, DRAIN, 0x08, 2)
        assert await spread(port) == {"two": 20}, "a draining server gets no new requests"

        assert await step(drain) == ApplyResult(False, 0, False), "nothing to change: no command"
        assert hp.last_commands == []

        back: Runtime = {("app", "s1"): (20, READY), ("app", "s2"): (20, READY)}
        assert await step(back) == ApplyResult(False, 2, False)
        assert hp.last_commands == ["set server app/s1 weight 20", "set server app/s1 state ready"]
        assert await spread(port) == {"one": 10, "two": 10}

        assert hp.worker_pid == worker, "no reload"
        assert hp.reloads == {} and hp.runtime_updates == 6

    run(hp, scenario)


def test_structural_change_reloads_then_sets_runtime_state(
    haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend], caplog: pytest.LogCaptureFixture
) -> None:
    hp = HaproxyProcess(haproxy, runtime_dir)
    port = free_port()
    caplog.set_level("INFO", logger="lbagent.haproxy")

    async def scenario() -> None:
        await hp.apply(render(hp, port, backends), structure(hp, port, backends), DEFAULT, "start")
        master, worker = hp.master_pid, hp.worker_pid
        assert (await get(port))[2] == "1"

        # The text carries s2 at weight 10 while it should be 0 by now: the runtime state is set after the reload.
        desired: Runtime = {("app", "s1"): (10, READY), ("app", "s2"): (0, READY)}
        result = await hp.apply(render(hp, port, backends, 2), structure(hp, port, backends, 2), desired, "routes")
        assert result == ApplyResult(reloaded=True, runtime_updates=1, started=False)
        assert hp.last_commands == ["set server app/s2 weight 0"]
        assert hp.master_pid == master and hp.worker_pid not in (None, worker)
        assert hp.reloads == {"routes": 1}
        assert (await servers(hp))[("app", "s2")].weight == 0
        assert await spread(port) == {"one": 20}
        assert (await get(port))[2] == "2"
        reloaded = [r for r in caplog.records if r.getMessage() == "haproxy_reloaded"]
        assert [r.__dict__["lbagent_fields"]["reason"] for r in reloaded] == ["routes"]

        again = await hp.apply(render(hp, port, backends, 2), structure(hp, port, backends, 2), desired, "routes")
        assert again == ApplyResult(False, 0, False), "the same text again: no reload, no command"

    run(hp, scenario)


def test_refused_config_changes_nothing(haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]) -> None:
    hp = HaproxyProcess(haproxy, runtime_dir)
    port = free_port()

    async def scenario() -> None:
        text = render(hp, port, backends)
        await hp.apply(text, structure(hp, port, backends), DEFAULT, "start")
        worker = hp.worker_pid

        bad = render(hp, port, backends, 2, frontend="    bogus_keyword on\n")
        with pytest.raises(ProxyError, match="unknown keyword 'bogus_keyword'"):
            await hp.apply(bad, structure(hp, port, backends, 2, frontend="    bogus_keyword on\n"), DEFAULT,
                           "routes")
        assert hp.up() and hp.worker_pid == worker and hp.reloads == {}
        assert text_of(hp.config_path) == text
        assert candidates(hp) == []
        status, _, generation = await get(port)
        assert (status, generation) == (200, "1"), "still answered, by the running worker"

        # Valid for `haproxy -c`, yet the new worker cannot bind: the master keeps the running worker.
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        extra = f"\n    bind 127.0.0.1:{taken.getsockname()[1]}"
        with taken:
            with pytest.raises(ProxyError, match="cannot bind socket"):
                await hp.apply(render(hp, port, backends, 3, bind=extra),
                               structure(hp, port, backends, 3, bind=extra), DEFAULT, "listeners")
            assert hp.up() and hp.worker_pid == worker and hp.reloads == {}
            assert text_of(hp.config_path) == text, "the file a restart would read is the running one"
            assert (await get(port))[2] == "1"
        # The port is free now: the same change goes through.
        result = await hp.apply(render(hp, port, backends, 3, bind=extra),
                                structure(hp, port, backends, 3, bind=extra), DEFAULT, "listeners")
        assert result.reloaded and hp.reloads == {"listeners": 1} and hp.worker_pid != worker
        assert (await get(port))[2] == "3"

    run(hp, scenario)


def test_no_request_fails_across_reloads(haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]) -> None:
    """Three clients: keep-alive sending back to back, keep-alive idling 5 ms between requests (its connection
    is idle when the old worker soft-stops: without `option idle-close-on-response` some of its requests fail),
    and a new connection per request."""
    hp = HaproxyProcess(haproxy, runtime_dir)
    port = free_port()
    stop = threading.Event()
    errors: list[str] = []
    done = Counter[str]()
    seen = {"busy": "", "idling": "", "new": ""}  # the X-Generation each client saw last

    def keep_alive(name: str, pause: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.wait(pause):
            try:
                conn.request("GET", "/")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or body not in (b"one", b"two"):
                    errors.append(f"{name}: {response.status} {body[:80]!r}")
                seen[name] = response.getheader("X-Generation") or ""
                done[name] += 1
                if response.will_close:  # an old worker finishing: its last answer says so
                    conn.close()
                    done[f"{name} reconnects"] += 1
            except (OSError, http.client.HTTPException) as error:
                errors.append(f"{name}: {error!r}")
                conn.close()
        conn.close()

    def new_connections() -> None:
        while not stop.is_set():
            try:
                status, body, generation = _get(port)
                if status != 200 or body not in ("one", "two"):
                    errors.append(f"new: {status} {body[:80]!r}")
                seen["new"] = generation or ""
                done["new"] += 1
            except (OSError, http.client.HTTPException) as error:
                errors.append(f"new: {error!r}")

    def saw(generation: str) -> Callable[[], bool]:
        return lambda: all(v == generation for v in seen.values())

    async def scenario() -> None:
        await hp.apply(render(hp, port, backends, 0), structure(hp, port, backends, 0), DEFAULT, "start")
        clients = [threading.Thread(target=keep_alive, args=("busy", 0), daemon=True),
                   threading.Thread(target=keep_alive, args=("idling", 0.005), daemon=True),
                   threading.Thread(target=new_connections, daemon=True)]
        for client in clients:
            client.start()
        try:
            for generation in range(1, 11):
                text = render(hp, port, backends, generation)
                result = await hp.apply(text, structure(hp, port, backends, generation), DEFAULT, "routes")
                assert result.reloaded
                # Every client reaches the new worker before the next reload.
                assert await until(saw(str(generation)), 10), seen
        finally:
            stop.set()
            for client in clients:
                await asyncio.to_thread(client.join, 15)
        assert errors == []
        assert hp.reloads == {"routes": 10}
        assert min(done["busy"], done["idling"], done["new"]) > 30, done
        assert done["busy reconnects"] >= 10 and done["idling reconnects"] >= 10, done

    run(hp, scenario)


def test_killed_master_is_restarted(haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]) -> None:
    changes = Changes()
    hp = HaproxyProcess(haproxy, runtime_dir, changes, backoff=(0.3, 2.0))
    port = free_port()
    desired: Runtime = {("app", "s1"): (10, READY), ("app", "s2"): (0, READY)}

    async def scenario() -> None:
        await hp.apply(render(hp, port, backends), structure(hp, port, backends), desired, "start")
        master, worker = hp.master_pid, hp.worker_pid
        assert master is not None and worker is not None and changes.count == 0
        os.kill(master, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        killed = loop.time()
        assert await until(lambda: not hp.up(), 1.0)
        assert await until(lambda: changes.count == 1, 1.0)
        assert loop.time() - killed < 0.5, "up() turns false at once"
        assert await until(lambda: not alive(worker), 5.0), "the worker goes with its master"

        assert await until(hp.up, 10.0)
        assert await until(lambda: changes.count == 2, 1.0)
        assert hp.restarts == 1 and hp.master_pid not in (None, master) and hp.worker_pid != worker
        assert (await servers(hp))[("app", "s2")].weight == 0, "runtime state set again"
        assert await spread(port) == {"one": 20}
        # The agent's next apply finds it running: nothing to do.
        again = await hp.apply(render(hp, port, backends), structure(hp, port, backends), desired, "start")
        assert again == ApplyResult(False, 0, False)

    run(hp, scenario)


def test_killed_worker_is_noticed_and_everything_restarted(
    haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]
) -> None:
    changes = Changes()
    hp = HaproxyProcess(haproxy, runtime_dir, changes, backoff=(0.3, 2.0))
    port = free_port()

    async def scenario() -> None:
        await hp.apply(render(hp, port, backends), structure(hp, port, backends), DEFAULT, "start")
        master, worker = hp.master_pid, hp.worker_pid
        assert master is not None and worker is not None
        os.kill(worker, signal.SIGKILL)
        assert await until(lambda: not hp.up(), 0.5), "up() turns false as soon as the worker is gone"
        assert changes.count == 1
        # The agent's next apply: HAProxy is on its way back (the master leaves with its worker), or already
        # gone and then apply starts it itself.
        try:
            result = await hp.apply(render(hp, port, backends), structure(hp, port, backends), DEFAULT, "routes")
            assert result.started
        except ProxyError as error:
            assert "being restarted" in str(error)
        assert await until(hp.up, 10.0)
        assert hp.restarts == 1 and hp.master_pid != master and not alive(master)
        assert (await get(port))[0] == 200

    run(hp, scenario)


def make_certificate(name: str, serial: int) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(serial).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())).decode()


def served_certificate(port: int) -> x509.Certificate:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_set_certificate_replaces_the_served_one_without_reload(
    haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]
) -> None:
    hp = HaproxyProcess(haproxy, runtime_dir)
    port = free_port()
    pem = runtime_dir / "web.pem"
    pem.write_text(make_certificate("one.example", 1001))
    pem.chmod(0o600)
    tls = f" ssl crt {pem}"
    replacement = make_certificate("two.example", 2002)

    async def scenario() -> None:
        await hp.apply(render(hp, port, backends, bind=tls), structure(hp, port, backends, bind=tls), DEFAULT,
                       "start")
        worker = hp.worker_pid
        first = await asyncio.to_thread(served_certificate, port)
        assert first.serial_number == 1001
        await hp.set_certificate(str(pem), replacement)
        second = await asyncio.to_thread(served_certificate, port)
        assert second.serial_number == 2002
        assert second.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "two.example"
        assert hp.worker_pid == worker and hp.reloads == {}
        assert text_of(pem).strip() == replacement.strip() and mode_of(pem) == 0o600
        with pytest.raises(ProxyError, match="refused the certificate"):
            await hp.set_certificate(str(runtime_dir / "unknown.pem"), replacement)

    run(hp, scenario)


def test_stop_ends_every_process(haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]) -> None:
    hp = HaproxyProcess(haproxy, runtime_dir, kill_timeout=2.0)
    port = free_port()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # No connection open: the soft stop ends everything by itself, well within the grace.
        await hp.apply(render(hp, port, backends), structure(hp, port, backends), DEFAULT, "start")
        pids = _haproxy_pids(runtime_dir)
        assert len(pids) == 2
        begun = loop.time()
        await hp.stop(5.0)
        assert loop.time() - begun < 2.0
        assert not hp.up() and not any(alive(pid) for pid in pids)
        assert hp.pid_path not in map(str, hp.directory.iterdir())

        # A request in progress outlives the grace: the stop escalates, and still nothing is left.
        assert (await hp.apply(render(hp, port, backends), structure(hp, port, backends), DEFAULT, "start")).started
        assert hp.restarts == 0, "a start after a stop is no restart"
        pids = _haproxy_pids(runtime_dir)
        slow = asyncio.ensure_future(get(port, "/slow"))
        assert await asyncio.to_thread(lambda: backends[0].slow_started.wait(5) or backends[1].slow_started.wait(5))
        begun = loop.time()
        await hp.stop(0.3)
        assert 0.3 <= loop.time() - begun < 2.5
        assert not hp.up() and not any(alive(pid) for pid in pids)
        assert _haproxy_pids(runtime_dir) == []
        with contextlib.suppress(OSError, http.client.HTTPException):
            await slow

    run(hp, scenario)


ABANDONED_AGENT = """
import asyncio, sys
from lbagent.l7.process import HaproxyProcess
from lbagent.plan.http import ServerState

async def main():
    hp = HaproxyProcess(sys.argv[1], sys.argv[2])
    text = open(sys.argv[3]).read()
    await hp.apply(text, text, {}, "start")
    print(hp.master_pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_master_left_by_a_dead_agent_is_adopted(
    haproxy: str, runtime_dir: Path, backends: tuple[Backend, Backend]
) -> None:
    hp = HaproxyProcess(haproxy, runtime_dir)
    port = free_port()
    first = runtime_dir / "first.cfg"
    first.write_text(render(hp, port, backends, 1))
    agent = subprocess.Popen(
        [sys.executable, "-c", ABANDONED_AGENT, haproxy, str(runtime_dir), str(first)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert agent.stdout is not None
        master = int(agent.stdout.readline())
    finally:
        agent.kill()  # the agent dies without stopping HAProxy
        agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()
    assert alive(master)

    async def scenario() -> None:
        assert (await get(port))[2] == "1"
        result = await hp.apply(render(hp, port, backends, 2), structure(hp, port, backends, 2), DEFAULT, "start")
        assert result == ApplyResult(reloaded=True, runtime_updates=0, started=False)
        assert hp.master_pid == master and hp.up() and hp.reloads == {"start": 1}
        assert (await get(port))[2] == "2", "its output pipe has no reader any more, and it still reloads"

    run(hp, scenario)
    assert not alive(master) and _haproxy_pids(runtime_dir) == []

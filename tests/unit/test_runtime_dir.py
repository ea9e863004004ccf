"""The runtime directory and the files in it: another user's or a group/world-writable directory is refused (by
run and by check), it is created 0700, and nothing is ever written through a symbolic link. These tests run as
root: they give directories to `nobody`."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import stat
from pathlib import Path

import pytest
import yaml

from lbagent.agent import status
from lbagent.files import UnsafePath, prepare_runtime_dir, private_dir, runtime_dir_problems, write_private
from lbagent.l3 import bfd
from lbagent.l3 import speaker as bgp
from lbagent.l7 import process as haproxy
from lbagent.l7.certs import CertificateStore
from lbagent.l7.process import HaproxyProcess
from lbagent.ops import cli
from lbagent.sources.file import config
from tests.unit.test_agent import Harness

NOBODY = pwd.getpwnam("nobody")
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "lbagent.example.yaml"


@pytest.fixture(autouse=True)
def _as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (they give directories to nobody): run them as root, as `make test` does")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_directory_of_another_user_or_writable_by_others_is_refused_naming_path_owner_and_mode(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    assert runtime_dir_problems(str(run)) == []
    os.chown(run, NOBODY.pw_uid, NOBODY.pw_gid)
    assert runtime_dir_problems(str(run)) == [
        f"{run} (owner nobody (uid {NOBODY.pw_uid}), mode 0700) is owned by another user, who could replace what "
        f"the agent keeps in it"]
    with pytest.raises(UnsafePath):
        prepare_runtime_dir(str(run))
    assert run.stat().st_uid == NOBODY.pw_uid and _mode(run) == 0o700  # refused, left as it was

    os.chown(run, 0, 0)
    run.chmod(0o770)
    (problem,) = runtime_dir_problems(str(run))
    assert problem == f"{run} (owner root (uid 0), mode 0770) is writable by group or others, who could replace " \
                      f"what the agent keeps in it"

    # a directory above it, even when the runtime directory does not exist yet (the agent would create into it)
    run.chmod(0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (problem,) = runtime_dir_problems(str(shared / "a" / "run"))
    assert problem.startswith(f"{shared} (owner root (uid 0), mode 0777) is writable by group or others")
    assert not (shared / "a").exists()
    # the sticky bit of a root-owned directory (/tmp) keeps others from removing or renaming what is ours
    shared.chmod(0o1777)
    assert runtime_dir_problems(str(shared / "a" / "run")) == []
    # ... but not for the runtime directory itself
    (shared / "a").mkdir(mode=0o1777)
    (shared / "a").chmod(0o1777)
    assert len(runtime_dir_problems(str(shared / "a"))) == 1


def test_a_symbolic_link_as_the_runtime_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere")
    (problem,) = runtime_dir_problems(str(tmp_path / "run"))
    assert problem.startswith(f"{tmp_path / 'run'} (owner root (uid 0), mode 0777) is a symbolic link (to ")
    # a link above it that root owns is only a way there: what it leads to is checked
    (tmp_path / "up").symlink_to(tmp_path / "elsewhere")
    assert runtime_dir_problems(str(tmp_path / "up" / "run")) == []
    (tmp_path / "elsewhere").chmod(0o777)
    assert any(p.startswith(f"{tmp_path / 'elsewhere'} (owner root (uid 0), mode 0777) is writable")
               for p in runtime_dir_problems(str(tmp_path / "up" / "run")))


def test_the_runtime_directory_is_created_0700_and_made_0700(tmp_path: Path) -> None:
    run = tmp_path / "a" / "b" / "run"
    old = os.umask(0)
    try:
        prepare_runtime_dir(str(run))
    finally:
        os.umask(old)
    assert [_mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", run)] == [0o700, 0o700, 0o700]
    run.chmod(0o755)  # systemd's default for RuntimeDirectory=
    prepare_runtime_dir(str(run))
    assert _mode(run) == 0o700


def test_files_are_never_written_through_a_symbolic_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    run = prepare_runtime_dir(str(tmp_path / "run"))

    (run / "exabgp.conf").symlink_to(victim)  # a link where the file goes: refused
    with pytest.raises(UnsafePath, match="is a symbolic link: lbagent does not write through one"):
        write_private(run / "exabgp.conf", "neighbor ...\n")
    assert victim.read_text() == "keep me\n"

    (run / "haproxy.cfg.tmp").symlink_to(victim)  # a link where the temporary file goes: removed, not followed
    write_private(run / "haproxy.cfg", "global\n")
    assert victim.read_text() == "keep me\n"
    assert (run / "haproxy.cfg").read_text() == "global\n" and _mode(run / "haproxy.cfg") == 0o600
    assert not (run / "haproxy.cfg.tmp").exists()

    (run / "haproxy").symlink_to(tmp_path)  # a directory of the agent's own that is a link: refused
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        write_private(run / "haproxy" / "victim", "x\n")
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        private_dir(run / "haproxy")
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        private_dir(run / "haproxy" / "certs", base=run)
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        CertificateStore(run / "haproxy" / "certs", run).sync([])
    assert victim.read_text() == "keep me\n" and not (tmp_path / "certs").exists()

    nobodys = run / "nobodys"
    nobodys.mkdir()
    os.chown(nobodys, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(UnsafePath, match="is owned by another user"):
        private_dir(nobodys)


def test_run_refuses_an_unsafe_runtime_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path)
    run = h.runtime_dir  # made 0700 by the harness; handed to another user here
    os.chown(run, NOBODY.pw_uid, NOBODY.pw_gid)
    caplog.set_level(logging.INFO)
    assert asyncio.run(h.agent.run()) == 1
    (record,) = [r for r in caplog.records if r.getMessage() == "runtime_dir_unsafe"]
    assert f"{run} (owner nobody" in str(record.__dict__)
    assert h.speaker is None or not h.speaker.announced()
    assert not any(r.getMessage() == "agent_starting" for r in caplog.records)


def test_check_reports_an_unsafe_runtime_directory_with_its_line(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    run = tmp_path / "run"
    doc["agent"]["runtimeDir"] = str(run)
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert cli.main(["check", "--no-tools", "-c", str(path)]) == 0  # not there yet: the agent creates it 0700
    run.mkdir()
    run.chmod(0o777)
    assert cli.main(["check", "--no-tools", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "runtimeDir" in text)
    assert f"  line {line}: agent.runtimeDir: {run} (owner root (uid 0), mode 0777) is writable by group or " \
           f"others" in err


@pytest.mark.parametrize("value", ["/run/lb agent", "/run/lb;x", "/run/lb{x}", "/run/lbägent", "run/lbagent"])
def test_a_runtime_dir_that_cannot_go_unquoted_into_the_configs_is_refused(value: str) -> None:
    """A space would split ExaBGP's API command (`run python -m lbagent.l3.exabgp_bridge DIR/exabgp-api.sock`)
    and `exabgp validate` accepts it all the same: check must refuse it itself."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["agent"]["runtimeDir"] = value
    with pytest.raises(config.ConfigError) as refused:
        config.parse(yaml.safe_dump(doc))
    (problem,) = refused.value.problems
    assert problem.path == "agent.runtimeDir"
    doc["agent"]["runtimeDir"] = "/run/lbagent-2.lab_x"
    config.parse(yaml.safe_dump(doc))


def test_the_socket_names_check_knows_are_the_ones_the_agent_makes() -> None:
    """check's runtimeDir length limit is computed from names that agent/status.py, l3/speaker.py, l3/bfd.py and
    l7/process.py own: if one of them changes, this fails, not a node at start."""
    run = "/run/lbagent"
    proxy = HaproxyProcess("haproxy", run)
    speaker = bfd.BfdSpeaker(config.parse(EXAMPLE.read_text()).bgp, run)
    assert {status.SOCKET_NAME, bgp.SOCKET_NAME, *(os.path.relpath(os.path.join(speaker.vty_directory, name), run)
                                                   for name in (bfd.VTY_SOCKET, bfd.CONTROL_SOCKET))} == \
        set(config.RUNTIME_SOCKETS)
    assert {os.path.relpath(proxy.master_socket, run), os.path.relpath(proxy.runtime_socket, run)} == \
        set(config.HAPROXY_SOCKETS)
    assert (config.SUN_PATH_MAX, config.HAPROXY_SOCKET_TMP_SUFFIX) == (haproxy._SUN_PATH_MAX, haproxy._TMP_SUFFIX)


def test_a_runtime_dir_too_long_for_its_sockets_is_refused_by_check_not_at_start() -> None:
    """63 characters is the most HAProxy's sockets leave (with listeners); without listeners, status.sock and
    exabgp-api.sock leave more. What check accepts, the agent can start: HaproxyProcess takes the longest."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    service = doc["services"][0]
    doc["listeners"] = [{"name": "web", "vip": "192.0.2.80", "port": 80,
                         "defaultBackend": {"name": service["name"], "port": service["ports"][0]["port"]}}]
    longest = "/run/" + "l" * 58
    doc["agent"]["runtimeDir"] = longest
    config.parse(yaml.safe_dump(doc))
    HaproxyProcess("haproxy", longest)
    doc["agent"]["runtimeDir"] = longest + "x"
    with pytest.raises(config.ConfigError) as refused:
        config.parse(yaml.safe_dump(doc))
    (problem,) = refused.value.problems
    assert problem.path == "agent.runtimeDir"
    assert "at most 63 characters with listeners" in problem.message
    with pytest.raises(ValueError):
        HaproxyProcess("haproxy", longest + "x")
    del doc["listeners"]
    config.parse(yaml.safe_dump(doc))

"""ExaBGP rendering: golden configuration accepted by the real `exabgp validate`, commands, refusals."""

from __future__ import annotations

import base64
import configparser
import os
import subprocess
import sys
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from lbagent import model
from lbagent.l3 import render as exabgp
from lbagent.plan.services import Announcement
from tests import golden

EXABGP = Path(sys.executable).parent / "exabgp"
PASSWORD = 'p"a\\ss; #{x}'  # everything ExaBGP's tokeniser would misread
MD5_BASE64 = base64.b64encode(PASSWORD.encode()).decode()
API_RUN = f"{sys.executable} -m lbagent.l3.exabgp_bridge /run/lbagent/exabgp-api.sock"

BGP = model.Bgp(
    local_as=64513,
    router_id=ip_address("198.51.100.2"),  # type: ignore[arg-type]
    peers=(
        model.Peer(address=ip_address("198.51.100.1"), peer_as=64512, hold_time=9),
        model.Peer(
            address=ip_address("198.51.100.5"),
            peer_as=4200000000,
            hold_time=90,
            password=PASSWORD,
            multihop=3,
            local_address=ip_address("198.51.100.2"),
            port=1179,
        ),
        model.Peer(address=ip_address("2001:db8::1"), peer_as=64512, hold_time=0),
    ),
    graceful_restart=120,
)

LOOKED_UP = {
    ip_address("198.51.100.1"): ip_address("198.51.100.9"),
    # an explicit local_address wins over the lookup
    ip_address("198.51.100.5"): ip_address("198.51.100.77"),
}


def test_config_golden() -> None:
    text = exabgp.render_config(BGP, API_RUN, LOOKED_UP)
    # The API process runs this virtualenv's Python: the golden file says @PYTHON@ wherever that is.
    golden.check("exabgp", "three-peers.conf", text.replace(sys.executable, "@PYTHON@"))


def test_end_of_rib_is_for_the_family_of_the_session() -> None:
    assert exabgp.eor_command(ip_address("198.51.100.1")) == "neighbor 198.51.100.1 announce eor ipv4 unicast"
    assert exabgp.eor_command(ip_address("2001:db8::1")) == "neighbor 2001:db8::1 announce eor ipv6 unicast"


def test_minimal_peer_has_no_optional_lines() -> None:
    bgp = replace(BGP, peers=BGP.peers[:1], graceful_restart=None)
    text = exabgp.render_config(bgp, API_RUN)
    assert "local-address auto;" in text
    for absent in ("md5", "connect", "outgoing-ttl", "capability", "manual-eor"):
        assert absent not in text


def _exabgp(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / exabgp.ENV_FILE).write_text("")
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("exabgp")}
    env.update(exabgp.environment(str(tmp_path)))
    return subprocess.run(
        [str(EXABGP), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_real_exabgp_validates_the_config(tmp_path: Path) -> None:
    # `exabgp validate` parses the whole file offline, including that the `run` program exists.
    conf = tmp_path / "exabgp.conf"
    conf.write_text(exabgp.render_config(BGP, API_RUN, LOOKED_UP))
    result = _exabgp(tmp_path, "validate", str(conf))
    assert result.returncode == 0, result.stdout + result.stderr
    conf.write_text(exabgp.render_config(BGP, API_RUN).replace("hold-time 9;", "hold-time 9"))
    assert _exabgp(tmp_path, "validate", str(conf)).returncode != 0, "validate must catch a broken file"


def test_real_exabgp_takes_every_environment_setting(tmp_path: Path) -> None:
    result = _exabgp(tmp_path, "env")
    assert result.returncode == 0, result.stderr
    seen = configparser.ConfigParser()
    seen.read_string(result.stdout)
    settings = {k: v for k, v in exabgp.environment(str(tmp_path)).items() if k.startswith("exabgp.")}
    assert settings
    for name, value in settings.items():
        section, option = name.rsplit(".", 1)
        assert seen.has_option(section, option), f"exabgp does not know {name}"
        assert seen.get(section, option).strip("'").lower() == value.lower(), name
    assert exabgp.environment(str(tmp_path))["EXABGP_ENVFILE"] == f"{tmp_path}/exabgp.env"


def test_environment_keeps_root_and_acks() -> None:
    env = exabgp.environment("/run/lbagent")
    assert env["exabgp.daemon.user"] == "root"
    assert env["exabgp.daemon.drop"] == "false"
    assert env["exabgp.api.ack"] == "true"
    assert env["exabgp.api.cli"] == "false"
    with pytest.raises(ValueError):
        exabgp.environment("relative/dir")


def test_announce_command() -> None:
    a = Announcement("192.0.2.10/32", med=10, local_pref=200, communities=("64512:100", "65535:0"))
    assert exabgp.announce_command(a) == (
        "announce route 192.0.2.10/32 next-hop self med 10 local-preference 200 community [64512:100 65535:0]"
    )
    assert (
        exabgp.announce_command(Announcement("2001:db8::10/128"))
        == "announce route 2001:db8::10/128 next-hop self"
    )


def test_commands_to_chosen_neighbors() -> None:
    a = Announcement("192.0.2.10/32", med=0)
    peers = [ip_address("198.51.100.1"), ip_address("198.51.100.5")]
    assert exabgp.announce_command(a, peers) == (
        "neighbor 198.51.100.1 , neighbor 198.51.100.5 announce route 192.0.2.10/32 next-hop self med 0"
    )
    assert exabgp.withdraw_command(a, peers[:1]) == "neighbor 198.51.100.1 withdraw route 192.0.2.10/32"
    assert exabgp.withdraw_command(a) == "withdraw route 192.0.2.10/32"


@pytest.mark.parametrize(
    "announcement",
    [
        Announcement("192.0.2.10/32", communities=("64512:100\nannounce route 0.0.0.0/0 next-hop self",)),
        Announcement("192.0.2.10/32", communities=("64512:100]",)),
        Announcement("192.0.2.10/32", communities=("65536:1",)),
        Announcement("192.0.2.10/32", communities=("no-export",)),
        Announcement(
            "192.0.2.10/32", communities=("\uff16\uff14\uff15\uff11\uff12:1",)
        ),  # fullwidth digits match \d
        Announcement("192.0.2.10/32\n"),
        Announcement("192.0.2.10/32 next-hop 203.0.113.1"),
        Announcement("192.0.2.10/33"),
        Announcement("192.0.2.10/24"),  # host bits set
        Announcement("vip.example.com/32"),
        Announcement(""),
        Announcement("192.0.2.10/32", med=-1),
        Announcement("192.0.2.10/32", med=2**32),
        Announcement("192.0.2.10/32", med=True),
        Announcement("192.0.2.10/32", local_pref="100"),  # type: ignore[arg-type]
    ],
)
def test_bad_values_never_reach_a_command(announcement: Announcement) -> None:
    with pytest.raises(ValueError):
        exabgp.announce_command(announcement)
    if announcement.med is None and announcement.local_pref is None and not announcement.communities:
        with pytest.raises(ValueError):
            exabgp.withdraw_command(announcement)


def test_bad_neighbor_in_a_selector() -> None:
    with pytest.raises(ValueError):
        bad: list[Any] = ["198.51.100.1\nannounce"]
        exabgp.withdraw_command(Announcement("192.0.2.10/32"), bad)


@pytest.mark.parametrize(
    "api_run",
    [
        "relative/python -m x",
        "/usr/bin/python3 -m x; run /bin/sh",
        "/usr/bin/python3 -m x\n}",
        "/usr/bin/python3 '-m' x",
        "",
    ],
)
def test_bad_api_run(api_run: str) -> None:
    with pytest.raises(ValueError):
        exabgp.render_config(BGP, api_run)


def _peer(**changes: Any) -> model.Bgp:
    return replace(BGP, peers=(replace(BGP.peers[0], **changes),))


@pytest.mark.parametrize(
    "bgp",
    [
        _peer(hold_time=1),
        _peer(hold_time=65536),
        _peer(peer_as=0),
        _peer(peer_as=2**32),
        _peer(port=0),
        _peer(multihop=0),
        _peer(multihop=256),
        _peer(password=""),
        _peer(password="x" * 81),
        _peer(local_address=ip_address("2001:db8::2")),
        replace(BGP, local_as=0),
        replace(BGP, graceful_restart=4096),
        replace(BGP, router_id=ip_address("2001:db8::1")),  # type: ignore[arg-type]
        replace(BGP, peers=(BGP.peers[0], BGP.peers[0])),
    ],
)
def test_bad_settings(bgp: model.Bgp) -> None:
    with pytest.raises(ValueError):
        exabgp.render_config(bgp, API_RUN)


def test_md5_is_base64_of_the_exact_bytes() -> None:
    text = exabgp.render_config(_peer(password="ü" * 40), API_RUN)  # 80 bytes: the kernel's limit
    assert f'md5-password "{base64.b64encode(("ü" * 40).encode()).decode()}";' in text

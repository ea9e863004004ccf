"""Pieces every part of the config file uses: strict models, addresses and durations. (Its problems are reported as
lbagent.sources.Problem, the one report of every source.)"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator

from lbagent import model

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m)?\s*$", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}
_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
_COMMUNITY = re.compile(r"^([0-9]{1,5}):([0-9]{1,5})$", re.ASCII)


def _parse_duration(value: Any) -> Any:
    """Durations read as numbers of seconds or as strings with a unit: `500ms`, `2s`, `1m`."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError("expected a duration such as 500ms, 2s or 1m")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


def _endpoint(value: Any) -> model.Endpoint:
    if not isinstance(value, str):
        raise ValueError("expected ADDRESS:PORT as a string, e.g. 198.51.100.7:8080 or [2001:db8::7]:8080")
    return model.Endpoint.parse(value)


# ADDRESS:PORT (IPv6 as [ADDRESS]:PORT): a server to reach, or (as text) a local address to listen on
EndpointText = Annotated[model.Endpoint, BeforeValidator(_endpoint)]
ListenAddress = Annotated[str, BeforeValidator(lambda value: str(_endpoint(value)))]


def _community(value: str) -> str:
    """A standard BGP community ASN:VALUE, each part 0-65535 in ASCII digits."""
    match = _COMMUNITY.match(value)
    if match is None or int(match.group(1)) > 65535 or int(match.group(2)) > 65535:
        raise ValueError("expected a BGP community ASN:VALUE, each 0-65535 (e.g. 64512:100)")
    return value


Community = Annotated[str, AfterValidator(_community)]


def _parse_ip(value: Any) -> IPv4Address | IPv6Address:
    if isinstance(value, (IPv4Address, IPv6Address)):
        return value
    if not isinstance(value, str):
        raise ValueError("expected an IPv4 or IPv6 address as a string")
    model.refuse_scope_id(value)
    try:
        return ip_address(value.strip())
    except ValueError:
        raise ValueError("not a valid IPv4 or IPv6 address") from None


def _parse_ipv4(value: Any) -> IPv4Address:
    address = _parse_ip(value)
    if not isinstance(address, IPv4Address):
        raise ValueError("expected an IPv4 address")
    return address


IPAddress = Annotated[IPv4Address | IPv6Address, PlainValidator(_parse_ip)]
IPv4 = Annotated[IPv4Address, PlainValidator(_parse_ipv4)]


def _parse_cidr(value: Any) -> IPv4Network | IPv6Network:
    if not isinstance(value, str):
        raise ValueError("expected a CIDR such as 198.51.100.0/24 as a string")
    model.refuse_scope_id(value)
    try:
        return ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not a valid CIDR: {exc}") from None


CIDR = Annotated[IPv4Network | IPv6Network, PlainValidator(_parse_cidr)]


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0, le=3600)]
Port = Annotated[int, Field(ge=1, le=65535)]
AsNumber = Annotated[int, Field(ge=1, le=4294967295)]


class Strict(BaseModel):
    """Every file model refuses unknown keys and reads camelCase names, as Kubernetes objects do. Strict: no
    coercion (`true` is no number, "30080" no port, 1 no boolean); addresses and durations parse from text."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False, frozen=True, strict=True)


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

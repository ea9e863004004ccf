"""The one golden-file helper (tests/golden.py): a difference fails with the diff and the way to accept it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import golden


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(golden, "ROOT", tmp_path)
    monkeypatch.delenv(golden.UPDATE, raising=False)
    return tmp_path


def test_equal_text_passes_and_a_difference_fails_with_a_diff_and_the_update_command(root: Path) -> None:
    (root / "kind").mkdir()
    (root / "kind" / "name.txt").write_text("one\ntwo\nthree\n")
    golden.check("kind", "name.txt", "one\ntwo\nthree\n")
    with pytest.raises(pytest.fail.Exception) as failed:
        golden.check("kind", "name.txt", "one\n2\nthree\n")
    message = str(failed.value)
    assert f"{root}/kind/name.txt differs" in message
    assert "-two\n+2\n" in message
    this_test = "test_equal_text_passes_and_a_difference_fails_with_a_diff_and_the_update_command"
    assert f"UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_golden.py::{this_test}" in message


def test_a_missing_file_fails_and_update_writes_it(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"new\.txt is missing"):
        golden.check("other", "new.txt", "text\n")
    monkeypatch.setenv(golden.UPDATE, "1")
    golden.check("other", "new.txt", "text\n")
    assert (root / "other" / "new.txt").read_text() == "text\n"
    monkeypatch.delenv(golden.UPDATE)
    golden.check("other", "new.txt", "text\n")

"""SQLite storage URLs: a path the URL parser would change is refused, with how to write it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sketchtune import OptunaSearch
from sketchtune._sqlite_url import url_decodes_paths


def test_a_question_mark_in_the_path_is_refused_not_cut(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a?b/study.db"
    with pytest.raises(
        ValueError,
        match=rf"has a '\?', which starts a URL's options, so SQLite would open '{tmp_path}/a'\. "
        r"If the '\?' is part of the file's path, write it as %3F",
    ):
        OptunaSearch(storage=url).check_storage()
    assert list(tmp_path.iterdir()) == []  # no file 'a' was made


def test_a_percent_escape_in_the_path_is_refused_not_decoded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/a%20b/study.db"
    if url_decodes_paths():  # SQLAlchemy >= 2.1
        message = (
            rf"has %20 in its path, which the URL parser decodes, so SQLite would open "
            rf"'{tmp_path}/a b/study\.db'\. Write those characters as themselves"
        )
    else:  # SQLAlchemy 2.0 keeps it as written: the same URL names two files
        message = (
            rf"has %20 in its path, which SQLAlchemy [0-9.]+ keeps as written \(SQLite would "
            rf"open '{tmp_path}/a%20b/study\.db'\) and SQLAlchemy 2\.1 and later decode"
        )
    with pytest.raises(ValueError, match=message):
        OptunaSearch(storage=url).check_storage()
    assert list(tmp_path.iterdir()) == []


def test_the_escaped_forms_and_options_open_the_file_the_path_names(tmp_path: Path) -> None:
    if not url_decodes_paths():  # SQLAlchemy 2.0: a '%' is written as itself, no '?' possible
        folder = tmp_path / "100% sure"
        url = f"sqlite:///{tmp_path}/100% sure/study.db?timeout=30"
        with pytest.raises(ValueError, match=r"needs SQLAlchemy >= 2\.1"):
            OptunaSearch(storage=f"sqlite:///{tmp_path}/100%25 sure%3F/study.db").check_storage()
    else:
        folder = tmp_path / "100% sure?"
        url = f"sqlite:///{tmp_path}/100%25 sure%3F/study.db?timeout=30"
    OptunaSearch(storage=url, study_name="s").check_storage()
    optuna.create_study(storage=url, study_name="s")
    assert [p.name for p in folder.iterdir()] == ["study.db"]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]

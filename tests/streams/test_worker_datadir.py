"""The worker's Faust app keeps its data under the stack's state folder (``<home>/faust/<worker id>``),
never as ``<worker id>-data`` in the folder it was started from (Faust's default: bench and test runs
left such folders in the checkout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.settings import Settings
from streams.app import make_app


def test_faust_data_folder_is_under_the_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started_in = tmp_path / "cwd"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    settings = Settings(home=tmp_path / "state", worker_id="wdatadir")
    app = make_app(settings)
    assert app.conf.datadir == tmp_path / "state" / "faust" / "wdatadir"
    assert app.conf.tabledir.is_relative_to(app.conf.datadir)
    assert (tmp_path / "state" / "faust").is_dir()  # Faust creates only the last folder itself
    assert list(started_in.iterdir()) == []


def test_the_tables_changelog_is_the_topic_the_project_creates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Faust does not create topics here (``topic_allow_declare=False``): deploy/topics.py must name its
    changelog exactly as Faust does."""
    from deploy.topics import changelog_topic, topic_specs

    settings = Settings(home=tmp_path, worker_id="w-check")
    app = make_app(settings)
    assert app.tables["rollups"].changelog_topic.get_topic_name() == changelog_topic(settings)
    assert changelog_topic(settings) in {spec.name for spec in topic_specs(settings)}
    assert not app.conf.topic_allow_declare

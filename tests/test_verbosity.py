"""What a Ray worker or trial sends to the console (pipeline.verbosity), in this process."""

import logging
import sys

import pytest

from pipeline.verbosity import VERBOSE_ENV, quiet_worker


class _RaisesWhenCollected:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __del__(self) -> None:
        raise self.exc


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # pytest's, back after
    quiet_worker()
    yield
    logging.disable(logging.NOTSET)


def test_rays_stop_landing_in_a_finaliser_prints_no_traceback_but_a_bug_does(quiet, capsys):
    """Ray stops an actor by raising SystemExit in it; the interpreter prints one raised in a
    `__del__` or weakref callback as an "Exception ignored" traceback, and Ray forwards it."""
    _RaisesWhenCollected(SystemExit(1))
    assert capsys.readouterr().err == ""
    _RaisesWhenCollected(ValueError("a real bug"))
    printed = capsys.readouterr().err
    assert "Traceback" in printed and "ValueError: a real bug" in printed

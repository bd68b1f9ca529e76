"""Adapter files from strangers (``tests/hostile_cases.py`` makes ~60 of them, class by class): each
is refused with a ``PeftkitError`` in bounded time and memory, in a process whose memory is capped,
with the model it was tried on exactly as before; ``peftkit inspect`` never prints a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import hostile_cases
import pytest

SECONDS = 2.0  # per refusal (they take milliseconds; a hang or a quadratic blow-up does not)
EXTRA_MB = 64  # peak memory a refusal may add (the files are a few kB; the cases asked for up to 400 GB)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("hostile")
    out = d / "results.json"
    run = subprocess.run([sys.executable, str(Path(hostile_cases.__file__)), str(d), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", hostile_cases.CASES, ids=lambda c: f"{c.kind}: {c.name}")
def test_refused_in_bounded_time_and_memory_leaving_the_model_unchanged(results: dict[str, Any],
                                                                        case: hostile_cases.Case) -> None:
    r = results[case.name]
    assert r["peftkit_error"], f"{r['error']}: {r['message']}\n{r['traceback']}"
    assert r["unchanged"], "the model changed"
    assert r["seconds"] < SECONDS, f"took {r['seconds']:.2f} s"
    assert r["extra_mb"] < EXTRA_MB, f"added {r['extra_mb']:.0f} MB"
    assert r["inspect"] in (None, 0, 2), f"peftkit inspect: {r['inspect']}"
    assert "\x1b" not in r["message"]  # what comes from the file is escaped


def test_no_install_command_is_built_from_a_file(results: dict[str, Any]) -> None:
    r = results["an unknown method whose plugin field suggests a malicious install"]
    assert r["error"] == "UnknownMethodError" and "pip install" not in r["message"]
    assert "not a valid package name" in r["message"]


def test_every_class_of_the_issue_has_cases() -> None:
    kinds = {c.kind for c in hostile_cases.CASES}
    assert kinds == {"declared sizes", "patterns", "non-regular files", "values", "malformed", "container"}
    assert len(hostile_cases.CASES) >= 50

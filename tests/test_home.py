"""The test suite writes nothing into $HOME (no ~/.cache/lmsprint, no matplotlib font cache)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# module-scoped fixtures that train and prepare before any test's own fixtures run (test_bad_input's assets,
# test_reliability's finished_run), a CLI run in a subprocess, and a plot
SLICE = (
    "tests/test_bad_input.py::test_more_bad_input_fails_cleanly[jsonl-not-json]",
    "tests/test_reliability.py::test_sample_and_export_of_a_file_are_clean_errors",
    "tests/test_compare.py::test_compare_two_tiny_runs",
)


def test_a_run_of_the_suite_leaves_home_empty(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # the inner run must find its own way to temporary directories: none of the outer run's settings
    env = {k: v for k, v in os.environ.items() if k not in ("LMSPRINT_CACHE", "MPLCONFIGDIR", "XDG_CACHE_HOME",
                                                            "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "basetemp"), *SLICE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 passed" in proc.stdout, proc.stdout[-3000:]
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []

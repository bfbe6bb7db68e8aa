"""The README's command-line quick start runs as written (issue 11, item 4).

The fenced ``bash`` block(s) right after a ``<!-- tested: tests/test_readme.py -->`` line of
README.md are run exactly as they stand, in one ``bash -eu`` process in a fresh directory, with
``jerald`` on the PATH. The only change is through the environment: the block reads its sizes as
``SIZE=${SIZE:-demo} STEPS=${STEPS:-500}``, and the test sets ``SIZE=smoke STEPS=2`` (the 32^3
smoke suite, 2 Adam steps per stage).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- tested: tests/test_readme.py -->"
SMOKE = {"SIZE": "smoke", "STEPS": "2"}


def readme_blocks(text: str) -> list[str]:
    """The fenced bash blocks that directly follow a :data:`MARK` line (blank lines allowed).

    Parameters
    ----------
    text : str
        Markdown.

    Returns
    -------
    list of str
        Each block's lines between its fences.
    """
    pattern = re.escape(MARK) + r"\s*\n\s*```bash\n(.*?)\n```"
    return re.findall(pattern, text, flags=re.S)


def test_readme_marks_its_tested_commands():
    blocks = readme_blocks(README.read_text())
    assert blocks, f"{README} has no bash block after {MARK}"
    script = "\n".join(blocks)
    # the sizes come from the environment, with the real defaults a user runs
    for var in SMOKE:
        assert re.search(rf"\b{var}=\$\{{{var}:-[^}}]+\}}", script), var
    # the whole pipeline: DM -> stellar -> HI -> paint (all three) -> report
    for cmd in (
        "jerald suite",
        "--target dm",
        "--target stellar",
        "--target hi",
        "jerald paint",
        "--hi-params",
        "jerald report",
    ):
        assert cmd in script, cmd


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    script = "\n".join(readme_blocks(README.read_text()))
    env = {
        **os.environ,
        **SMOKE,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "JAX_PLATFORMS": "cpu",
        "MPLBACKEND": "Agg",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    res = subprocess.run(
        ["bash", "-eu", "-o", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, f"README block failed:\n{res.stdout}\n{res.stderr[-5000:]}"
    runs = tmp_path / "runs"
    for t in ("dm", "stellar", "hi"):
        assert (runs / t / "params.json").exists()
        assert (runs / "maps" / t / "Field").exists()
        assert (runs / f"report_{t}" / "report.md").exists()
        assert f"[jerald] {t} at z = 2 (the paper's z = 2)" in res.stdout
    assert "[jerald] hi map:" in res.stdout

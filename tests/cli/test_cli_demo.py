"""`make demo`'s main job runs end to end and holds its invariants."""

from __future__ import annotations

import subprocess
import sys

from ._support import HERE


def test_demo_exits_0_with_every_invariant_held() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "substrate_db.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=HERE,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all invariants held" in done.stdout
    assert "[FAILED]" not in done.stdout and "Traceback" not in done.stderr
    assert "refused, reason=stale_epoch" in done.stderr

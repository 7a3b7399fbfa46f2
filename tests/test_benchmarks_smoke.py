"""Smoke test of the benchmark suite: quick mode completes and prints every row.

No timing assertions: benchmarks never fail on speed (SPEC section 8).
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"


def _row_keys() -> list[str]:
    """ROW_KEYS of benchmarks/run.py, read without importing it."""
    for node in ast.parse(RUN.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ROW_KEYS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("ROW_KEYS not found in benchmarks/run.py")


def _target_keys() -> list[str]:
    """The row keys of TARGETS (issue 9's target table) in benchmarks/run.py."""
    for node in ast.parse(RUN.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "TARGETS" for t in node.targets):
            return [k for k, _ in ast.literal_eval(node.value)]
    raise AssertionError("TARGETS not found in benchmarks/run.py")


def test_quick_benchmark_suite_completes(tmp_path):
    r = subprocess.run([sys.executable, str(RUN), "--quick", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, f"benchmarks failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    table = r.stdout.split("\nkey ", 1)
    assert len(table) == 2, f"no result table printed:\n{r.stdout}"
    lines = table[1].splitlines()
    for key in _row_keys():
        row = [ln for ln in lines if ln.split(" ", 1)[0] == key]
        assert row, f"row {key} missing from:\n{r.stdout}"
        assert "(not run)" not in row[0], row[0]
    for status_row in _target_keys():
        assert any(s in next(ln for ln in lines if ln.startswith(status_row + " "))
                   for s in ("met", "not met")), status_row
    # Every row of issue 9's target table is printed with met / not met.
    targets = r.stdout.split("\nissue 9 targets:\n", 1)
    assert len(targets) == 2, f"no target list printed:\n{r.stdout}"
    listed = [ln for ln in targets[1].splitlines() if ln.startswith("  [")]
    assert len(listed) == len(_target_keys()), listed
    assert all(ln.startswith(("  [met]", "  [not met]")) for ln in listed), listed
    # Nothing left mounted under the temp dir.
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts

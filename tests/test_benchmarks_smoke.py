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
    for status_row in ("durable_write_1", "durable_write_16", "hot_read", "commit_large"):
        assert any(s in next(ln for ln in lines if ln.startswith(status_row + " "))
                   for s in ("met", "not met")), status_row
    # Nothing left mounted under the temp dir.
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts

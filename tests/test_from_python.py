"""Calling a driver from a researcher's own Python: a script without an
`if __name__ == "__main__":` guard, one piped into `python -`, `python -c`, the interactive
shell and a guarded script all train their groups in worker processes and give the numbers of the command line,
with no traceback, leak warning or hang."""
import json
import os
import subprocess
import sys

import pytest

from conftest import NAME, ROOT, numbers_only

CALL = """import json, sys
import neural_collapse_cka as ncc
ncc.apply_settings({**ncc.PRESETS["smoke"], "DATA_DIR": %r})
r = ncc.run_model_wise_complete(log=None)
print("RESULT " + json.dumps(r))
"""


@pytest.fixture(scope="module")
def command_line_exp1(smoke_run):
    """Exp 1 of the command line's smoke run of every experiment (a driver run alone must
    give the same numbers). On a CPU it trains in two fused groups (CNN and ResNet), so
    the drivers below start worker processes."""
    return numbers_only(json.loads((smoke_run[0] / f"{NAME}.json").read_text()))["exp1"]


def _guarded(code):
    body = "\n".join("    " + line for line in code.strip().splitlines())
    return f"def main():\n{body}\n\n\nif __name__ == '__main__':\n    main()\n"


@pytest.mark.parametrize("how", ["script without guard", "piped into python -",
                                 "python -c", "interactive shell", "script with guard"])
def test_a_driver_called_from_python_gives_the_command_lines_numbers(
        how, tmp_path, data_dir, command_line_exp1):
    code = CALL % data_dir
    script = tmp_path / "analysis.py"
    script.write_text(_guarded(code) if how == "script with guard" else code)
    command = {"script without guard": [sys.executable, str(script)],
               "script with guard": [sys.executable, str(script)],
               "piped into python -": [sys.executable, "-"],
               "python -c": [sys.executable, "-c", code],
               "interactive shell": [sys.executable, "-i", "-q"]}[how]
    stdin = code if how in ("piped into python -", "interactive shell") else None
    done = subprocess.run(command, input=stdin,
                          capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "leaked" not in done.stderr, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    results = numbers_only({"env": {}, "exp1": json.loads(line[len("RESULT "):])})
    assert results["exp1"] == command_line_exp1

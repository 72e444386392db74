"""Calling a driver from a researcher's own Python: a script without an
`if __name__ == "__main__":` guard, one piped into `python -`, `python -c`, the interactive
shell and a guarded script all train their groups in worker processes and give the numbers of the command line,
with no traceback, leak warning or hang."""
import json
import os
import subprocess
import sys

import pytest

from conftest import NAME, ROOT, cli, numbers_only

# Smoke's Exp 1 trains in two fused groups on a CPU (CNN and ResNet), so worker processes
# start.
SETTINGS = ["--preset", "smoke", "--experiments", "1", "--set", "REPLICATES=1"]

CALL = """import json, sys
import neural_collapse_cka as ncc
ncc.apply_settings({**ncc.PRESETS["smoke"], "REPLICATES": 1, "DATA_DIR": %r})
r = ncc.run_model_wise_complete(log=None)
print("RESULT " + json.dumps(r))
"""


@pytest.fixture(scope="module")
def command_line_exp1(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("cli_exp1")
    result = cli(*SETTINGS, "--out", str(out), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return numbers_only(json.loads((out / f"{NAME}.json").read_text()))["exp1"]


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

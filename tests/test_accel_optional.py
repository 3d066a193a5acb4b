"""accel without Numba: importing it and its CLI flags needs NumPy only; the accel tests skip; loading says why.

Numba's absence is simulated in a subprocess whose import system refuses `numba`.
"""
import argparse
import os
import subprocess
import sys

import pytest

from refimpl_accel.cli_options import add_backend_arguments, load_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NO_NUMBA = "import sys; sys.modules['numba'] = None\n"  # `import numba` then raises ImportError


def run_without_numba(code):
    return subprocess.run([sys.executable, "-c", NO_NUMBA + code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)


def test_without_numba_loading_says_what_to_install_and_accel_tests_skip():
    code = ("import refimpl, refimpl_accel.cli_options\n"
            "try:\n"
            "    refimpl.load('golden/models/llama_mha', backend='numba')\n"
            "except refimpl.ConfigError as e:\n"
            "    print('CONFIG ERROR:', e)\n"
            "import pytest\n"
            "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', 'tests/test_accel_kernels.py',"
            " 'tests/test_accel_model.py']))\n")
    proc = run_without_numba(code)
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # 5: every module skipped, nothing collected
    assert "CONFIG ERROR: backend='numba' needs Numba (pip install 'refimpl[accel]')" in proc.stdout
    assert "2 skipped" in proc.stdout and "accel needs Numba" in proc.stdout, proc.stdout


def test_cli_flags():
    parser = argparse.ArgumentParser()
    add_backend_arguments(parser)
    args = parser.parse_args(["--backend", "numba", "--weights", "int8", "--threads", "2"])
    assert load_options(args) == {"backend": "numba", "weights": "int8", "threads": 2}
    assert load_options(parser.parse_args([])) == {"backend": "numpy"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--weights", "int4"])

"""accel's default thread count: the cores this process may use, not the machine's (issue 18, busy machines)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")
from refimpl_accel.cpu import jit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
    ({"cpu.max": "garbage\n"}, None),
])
def test_cgroup_quota_in_cores(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert jit.cgroup_cpu_limit(str(tmp_path)) == expected


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_a_process_pinned_to_one_core_defaults_to_one_thread():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from refimpl_accel.cpu import jit; import refimpl; "
            "m = refimpl.load('golden/models/llama_mha', backend='numba'); from refimpl_accel.cpu import forward; forward.enter(m); "
            "import numba; print(jit.default_threads(), numba.get_num_threads())")
    # Numba's pool is sized at start (NUMBA_NUM_THREADS, here 2 as on a 2-core machine); the pin comes after
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, env=env)
    assert out.stdout.split() == ["1", "1"]


def test_a_quota_below_the_affinity_caps_the_threads(monkeypatch):
    monkeypatch.setattr(jit, "cgroup_cpu_limit", lambda root="/sys/fs/cgroup": 1.0)
    assert jit.available_cores() == 1
    monkeypatch.setattr(jit, "cgroup_cpu_limit", lambda root="/sys/fs/cgroup": 0.2)
    assert jit.available_cores() == 1  # at least one


@pytest.mark.parametrize("env, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                           ({"GOMP_SPINCOUNT": "1000"}, None)])
def test_openmp_threads_sleep_between_regions_unless_the_user_says_otherwise(env, expected):
    """accel sets OMP_WAIT_POLICY=PASSIVE before libgomp loads (spinning threads collapsed decode on a busy machine:
    docs/accel.md); a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, refimpl; refimpl.load('golden/models/llama_mha', backend='numba'); print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**base, **env})
    assert out.stdout.split()[-1] == str(expected)

"""The CLI's allocator tuning: on glibc it takes effect, the environment can turn it off."""
import os
import platform
import subprocess
import sys

import pytest

CODE = "from flowfm_fast._malloc import tune_cpu_allocator as t; print(t(), t())"


def _run(env_value=None):
    env = dict(os.environ)
    env.pop("FLOWFM_MALLOC_TUNE", None)
    if env_value is not None:
        env["FLOWFM_MALLOC_TUNE"] = env_value
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuning_takes_effect_on_glibc_and_is_idempotent():
    assert _run() == ["True", "True"]


def test_env_turns_it_off():
    assert _run("0") == ["False", "False"]

"""`import jaxepochs` gives its process XLA:CPU's classic fusion emitters (jaxepochs/__init__.py says why), unless
the user's XLA_FLAGS names the flag or JAXEPOCHS_XLA_DEFAULTS=1 asks for XLA's defaults."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

PROBE = "import os, jaxepochs; print(os.environ.get('XLA_FLAGS', ''))"
RUNS = "import jaxepochs, jax, jax.numpy as jnp; print(float(jax.jit(lambda x: (x * 2).sum())(jnp.ones(3))))"


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXEPOCHS_XLA_DEFAULTS")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**base, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_importing_jaxepochs_picks_the_classic_emitters_unless_told_otherwise():
    assert _run(PROBE) == "--xla_cpu_use_fusion_emitters=false"
    assert _run(PROBE, XLA_FLAGS="--xla_dump_to=/tmp/x") == "--xla_dump_to=/tmp/x --xla_cpu_use_fusion_emitters=false"
    assert _run(PROBE, XLA_FLAGS="--xla_cpu_use_fusion_emitters=true") == "--xla_cpu_use_fusion_emitters=true"
    assert _run(PROBE, JAXEPOCHS_XLA_DEFAULTS="1") == ""
    assert _run(RUNS) == "6.0"  # this jaxlib takes the flag (XLA stops at one it does not know)

"""CI smoke run of the fuzz harnesses in fuzz/: each runs for a bounded time and must finish with no finding.

MEDQUANT_FUZZ_SECONDS (default 8; .ci/sanitize.sh runs each harness 15 s more under the sanitizers) sets the time
per harness, MEDQUANT_FUZZ_SEED (default 1) libFuzzer's seed.
Longer runs by hand: see fuzz/README.md. A finding leaves its input as crash-* in the test's tmp dir and the log
in the assertion message; reproduce it with ``python fuzz/<harness>.py <crash file>``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require

require("atheris")

ROOT = Path(__file__).resolve().parents[1]
SECONDS = int(os.environ.get("MEDQUANT_FUZZ_SECONDS", "8"))
SEED = int(os.environ.get("MEDQUANT_FUZZ_SEED", "1"))


@pytest.mark.parametrize("harness", ["fuzz_binding.py", "fuzz_checkpoint.py", "fuzz_config_memory.py"])
def test_fuzz_harness_finds_nothing(harness, tmp_path):
    cmd = [sys.executable, str(ROOT / "fuzz" / harness), f"-max_total_time={SECONDS}", f"-seed={SEED}",
           "-timeout=60", "-rss_limit_mb=12288", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    # libFuzzer reads peak RSS from getrusage, which a child inherits from this (large) pytest process across
    # exec: the limit must sit above the parent's peak, or a fresh harness would report an OOM at once
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=4 * SECONDS + 180, env=env)
    # atheris prints an uncaught Python exception (the usual finding) on stdout, libFuzzer its report on stderr
    (tmp_path / "fuzz.log").write_text(p.stdout + p.stderr)
    uncaught = p.stdout[p.stdout.find("=== Uncaught Python exception"):][:4000] if "Uncaught" in p.stdout else ""
    log = uncaught + "\n...\n" + p.stderr[-4000:] if uncaught else p.stdout[-2000:] + p.stderr
    findings = sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(("crash-", "timeout-", "oom-")))
    assert p.returncode == 0 and not findings, f"{harness}: exit {p.returncode}, findings {findings}\n{log[-8000:]}"
    m = re.search(r"Done (\d+) runs in (\d+) second", p.stderr)
    assert m and int(m.group(1)) > 0, p.stderr[-3000:]
    print(f"{harness}: {m.group(1)} runs in {m.group(2)} s, 0 findings")

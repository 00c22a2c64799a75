"""A newcomer's first hour: the thread default, the test checkpoint's audio level, the install
and environment documentation, and the package as an index would take it."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from csm_plugin.engine import Engine, Sampling
from csm_plugin.errors import InputError
from csm_plugin.threads import available_cpus, configure_threads, default_threads

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


# --- threads --------------------------------------------------------------------------------------


def cgroup(tmp_path: Path, files: dict[str, str], membership: str = "0::/\n") -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self").write_text(membership)
    return {"cgroup_root": tmp_path, "self_cgroup": tmp_path / "self"}


def test_available_cpus_follows_affinity_and_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert available_cpus(**cgroup(tmp_path / "none", {})) == 8  # no cgroup files: the affinity mask
    assert available_cpus(**cgroup(tmp_path / "unlimited", {"cpu.max": "max 100000\n"})) == 8
    assert available_cpus(**cgroup(tmp_path / "v2", {"cpu.max": "150000 100000\n"})) == 2  # 1.5 CPUs: 2 threads
    nested = cgroup(tmp_path / "nested", {"cpu.max": "max 100000\n", "job/cpu.max": "300000 100000\n"}, "0::/job\n")
    assert available_cpus(**nested) == 3  # the process's own cgroup, not the root's
    v1 = cgroup(tmp_path / "v1", {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
                "4:cpu,cpuacct:/\n")
    assert available_cpus(**v1) == 2
    assert available_cpus(**cgroup(tmp_path / "v1-off", {"cpu/cpu.cfs_quota_us": "-1\n"}, "4:cpu:/\n")) == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3})
    assert available_cpus(**cgroup(tmp_path / "big", {"cpu.max": "1600000 100000\n"})) == 1  # the mask is smaller


def test_default_threads_precedence_and_errors(monkeypatch):
    monkeypatch.setattr("csm_plugin.threads.available_cpus", lambda: 6)
    assert default_threads({}) == 6
    assert default_threads({"OMP_NUM_THREADS": "2"}) == 2
    assert default_threads({"CSM_THREADS": "3", "OMP_NUM_THREADS": "2"}) == 3
    for bad in ("0", "many", "-1"):
        with pytest.raises(InputError, match="CSM_THREADS"):
            default_threads({"CSM_THREADS": bad})
    before = torch.get_num_threads()
    try:
        assert configure_threads(2) == 2 and torch.get_num_threads() == 2
        assert configure_threads(None, {"CSM_THREADS": "1"}) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- the test checkpoint's audio ------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["hf_checkpoint", "sesame_checkpoint"])
def test_test_checkpoint_audio_is_at_a_safe_level_without_dc(request, fixture):
    engine = Engine.load(request.getfixturevalue(fixture))
    for seed, text in [(0, "Hello there, how are you today?"), (3, "Oh no, I'm sorry to hear that.")]:
        frames = engine.synthesize([], 0, text, Sampling(seed=seed, max_audio_ms=1600))
        pcm = np.concatenate([f.pcm for f in frames])
        assert len(pcm) >= 10 * 1920
        assert np.abs(pcm).max() <= 0.5  # -6 dBFS at most: never clipped, never full scale
        assert abs(float(pcm.mean())) < 1e-3  # no DC offset
        assert np.sqrt(np.mean(pcm**2)) > 0.005  # still audible noise, not silence


# --- documentation --------------------------------------------------------------------------------


def environment_variables() -> set[str]:
    """Every environment variable the package, the adapters and the examples read."""
    names = set()
    pattern = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""")
    for folder in ("csm_plugin", "adapters", "examples"):
        for path in (REPO / folder).rglob("*.py"):
            names.update(pattern.findall(path.read_text()))
    from csm_plugin.server.config import _ENV_FIELDS, ENV_PREFIX

    names.update(ENV_PREFIX + suffix for suffix in _ENV_FIELDS)
    names.update({"CSM_API_KEYS", "CSM_SERVER_CONFIG"})  # read by ServerConfig.load outside _ENV_FIELDS
    from csm_plugin import threads

    names.add(threads.ENV)
    return names


def test_every_environment_variable_is_documented_in_the_readme():
    names = environment_variables()
    assert {"CSM_MODEL", "CSM_DEMO_CHECKPOINT", "CSM_THREADS", "CSM_API_KEY", "CSM_TORCH_THREADS"} <= names
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"not in the README's environment table: {missing}"
    assert "`CSM_LIMIT_<NAME>`" in README


def test_readme_says_how_to_install_without_an_index():
    assert 'pip install "csm-plugin[pipecat] @ git+https://' in README  # from a git URL
    assert 'pip install -e ".[pipecat]"' in README  # from a clone
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in README  # the CPU wheel
    assert "torch==2.13.0" not in README  # a pin does not pick the CPU wheel
    assert "torch>=2.4,<2.15" in README and "torch>=2.4,<2.15" in (REPO / "pyproject.toml").read_text()
    for doc in ("docs/pipecat.md", "docs/livekit.md", "docs/server.md"):
        text = (REPO / doc).read_text()
        assert not re.search(r'^pip install "csm-plugin\[\w+\]"$', text, re.M), f"{doc} installs from an index"


# --- the distribution -----------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_and_sdist_hold_every_import_root(tmp_path):
    pytest.importorskip("build")
    spec = importlib.util.spec_from_file_location("check_dist", REPO / ".ci" / "check_dist.py")
    check_dist = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_dist)
    # --no-isolation: the installed setuptools builds it, so the test needs no index
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert check_dist.problems(tmp_path) == []
    wheel = next(tmp_path.glob("*.whl")).name
    import csm_plugin

    assert wheel.startswith(f"csm_plugin-{csm_plugin.__version__}-")  # one version, from csm_plugin.__version__

"""Check a built wheel (and sdist) before publishing: every module of the three import roots is
in the wheel, the namespace packages stay namespaces, the command is declared.

    python .ci/check_dist.py dist/        # after `python -m build --outdir dist`

Exit status 1 with one line per problem. tests/test_newcomer_packaging.py runs `problems()`.
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import root -> its folder in the repository
ROOTS = {
    "csm_plugin": REPO / "csm_plugin",
    "pipecat_csm": REPO / "adapters" / "pipecat" / "pipecat_csm",
    "livekit/plugins/csm": REPO / "adapters" / "livekit" / "livekit" / "plugins" / "csm",
}
# subpackages that must be there whatever the tree holds
REQUIRED = ["csm_plugin/conversation/__init__.py", "csm_plugin/engine/__init__.py", "csm_plugin/models/__init__.py",
            "csm_plugin/server/__init__.py", "pipecat_csm/__init__.py", "livekit/plugins/csm/__init__.py"]
# `livekit` and `livekit.plugins` are namespace packages shared with LiveKit's own distributions:
# an __init__.py there would shadow every other livekit package.
FORBIDDEN = ["livekit/__init__.py", "livekit/plugins/__init__.py"]


def expected_modules() -> list[str]:
    out = []
    for root, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" not in path.parts:
                out.append(f"{root}/{path.relative_to(folder).as_posix()}")
    return out


def problems(dist: Path) -> list[str]:
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        return [f"{dist}: expected one wheel and one sdist, found {[p.name for p in wheels + sdists]}"]
    found = []
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        entry_points = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        scripts = wheel.read(entry_points).decode() if entry_points else ""
    for name in REQUIRED + expected_modules():
        if name not in names:
            found.append(f"{wheels[0].name}: {name} is missing")
    for name in FORBIDDEN:
        if name in names:
            found.append(f"{wheels[0].name}: {name} must not be shipped (livekit.plugins is a namespace package)")
    if "csm-plugin = csm_plugin.cli:main" not in scripts:
        found.append(f"{wheels[0].name}: the csm-plugin command is not declared")
    with tarfile.open(sdists[0]) as sdist:
        members = {m.split("/", 1)[1] for m in sdist.getnames() if "/" in m}
    for name in ("pyproject.toml", "README.md", "csm_plugin/__init__.py", "adapters/pipecat/pipecat_csm/__init__.py"):
        if name not in members:
            found.append(f"{sdists[0].name}: {name} is missing")
    return sorted(set(found))


def main(argv: list[str]) -> int:
    dist = Path(argv[0] if argv else "dist")
    found = problems(dist)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    if not found:
        print(f"{dist}: wheel and sdist hold csm_plugin (with conversation, engine, models, server), "
              "pipecat_csm and livekit/plugins/csm")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

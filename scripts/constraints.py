"""Writes constraints.txt: the installed versions of visenv's own dependency closure, and nothing else.

The closure is read from the metadata of what is installed: the requirements of ``visenv`` with the
extras that ``scripts/install.sh`` asks for, then theirs, recursively (with the extras each names and the
environment markers of this interpreter). Run it after ``bash scripts/install.sh`` on a machine whose
versions are known to work (the test suite passes), from the repository root:

    python scripts/constraints.py            # rewrites constraints.txt
    python scripts/constraints.py --check    # exits 1 if constraints.txt differs from the closure
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import platform
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT_EXTRAS = ("all",)
HEADER = """\
# visenv's dependency closure (pip install -e ".[{extras}]"), pinned to versions known to work together
# on Python {python} ({machine}). Written by `python scripts/constraints.py`; used by scripts/install.sh.
# torch and torchvision are pinned together (open_clip needs torchvision).
"""


def closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """Installed name -> version for ``root`` and everything it needs, recursively, with extras."""
    env = {"python_version": ".".join(platform.python_version_tuple()[:2])}
    pinned: dict[str, str] = {}
    todo = [(root, frozenset(extras))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        if key != canonicalize_name(root):
            pinned[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            active = req.marker is None or any(
                req.marker.evaluate({**env, "extra": extra}) for extra in (wanted or {""}))
            if active:
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return dict(sorted(pinned.items()))


def render(pins: dict[str, str]) -> str:
    head = HEADER.format(extras=",".join(ROOT_EXTRAS), python=platform.python_version(),
                         machine=platform.machine())
    return head + "".join(f"{name}=={version}\n" for name, version in pins.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "constraints.txt"))
    args = parser.parse_args()
    text = render(closure("visenv", ROOT_EXTRAS))
    if args.check:
        current = Path(args.out).read_text()
        strip = lambda s: [line for line in s.splitlines() if not line.startswith("#")]  # noqa: E731
        if strip(current) != strip(text):
            print(f"{args.out} differs from the installed closure; rerun without --check", file=sys.stderr)
            return 1
        return 0
    Path(args.out).write_text(text)
    print(f"wrote {args.out}: {len(text.splitlines()) - 3} pins")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

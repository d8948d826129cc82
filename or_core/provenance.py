"""Provenance: where, when and with what a record, a run summary or an executed notebook was made.

One function, :func:`provenance`, whose keys the records (:mod:`or_core.records`), the
campaign bundles and the book's executed notebooks (:mod:`or_core.book`) share; a run's
``summary.json`` carries its :func:`versions` (the same keys, the same values).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["git_commit", "git_dirty", "versions", "provenance"]


def _git(*args: str) -> str:
    """Output of a read-only git command in the package's checkout, ``""`` outside one."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # never write the index
    try:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, env=env, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _checkout_state() -> tuple[str, bool]:
    """``(commit, dirty)`` of the checkout now: ``HEAD`` (``"unknown"`` outside a git checkout),
    and whether tracked files outside ``results/`` (which the runs themselves rewrite) differ
    from it."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results"))
    return commit, dirty


#: The checkout as this process loaded it. A record is written when its run ends, minutes or hours
#: later; by then the checkout may be at another commit, while the code that ran is the one
#: imported here (a record once named a commit checked out while its run was training).
_LOADED_STATE = _checkout_state()


def git_commit() -> str:
    """The commit of the or_core checkout when this process imported it, or ``"unknown"``
    outside a git checkout.

    ``$OR_CORE_GIT_COMMIT``, when set, comes first: whoever copies a committed tree to another
    machine (whose copy may have no ``.git``, or an older one) names its commit there and
    vouches that the tree is that commit."""
    return os.environ.get("OR_CORE_GIT_COMMIT") or _LOADED_STATE[0]


def git_dirty() -> bool:
    """Whether the checkout had changes to tracked files outside ``results/`` when this process
    imported it (:func:`git_commit`); never when ``$OR_CORE_GIT_COMMIT`` names the commit."""
    if os.environ.get("OR_CORE_GIT_COMMIT"):
        return False
    return _LOADED_STATE[1]


def versions() -> dict[str, str]:
    """``python``, ``torch``, ``lightly`` versions and the ``git_commit`` of the code."""
    import lightly
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightly": lightly.__version__,
        "git_commit": git_commit(),
    }


def cpu_description() -> str:
    """The CPU's model name and the vector instructions torch's CPU kernels use (``"AMD EPYC,
    AVX512"``). The same code and seed give other floats on another CPU: a cpu-small run of
    2026-11-25 is not reproduced bit for bit by its own commit on a machine that reports the same
    system, architecture and cores, so records name the CPU too."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def provenance(command: str | Sequence[str] | None = None, wall_time_s: float | None = None) -> dict[str, Any]:
    """Where, when and with what something was made.

    Keys: ``git_commit``, ``git_dirty`` (:func:`git_dirty`), ``date_utc`` (ISO 8601, seconds),
    ``machine`` (system, architecture, CPU cores), ``cpu`` (:func:`cpu_description`),
    ``device`` (the first GPU, else the CPU threads torch uses), ``python``, ``torch``,
    ``lightly`` (:func:`versions`), ``command`` (default: this process's command line) and
    ``wall_time_s`` (rounded to 0.1 s, or ``None``).
    """
    import torch

    if command is None:
        command = [Path(sys.argv[0]).name, *sys.argv[1:]]
    if not isinstance(command, str):
        command = " ".join(str(c) for c in command)
    found = versions()
    cuda = torch.cuda.is_available()
    return {
        "git_commit": found["git_commit"],
        "git_dirty": git_dirty(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
        "cpu": cpu_description(),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu, {torch.get_num_threads()} threads",
        "python": found["python"],
        "torch": found["torch"],
        "lightly": found["lightly"],
        "command": command,
        "wall_time_s": None if wall_time_s is None else round(float(wall_time_s), 1),
    }

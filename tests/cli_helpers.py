"""Running the command line in the test's own process (faster than a subprocess, and
``capsys`` sees what it prints)."""

from __future__ import annotations

from typing import Any

import pytest

from or_core.__main__ import main


def run_cli(capsys: pytest.CaptureFixture, *argv: Any) -> tuple[int, str, str]:
    """``python -m or_core ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err

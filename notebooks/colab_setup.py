"""Prepare a Colab runtime for the notebooks: install or_core from the clone this file is in,
and work in its ``notebooks/`` folder, as the notebooks' relative paths (``profiles/``,
``../configs``, ``../results``) expect.

The first code cell of every notebook clones the repository on Colab and runs this file::

    if "google.colab" in sys.modules:
        !test -d /content/or_core || git clone --depth 1 https://github.com/or-core/or_core /content/or_core
        %run /content/or_core/notebooks/colab_setup.py

It lives outside the package because it runs before or_core is installed, and it needs the
standard library only. Anywhere but Colab it does nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent
CHECKOUT = NOTEBOOKS.parent


def on_colab() -> bool:
    return "google.colab" in sys.modules


def setup() -> bool:
    """On Colab, ``pip install`` the checkout and change into its notebooks folder; elsewhere
    nothing. Returns whether it did anything."""
    if not on_colab():
        return False
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", str(CHECKOUT)], check=True)
    os.chdir(NOTEBOOKS)
    return True


if __name__ == "__main__":
    setup()

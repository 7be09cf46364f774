"""What to tell a user whose `import collectives` found no compiled core.

The usual cause is running Python in (or a script from) the repository's root: Python puts
that folder first on sys.path, so the source folder `collectives/`, which holds no compiled
module, hides the installed package. Python's own message for that ("cannot import name
'_core' from partially initialized module ... (most likely due to a circular import)") reads
like a bug in the package; this says what happened and what to do instead.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from typing import Optional

__all__ = ["missing_core_message"]


def _checkout_root(package_dir: str) -> Optional[str]:
    """The repository root if ``package_dir`` is the source folder of a checkout."""
    root = os.path.dirname(package_dir)
    return root if os.path.isfile(os.path.join(root, "CMakeLists.txt")) else None


def _installed_elsewhere(root: str) -> Optional[str]:
    """Where an installed collectives is, on a sys.path entry other than ``root``."""
    others = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.realpath(root)]
    spec = importlib.machinery.PathFinder.find_spec("collectives", others)
    return os.path.dirname(spec.origin) if spec is not None and spec.origin else None


def missing_core_message(package_dir: str, error: ImportError) -> str:
    root = _checkout_root(package_dir)
    # A core that is there but fails to load (a missing libcrypto, another Python's build) is
    # its own problem, whatever folder it is in: say what the loader said.
    absent = isinstance(error, ModuleNotFoundError) or "cannot import name '_core'" in str(error)
    if root is None or not absent:
        return (f"collectives at {package_dir} has no usable compiled core (collectives._core: {error}); "
                f"reinstall it for this Python ({sys.version.split()[0]}): pip install --force-reinstall "
                "(the wheel or checkout you installed it from)")
    installed = _installed_elsewhere(root)
    hidden = (f"the installed package at {installed} is hidden by the source folder {package_dir}, because Python "
              "looks first in the current folder (or the script's)" if installed else
              f"Python found the source folder {package_dir} first, which holds no compiled core, and no installed "
              "collectives")
    return (f"collectives was imported from its source checkout: {hidden}. Either run from another folder "
            f"(cd elsewhere; or python -P on Python 3.11+), or install this checkout for development, which builds "
            f"the core and makes the source folder importable: pip install -e {root} "
            f"(or scripts/setup-venv; see the README's Install section).")

"""Old module paths, kept for one release as thin aliases of their new homes.

Each old module calls :func:`moved` with its new path: its names become the new module's and
importing it warns with a :class:`DeprecationWarning` naming the new path. Run as a script
(``python -m keras_cspine.train``), it warns nothing and runs the command.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def moved(old: str, new: str, namespace: dict[str, Any]) -> None:
    """Fill ``namespace`` (an old module's globals) with the public and private names of ``new``."""
    module = importlib.import_module(new)
    namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    namespace["__all__"] = getattr(module, "__all__", [k for k in vars(module) if k[0] != "_"])
    if namespace.get("__name__") != "__main__":
        warnings.warn(
            f"{old} moved to {new}: import it from there (the old path goes away in the next "
            f"release)", DeprecationWarning, stacklevel=3,
        )  # fmt: skip

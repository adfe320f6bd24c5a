"""Keep Lightning's console chatter out of a vistrain run.

Under ``vistrain fit --engine lightning`` the vistrain callbacks log, draw and save, and
Lightning's own logger and bar are off; what Lightning still prints by itself is noise
for that run: the "GPU available / TPU available" banners, the "💡 Tip" advertisements,
"`Trainer.fit` stopped: `max_epochs` reached" and deprecation warnings raised inside
Lightning's own code (e.g. its use of a deprecated torch pytree class), which a user can
neither act on nor silence. ``quiet_lightning`` hides exactly these for the duration of a
``with`` block and restores everything afterwards: Lightning's info lines go through the
``lightning.pytorch`` / ``lightning.fabric`` loggers (raised to WARNING, so its real
warnings still show), and only Deprecation/Future warnings attributed to Lightning's
modules are ignored.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
"""Loggers Lightning prints its banners, tips and status lines through."""

LIGHTNING_MODULES = r"(lightning|lightning_fabric|lightning_utilities|pytorch_lightning)(\.|$)"
"""Modules whose deprecation warnings are Lightning's business, not the user's."""


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning prints only warnings and errors of its own loggers.

    Yields:
        Nothing; on exit the loggers' levels and the warning filters are restored.
    """
    previous = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=LIGHTNING_MODULES)
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in previous.items():
                logging.getLogger(name).setLevel(level)


__all__ = ["quiet_lightning"]

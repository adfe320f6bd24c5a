"""Lightning bridge: run vistrain models and callbacks under ``lightning.pytorch.Trainer``.

Needs the optional extra ``pl`` (``pip install 'vistrain[pl]'``); nothing else in vistrain
imports Lightning. ``TrainingModule`` wraps model, loss, optimizers and schedules;
``CallbackWrapper`` runs one vistrain callback unchanged; ``fit_with_lightning`` (in
``vistrain.pl.fit``) is what ``vistrain fit --engine lightning`` calls.
"""

from vistrain.pl.callback_wrapper import CallbackWrapper
from vistrain.pl.engine import LightningEngine
from vistrain.pl.training_module import TrainingModule

__all__ = ["CallbackWrapper", "LightningEngine", "TrainingModule"]

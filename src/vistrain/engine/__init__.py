"""The training engine: Trainer, connectors, loss module, optimisation and callbacks."""

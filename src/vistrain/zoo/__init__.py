"""Built-in experiments and the loader for experiment files.

``load_config("yolox_shapes")`` imports a built-in experiment; ``load_config("my_exp.py")``
imports a file that follows the contract of ``vistrain.zoo.base``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

BUILTIN_EXPERIMENTS: dict[str, str] = {
    "yolox_shapes": "vistrain.zoo.yolox_shapes",
    "yolox_coco": "vistrain.zoo.yolox_coco",
    "toy_classifier": "vistrain.zoo.toy_classifier",
}
DEFAULT_EXPERIMENT = "yolox_shapes"


def available_experiments() -> list[str]:
    """Names of the built-in experiments whose modules can be imported."""
    return [
        name
        for name, module in BUILTIN_EXPERIMENTS.items()
        if importlib.util.find_spec(module) is not None
    ]


def load_config(name_or_path: str) -> types.ModuleType:
    """Import an experiment by built-in name or from a ``.py`` file.

    Raises:
        FileNotFoundError: If a ``.py`` path does not exist.
        ValueError: If the name is not a built-in experiment (the message lists them) or
            the module lacks ``Params`` / ``build``.
    """
    if name_or_path.endswith(".py") or os.sep in name_or_path:
        path = os.path.abspath(name_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {name_or_path!r} does not exist")
        module_name = f"vistrain_user_config_{abs(hash(path))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import config file {name_or_path!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        choices = available_experiments()
        if name_or_path not in choices:
            raise ValueError(
                f"unknown config {name_or_path!r}; choose one of: {', '.join(choices)} "
                "or pass a path to a .py file"
            )
        module = importlib.import_module(BUILTIN_EXPERIMENTS[name_or_path])
    for attr in ("Params", "build"):
        if not hasattr(module, attr):
            raise ValueError(
                f"config {name_or_path!r} defines no {attr!r}; an experiment needs a Params "
                "dataclass and a build(params, output_dir) function"
            )
    return module

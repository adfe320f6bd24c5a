"""The one reader of COCO-format annotation files, shared by the data set and the evaluator.

``load_coco_json`` opens the file and checks the structure both readers rely on, so a bad
path or a file that is not COCO fails the same way, with the file named, wherever it is
read. Each reader checks the fields it uses itself.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["load_coco_json"]


def load_coco_json(
    annotation_file: str | os.PathLike[str], require_annotations: bool = False
) -> dict[str, Any]:
    """Read a COCO detection annotation file and check its top-level structure.

    Args:
        annotation_file: Path to the JSON file.
        require_annotations: Whether the ``annotations`` list must be present (scoring
            needs it; a data set of unlabelled images does not).

    Returns:
        The parsed JSON object, with ``images`` and ``categories`` lists and, when present,
        an ``annotations`` list.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not JSON, not a JSON object, or lacks one of those lists.
    """
    path = os.fspath(annotation_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"COCO annotation file {path!r} does not exist; pass the path of the data set's "
            "annotation JSON as annotation_file."
        )
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO annotation file {path!r} is not valid JSON: {err}") from err
    required = (
        ("images", "annotations", "categories") if require_annotations else ("images", "categories")
    )
    if not isinstance(data, dict):
        raise ValueError(
            f"COCO annotation file {path!r} holds a {type(data).__name__}; expected an object "
            f"with the keys {list(required)}."
        )
    for key in required:
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"COCO annotation file {path!r} has no {key!r} list; a COCO detection file needs "
                f"the keys {list(required)}."
            )
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"COCO annotation file {path!r}: 'annotations' must be a list.")
    return data

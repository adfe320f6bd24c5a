"""README's "Layout and development" list names every module of src/vistrain, and no other."""

from __future__ import annotations

from pathlib import Path

import vistrain

README = Path(__file__).resolve().parents[1] / "README.md"
PACKAGE = Path(vistrain.__file__).resolve().parent


def _listed_modules(readme: str) -> set[str]:
    """Module paths (relative to src/vistrain) in the code block under "Layout and development".

    The block names a folder as ``  folder/`` (two spaces) and a module as ``    name.py`` under
    its folder, or as ``  name.py`` at the top of the package, each with its description.
    """
    section = readme.split("## Layout and development", 1)[1]
    block = section.split("```", 2)[1]
    listed: set[str] = set()
    folder = ""
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        indent = len(line) - len(line.lstrip())
        if indent == 2 and name.endswith("/"):
            folder = name
        elif indent == 2 and name.endswith(".py"):
            listed.add(name)
        elif indent == 4 and name.endswith(".py"):
            listed.add(folder + name)
    return listed


def test_layout_lists_every_module_once() -> None:
    modules = {
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    listed = _listed_modules(README.read_text(encoding="utf-8"))
    assert not modules - listed, f"modules missing from README's layout: {sorted(modules - listed)}"
    assert not listed - modules, f"README's layout names no such module: {sorted(listed - modules)}"

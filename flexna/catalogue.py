"""Named real-world pattern configurations: the JSON files of the repository's ``masks/``.

Each file holds ``name``, ``description``, ``source``, the pattern (``shape``,
``kernel_size``, ``stride``, ``dilation``, ``is_causal``) and the model's
``heads`` and ``head_dim``. Set ``FLEXNA_MASKS`` to use another folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flexna.pattern import NAPattern


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    source: str
    pattern: NAPattern
    heads: int
    head_dim: int


def catalogue_dir() -> Path:
    """Folder of the catalogue (``$FLEXNA_MASKS`` or the repository's ``masks/``)."""
    env = os.environ.get("FLEXNA_MASKS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "masks"


def list_entries() -> list[str]:
    """Names of all catalogue entries, sorted."""
    return sorted(p.stem for p in catalogue_dir().glob("*.json"))


def load_entry(name: str) -> CatalogueEntry:
    """Load and validate one entry by name (``ValueError`` listing the names if unknown)."""
    path = catalogue_dir() / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"name = {name!r} is not in the catalogue {catalogue_dir()}; "
                         f"known: {', '.join(list_entries())}")
    data = json.loads(path.read_text())
    pattern = NAPattern.create(data["shape"], data["kernel_size"], data["stride"],
                               data["dilation"], data["is_causal"])
    return CatalogueEntry(data["name"], data["description"], data["source"], pattern,
                          int(data["heads"]), int(data["head_dim"]))

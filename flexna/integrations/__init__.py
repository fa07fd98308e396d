"""flexna in other libraries' models: :mod:`flexna.integrations.diffusers` (``pip install
"flexna[diffusers]"``) and the model-level sparsity configs of :mod:`flexna.integrations.config`.

Importing this package needs nothing beyond flexna; each integration module imports its library.
"""

from flexna.integrations.config import LayerPattern, SparsityConfig

__all__ = ["LayerPattern", "SparsityConfig"]

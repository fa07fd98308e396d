"""flexna: neighborhood attention as FlexAttention masks.

Build a ``mask_mod`` or an analytic ``BlockMask`` for any 1-D/2-D/3-D token
layout and run it through ``torch.nn.attention.flex_attention``, or call the
functional API (``na1d``/``na2d``/``na3d``/``neighborhood_attention``).
The exact pattern is specified in the README ("Semantics").
"""

from flexna.blockmask import na_block_mask
from flexna.functional import na1d, na2d, na3d, neighborhood_attention
from flexna.layout import tile_tokens, tiled_length, untile_tokens
from flexna.masks import na_mask_mod
from flexna.pattern import NAPattern

__all__ = [
    "NAPattern",
    "na1d",
    "na2d",
    "na3d",
    "na_block_mask",
    "na_mask_mod",
    "neighborhood_attention",
    "tile_tokens",
    "tiled_length",
    "untile_tokens",
]

__version__ = "0.1.0"

"""flexna: neighborhood attention as FlexAttention masks.

Build a ``mask_mod`` or an analytic ``BlockMask`` for any 1-D/2-D/3-D token
layout and run it through ``torch.nn.attention.flex_attention``, or call the
functional API (``na1d``/``na2d``/``na3d``/``neighborhood_attention``).
The exact pattern is specified in ``docs/SEMANTICS.md``.
"""

from flexna.adaptive import adaptive_block_mask, select_blocks
from flexna.analysis import analyze, choose_layout, choose_tiles, compare_orders, search_tiles
from flexna.backends import BackendError, flash_unavailable, kernel_options
from flexna.blockmask import na_block_mask, spec_block_mask
from flexna.cache import CacheInfo, cache_info, clear_cache, set_cache_limit
from flexna.distributed import sharded_neighborhood_attention
from flexna.errors import CacheWarning, EagerFallbackWarning, RecompileLimitError
from flexna.extended import extended_na_block_mask, extended_na_mask_mod
from flexna.flex import dense_flex_attention
from flexna.functional import (
    na1d,
    na2d,
    na3d,
    neighborhood_attention,
    packed_neighborhood_attention,
    tiled_neighborhood_attention,
)
from flexna.layout import CurveOrder, TokenLayout, tile_tokens, tiled_length, untile_tokens
from flexna.modules import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from flexna.packing import (
    pack_tokens,
    packed_block_mask,
    packed_length,
    packed_mask_mod,
    packed_rel_pos_bias_score_mod,
    unpack_tokens,
)
from flexna.pattern import NAPattern, PerHead
from flexna.radial import RadialPattern, radial_pattern, radial_window_pattern
from flexna.scores import (
    compose_score_mods,
    distance_decay_score_mod,
    rel_pos_bias_score_mod,
    rpb_table_shape,
    softcap_score_mod,
)
from flexna.sliding_tile import SlidingTilePattern, sliding_tile_pattern, sta_block_mask, sta_mask_mod, sta_spec
from flexna.spec import MaskSpec, mask_limit, set_mask_limit
from flexna.streaming import NACache
from flexna.tables import na_mask_mod, spec_mask_mod

__all__ = [
    "BackendError",
    "CacheInfo",
    "CacheWarning",
    "CurveOrder",
    "EagerFallbackWarning",
    "MaskSpec",
    "NACache",
    "NAPattern",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "PerHead",
    "RadialPattern",
    "RecompileLimitError",
    "SlidingTilePattern",
    "TokenLayout",
    "adaptive_block_mask",
    "analyze",
    "cache_info",
    "choose_layout",
    "choose_tiles",
    "clear_cache",
    "compare_orders",
    "compose_score_mods",
    "dense_flex_attention",
    "distance_decay_score_mod",
    "extended_na_block_mask",
    "extended_na_mask_mod",
    "flash_unavailable",
    "kernel_options",
    "mask_limit",
    "na1d",
    "na2d",
    "na3d",
    "na_block_mask",
    "na_mask_mod",
    "neighborhood_attention",
    "pack_tokens",
    "packed_block_mask",
    "packed_length",
    "packed_mask_mod",
    "packed_neighborhood_attention",
    "packed_rel_pos_bias_score_mod",
    "radial_pattern",
    "radial_window_pattern",
    "rel_pos_bias_score_mod",
    "rpb_table_shape",
    "search_tiles",
    "select_blocks",
    "set_cache_limit",
    "set_mask_limit",
    "sharded_neighborhood_attention",
    "sliding_tile_pattern",
    "softcap_score_mod",
    "spec_block_mask",
    "spec_mask_mod",
    "sta_block_mask",
    "sta_mask_mod",
    "sta_spec",
    "tile_tokens",
    "tiled_length",
    "tiled_neighborhood_attention",
    "unpack_tokens",
    "untile_tokens",
]

__version__ = "0.1.0"

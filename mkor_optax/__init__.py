"""mkor_optax: scalable second-order optimizers for Optax and Flax."""

from mkor_optax.capture import RANK1, StatKind, layer_layouts, value_and_grad
from mkor_optax.kronecker import Layout
from mkor_optax.layers import LayerCall, register_layer
from mkor_optax.mkor import MKORState, mkor, scale_by_mkor

__version__ = '0.1.0'

__all__ = [
    'Layout', 'LayerCall', 'MKORState', 'RANK1', 'StatKind', 'layer_layouts', 'mkor',
    'register_layer', 'scale_by_mkor', 'value_and_grad',
]

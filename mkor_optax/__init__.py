"""mkor_optax: scalable second-order optimizers for Optax and Flax."""

from mkor_optax.accumulation import MultiSteps, MultiStepsState
from mkor_optax.adaptive import adaptive_inputs, adaptive_mkor
from mkor_optax.fisher import sampled_loss
from mkor_optax.checkpoint import restore_state
from mkor_optax.capture import (COVARIANCE, RANK1, SKETCH, Covariance, Sketch, StatKind,
                                layer_layouts, untapped, value_and_grad)
from mkor_optax.eva import EvaState, eva, scale_by_eva
from mkor_optax.hybrid import MKORHState, mkor_h, scale_by_mkor_h
from mkor_optax.kfac import KFACState, kfac, scale_by_kfac
from mkor_optax.layout import Layout
from mkor_optax.layers import LayerCall, register_layer
from mkor_optax.mkor import MKORState, mkor, scale_by_mkor
from mkor_optax.numerics import NumericalWarning, jit_warnings
from mkor_optax import nnx  # noqa: E402 (NNX capture: mkor_optax.nnx.value_and_grad)
from mkor_optax.quadratic import QuadraticStepState, gauss_newton, scale_by_quadratic_step
from mkor_optax.sonew import SONewState, scale_by_sonew, sonew
from mkor_optax.training import TrainState

from mkor_optax._version import __version__  # the one place the version is written

__all__ = [
    'COVARIANCE', 'Covariance', 'adaptive_inputs', 'adaptive_mkor', 'EvaState', 'KFACState', 'Layout', 'LayerCall', 'MKORHState',
    'MKORState', 'MultiSteps', 'MultiStepsState', 'NumericalWarning', 'QuadraticStepState', 'RANK1', 'SKETCH', 'SONewState', 'Sketch', 'StatKind', 'TrainState',
    'eva', 'gauss_newton', 'jit_warnings', 'kfac', 'layer_layouts', 'mkor', 'mkor_h', 'nnx', 'register_layer', 'restore_state', 'sampled_loss', 'scale_by_eva',
    'scale_by_kfac', 'scale_by_mkor', 'scale_by_mkor_h', 'scale_by_quadratic_step', 'scale_by_sonew', 'sonew', 'untapped',
    'value_and_grad',
]

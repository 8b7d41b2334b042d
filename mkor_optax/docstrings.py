"""Docstring text that several public functions share, written once.

An optimizer alias takes the arguments of its transform (``mkor`` those of
``scale_by_mkor``), and every alias with a backend takes the same
``learning_rate``, ``weight_decay`` and ``backend`` and describes the same
LAMB step and papers. Each argument is described once, in the ``Args:``
section of the function that owns it, and the LAMB step and the references
once, in :data:`BLOCKS`; a docstring that needs them names them in a marker
line::

    Args:
      {scale_by_mkor}                         every argument it describes
      {mkor: learning_rate, weight_decay}     only these

    {LAMB}                                    a block of BLOCKS

and :func:`filled` replaces the marker with that text at the marker's
indentation, so ``help()`` and the API pages show it in full everywhere.
"""

from __future__ import annotations

import re
import textwrap

_MARKER = re.compile(r'^( *)\{(\w+)(?::([\w, ]+))?\}$', re.M)
_ENTRY = re.compile(r'^(\w+)(?: \([^)]*\))?:')


def args_of(fn) -> dict:
  """``{name: entry}`` of the ``Args:`` section of ``fn``'s docstring, each
  entry its lines without the section's indentation (continuations keep
  their extra two spaces)."""
  lines = (fn.__doc__ or '').splitlines()
  start = next((i for i, line in enumerate(lines) if line.strip() == 'Args:'), None)
  if start is None:
    return {}
  indent = len(lines[start]) - len(lines[start].lstrip()) + 2
  entries, name = {}, None
  for line in lines[start + 1:]:
    if line.strip() and len(line) - len(line.lstrip()) < indent:
      break  # the next section
    text = line[indent:]
    match = _ENTRY.match(text)
    if match:
      name = match.group(1)
      entries[name] = [text]
    elif name is not None:
      entries[name].append(text)
  return {k: '\n'.join(v).rstrip() for k, v in entries.items()}


def filled(*sources):
  """A decorator: every marker line of the decorated function's docstring
  becomes its text, at the marker's indentation: ``{NAME}`` the block
  ``BLOCKS[NAME]``, ``{source}`` or ``{source: a, b}`` the ``Args:``
  entries of that source function (all of them, or the named ones). A
  marker naming nothing known, or an argument the source does not describe,
  raises ``KeyError`` at import."""
  described = {fn.__name__: args_of(fn) for fn in sources}

  def entries(match):
    indent, source, names = match.groups()
    if source in BLOCKS and not names:
      return textwrap.indent(BLOCKS[source].strip('\n'), indent)
    table = described[source]
    chosen = [n.strip() for n in names.split(',')] if names else list(table)
    return textwrap.indent('\n'.join(table[n] for n in chosen), indent)

  def decorate(fn):
    if fn.__doc__:  # (python -OO strips docstrings)
      fn.__doc__ = _MARKER.sub(entries, fn.__doc__)
    return fn

  return decorate


BLOCKS = {
    # The step of LAMB, the aliases' default backend, after the preconditioned U.
    'LAMB': r"""
LAMB (You et al., 2020) then takes :math:`U` for its gradient (for the
parameters that no layer preconditions, :math:`U` is the gradient itself),
with a weight decay :math:`\omega` masked off biases, norm scales and other
1-D leaves, as in the MKOR paper's BERT runs. Per parameter tensor
:math:`\theta`, at step :math:`t` with learning rate :math:`\eta_t` (and
optax's :math:`\beta_1 = 0.9`, :math:`\beta_2 = 0.999`,
:math:`\epsilon = 10^{-6}`):

.. math::

   m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, U_t, \qquad
   v_t = \beta_2 v_{t-1} + (1-\beta_2)\, U_t^2, \\
   r_t &= \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}
          + \omega\, \theta_t, \qquad
   \theta_{t+1} = \theta_t - \eta_t\, \frac{\|\theta_t\|}{\|r_t\|}\, r_t

(the trust ratio :math:`\|\theta_t\| / \|r_t\|` is 1 where either norm is
0). A ``backend`` takes LAMB's place.
""",
    'LAMB_REFERENCE': r"""
Y. You, J. Li, S. Reddi, J. Hseu, S. Kumar, S. Bhojanapalli, X. Song,
J. Demmel, K. Keutzer, C.-J. Hsieh, `Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes <https://arxiv.org/abs/1904.00962>`_,
ICLR 2020 (LAMB).
""",
    'EVA_REFERENCE': r"""
L. Zhang, S. Shi, B. Li, `Eva: Practical Second-order Optimization with
Kronecker-vectorized Approximation <https://arxiv.org/abs/2308.02123>`_,
ICLR 2023 (the link is the extended version).
""",
    'KFAC_REFERENCE': r"""
J. Martens, R. Grosse, `Optimizing Neural Networks with Kronecker-factored
Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.
""",
    'MKOR_REFERENCE': r"""
M. Mozaffari, S. Li, Z. Zhang, M. Mehri Dehnavi, `MKOR: Momentum-Enabled
Kronecker-Factor-Based Optimizer Using Rank-1 Updates
<https://arxiv.org/abs/2306.01685>`_, NeurIPS 2023.
""",
    'SONEW_REFERENCE': r"""
Devvrit, S. S. Duvvuri, R. Anil, V. Gupta, C.-J. Hsieh, I. Dhillon, `A
Computationally Efficient Sparsified Online Newton Method
<https://arxiv.org/abs/2311.10085>`_, NeurIPS 2023.
""",
}

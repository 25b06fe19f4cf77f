"""A training step over ``torch.compile``d layers that falls back to eager (``train.compile``).

:class:`CompiledLayers` compiles each Transformer layer of a HittER in place (parameters and
state dict unchanged), over the static shapes of ``model.shape_buckets`` (dynamic shapes when
it is 0). :meth:`CompiledLayers.run` calls a training step; if the step fails while the layers
are compiled (a compiler error, or a failure inside the compiled code: torch 2.13's CPU
backward once failed with "setStorage ... out of bounds"), it logs one warning, returns the
layers to eager, clears any gradient a half-done backward left and runs the step again, which
its caller seeds afresh. An error of the step itself then raises eager, as it would have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from torch import nn

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CompiledLayers:
    """The compiled layers of ``model`` (none when ``enabled`` is False)."""

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self.model = model
        self.layers: list[nn.Module] = []
        if enabled:
            self.layers = [*model.pair_layers, *model.context_layers]
            for layer in self.layers:
                layer.compile(dynamic=model.config.shape_buckets == 0)

    def run(self, step: Callable[[], T]) -> T:
        """``step()``; redone eager, once and for all, if it fails while compiled."""
        if not self.layers:
            return step()
        try:
            return step()
        except Exception as e:
            logger.warning("a compiled step failed (%s: %s); redone and continued eager",
                           type(e).__name__, " ".join(str(e).split())[:200])
            for layer in self.layers:
                layer._compiled_call_impl = None  # what nn.Module.compile set: eager again
            self.layers = []
            self.model.zero_grad(set_to_none=True)  # a backward may have failed half-way
            return step()

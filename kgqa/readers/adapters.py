"""Cross-attention from a masked LM into HittER's context layers (paper section 4,
Figure 4, and appendix B).

After the self-attention block of chosen LM layers, and before their feed-forward block, a
:class:`CrossAttentionAdapter` lets the LM's hidden states (queries) attend over the output
sequence of one HittER context layer ([GCLS, source, neighbours], keys and values projected
from the KG width to the LM width), masking KG padding. Its output goes through dense, dropout,
residual and LayerNorm (post-LN, as BERT's own attention output; REFERENCE.md "QA").

The LM is composed, not forked: :func:`attach_adapters` replaces each chosen ``layer.attention``
by a :class:`KGAttention` that calls the original module and then the adapter
(:class:`SharedKGAttention` for a layer that runs at several depths, as ALBERT's shared layers
do: an adapter per depth, the depth counted per forward call). The KG states of the current
batch reach the adapters through a shared :class:`KGContext`, which
:class:`kgqa.model.KGEnhancedLM` fills for the duration of one forward call. With an empty
context (or for rows without a KG entity) the layer is the stock one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig


def default_layer_mapping(num_lm_layers: int, num_kg_layers: int) -> dict[int, int]:
    """Which HittER context layer each LM layer attends to; both 1-based, ``{lm: kg}``.

    The paper (12 LM layers, 6 HittER layers) skips HittER's first layer and connects every two
    LM layers to one HittER layer from the top down: LM 3-4 -> 2, 5-6 -> 3, ..., 11-12 -> 6; LM
    layers 1-2 get no adapter. The rule for other depths, with L LM and K KG layers and the usable
    KG layers 2..K (only layer 1 when K = 1):

    * L >= 2K (room for two LM layers per KG layer, as in the paper): the top 2(K-1) LM layers
      attend in pairs to KG layers 2..K, bottom to bottom (K = 1: the top two to layer 1).
    * L < 2K (a shallow LM): every second LM layer from the top (L, L-2, ...) attends to the KG
      layer at the same relative depth, ceil(l K / L); layers that would get KG layer 1 get none
      (unless K = 1).

    Examples: (12, 6) -> the paper's; (6, 6) -> {2: 2, 4: 4, 6: 6}; (6, 3) -> {3: 2, 4: 2, 5: 3,
    6: 3}; (6, 2) -> {5: 2, 6: 2}; (4, 6) -> {2: 3, 4: 6}.
    """
    L, K = num_lm_layers, num_kg_layers
    if L < 1 or K < 1:
        raise ValueError(f"need at least one LM and one KG layer, got {L} and {K}")
    usable = list(range(2, K + 1)) if K > 1 else [1]
    if L >= 2 * K:
        first = L - 2 * len(usable) + 1
        return {first + i: usable[i // 2] for i in range(2 * len(usable))}
    mapping = {}
    for lm in range(L, 0, -2):
        kg = math.ceil(lm * K / L)
        if kg in usable:
            mapping[lm] = kg
    return dict(sorted(mapping.items()))


def check_layer_mapping(mapping: Mapping[int, int], num_lm_layers: int, num_kg_layers: int) -> None:
    """Raise if ``mapping`` names an LM layer outside 1..L or a KG layer outside 1..K."""
    for lm, kg in mapping.items():
        if not (1 <= lm <= num_lm_layers and 1 <= kg <= num_kg_layers):
            raise ValueError(
                f"layer mapping {lm}:{kg} out of range for {num_lm_layers} LM layers "
                f"and {num_kg_layers} KG layers (both 1-based)"
            )


class KGStates(NamedTuple):
    """HittER's output for the rows of a batch that have a KG entity."""

    rows: torch.Tensor  # (B_kg,) int64, indices into the LM batch
    layers: tuple[torch.Tensor, ...]  # every context-layer output, each (B_kg, T, D_kg)
    mask: torch.Tensor  # (B_kg, T) bool, True = real KG token


class KGContext:
    """The KG states of the batch being encoded, shared by the model and its adapters."""

    def __init__(self) -> None:
        self.states: KGStates | None = None
        self.calls: dict[int, int] = {}  # per shared layer (id): its calls in this forward

    @contextmanager
    def use(self, states: KGStates | None) -> Iterator[None]:
        self.states = states
        self.calls = {}
        try:
            yield
        finally:
            self.states = None


class CrossAttentionAdapter(nn.Module):
    """Multi-head attention of LM tokens over KG tokens, then dense + dropout + residual +
    LayerNorm (the paper's block). Width, heads, dropouts, LayerNorm eps and init std are the
    LM's.

    ``gated=True`` (not in the paper): ``x + tanh(g) * dropout(dense(attention))`` with a
    scalar ``g`` that starts at 0 and no LayerNorm (Flamingo's gated cross-attention), so at
    initialisation the layer returns its input exactly and the model is the plain LM."""

    def __init__(self, lm_config: PreTrainedConfig, kg_dim: int,
                 hidden_dropout: float | None = None, gated: bool = False):
        super().__init__()
        self.gated = gated
        d, self.heads = lm_config.hidden_size, lm_config.num_attention_heads
        if d % self.heads:
            raise ValueError(f"hidden size {d} is not a multiple of {self.heads} heads")
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kg_dim, d)
        self.value = nn.Linear(kg_dim, d)
        self.dense = nn.Linear(d, d)
        self.attention_dropout = lm_config.attention_probs_dropout_prob
        if hidden_dropout is None:
            hidden_dropout = lm_config.hidden_dropout_prob
        self.dropout = nn.Dropout(hidden_dropout)
        if gated:
            self.gate = nn.Parameter(torch.zeros(1))  # (1,): DeepSpeed cannot broadcast 0-d
        else:
            self.norm = nn.LayerNorm(d, eps=lm_config.layer_norm_eps)
        for linear in (self.query, self.key, self.value, self.dense):
            nn.init.normal_(linear.weight, std=lm_config.initializer_range)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, kg: torch.Tensor, kg_mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) LM states; kg (B, T, D_kg); kg_mask (B, T) bool, True = real token
        (at least one per row). Returns (B, L, D)."""
        B, L, D = x.shape
        T, H = kg.shape[1], self.heads
        q = self.query(x).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, D/H)
        k = self.key(kg).view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, D/H)
        v = self.value(kg).view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, D/H)
        a = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=kg_mask[:, None, None, :],  # (B, 1, 1, T)
            dropout_p=self.attention_dropout if self.training else 0.0,
        )  # (B, H, L, D/H)
        a = a.transpose(1, 2).reshape(B, L, D)
        if self.gated:
            return x + torch.tanh(self.gate) * self.dropout(self.dense(a))
        return self.norm(x + self.dropout(self.dense(a)))


    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor, kg: torch.Tensor, kg_mask: torch.Tensor
                          ) -> torch.Tensor:
        """The attention weights of :meth:`forward` (without dropout): (B, H, L, T), for
        inspection (``python -m kgqa.ask``)."""
        B, L, D = x.shape
        T, H = kg.shape[1], self.heads
        q = self.query(x).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, D/H)
        k = self.key(kg).view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, D/H)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)  # (B, H, L, T)
        return scores.masked_fill(~kg_mask[:, None, None, :], float("-inf")).softmax(-1)


class KGAttention(nn.Module):
    """An LM layer's attention block followed by a :class:`CrossAttentionAdapter`.

    Called exactly like the wrapped module (its return value is passed on with the hidden
    states replaced). Rows without a KG entity are copied through unchanged, so a batch mixing
    questions with and without a topic entity gives the former exactly the plain LM's states.
    """

    def __init__(
        self, attention: nn.Module, adapter: CrossAttentionAdapter, kg_layer: int,
        context: KGContext,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.adapter = adapter
        self.kg_layer = kg_layer  # 1-based
        self.context = context

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple:
        out, *rest = self.attention(hidden_states, *args, **kwargs)  # out (B, L, D)
        kg = self.context.states
        if kg is not None and len(kg.rows):
            x = out[kg.rows]  # (B_kg, L, D)
            y = self.adapter(x, kg.layers[self.kg_layer - 1], kg.mask)
            out = out.index_copy(0, kg.rows, y)
        return (out, *rest)

    def extra_repr(self) -> str:
        return f"kg_layer={self.kg_layer}"


class SharedKGAttention(nn.Module):
    """The attention block of a layer that runs at several depths (ALBERT shares its layers),
    followed at each depth of ``mapping`` by that depth's adapter: the k-th call in a forward
    pass is the k-th of ``depths``."""

    def __init__(self, attention: nn.Module, adapters: Mapping[int, CrossAttentionAdapter],
                 mapping: Mapping[int, int], depths: Sequence[int], context: KGContext) -> None:
        super().__init__()
        self.attention = attention
        self.adapters = nn.ModuleDict({str(lm): a for lm, a in adapters.items()})
        self.kg_layers = dict(mapping)  # {lm depth: kg layer}, both 1-based
        self.depths = tuple(depths)
        self.context = context

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple:
        out, *rest = self.attention(hidden_states, *args, **kwargs)  # out (B, L, D)
        call = self.context.calls.get(id(self), -1) + 1
        self.context.calls[id(self)] = call
        depth = self.depths[call % len(self.depths)]
        kg = self.context.states
        if kg is not None and len(kg.rows) and depth in self.kg_layers:
            y = self.adapters[str(depth)](out[kg.rows], kg.layers[self.kg_layers[depth] - 1],
                                          kg.mask)  # (B_kg, L, D)
            out = out.index_copy(0, kg.rows, y)
        return (out, *rest)

    def extra_repr(self) -> str:
        return f"depths={self.depths}, kg_layers={self.kg_layers}"


def attach_adapters(
    layers: Sequence[tuple[nn.Module, tuple[int, ...]]],
    mapping: Mapping[int, int],
    kg_dim: int,
    lm_config: PreTrainedConfig,
    context: KGContext,
    hidden_dropout: float | None = None,
    gated: bool = False,
) -> dict[int, CrossAttentionAdapter]:
    """Wrap the attention block of each layer that computes a depth of ``mapping`` ({lm: kg},
    1-based) in place; ``layers`` are the LM's distinct layers with the depths each computes
    (:func:`kgqa.lm.encoder_layers`). Returns the new adapters by LM depth."""
    adapters = {}
    for layer, depths in layers:
        mine = {lm: kg for lm, kg in mapping.items() if lm in depths}
        if not mine:
            continue
        if isinstance(layer.attention, (KGAttention, SharedKGAttention)):
            raise ValueError(f"LM layer {min(mine)} already has an adapter")
        new = {lm: CrossAttentionAdapter(lm_config, kg_dim, hidden_dropout, gated) for lm in mine}
        if len(depths) == 1:
            (lm, kg), = mine.items()
            layer.attention = KGAttention(layer.attention, new[lm], kg, context)
        else:
            layer.attention = SharedKGAttention(layer.attention, new, mine, depths, context)
        adapters.update(new)
    return dict(sorted(adapters.items()))

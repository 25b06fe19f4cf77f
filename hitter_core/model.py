"""HittER: hierarchical Transformers for link prediction (paper section 2).

* Section 2.1 / the no-context baseline: an *entity Transformer* reads [CLS, entity, relation]
  and its CLS output scores every entity by dot product (``use_context=False``).
* Section 2.2: the same entity Transformer encodes the source pair and every neighbour pair;
  a *context Transformer* reads [GCLS, source vector, neighbour vectors...] and the GCLS
  output scores every entity (1vsAll, softmax cross-entropy).
* Section 2.3: masked entity prediction (MEP) perturbs the source entity of a share of the
  training examples and, optionally, adds an auxiliary loss that recovers it.

Behaviour the paper leaves out follows ``shared/design/REFERENCE.md`` ("Link prediction"):
LayerNorm epsilons, the 100-row type table, reciprocal relations (2R relation rows, a head
query (?, p, o) is asked as (o, p + R, ?)), MEP sampling and the auxiliary-loss weight.

Loss (training job, one direction): ``loss = lp_loss + w * mep_loss`` with ``lp_loss`` the mean
cross-entropy over the batch, ``mep_loss`` the mean cross-entropy over the MEP-selected
examples only, ``w = self_dropout / (1 + self_dropout)`` and the term present only when
``mep_aux_loss`` is on and the model is training. The reference computes it so (per direction;
its trainer sums the tail- and head-query losses). Both terms use ``label_smoothing``.

Deliberate small differences from the reference: the auxiliary loss scores against the same
dropped-out entity table as the main scores (the reference drew a second dropout mask); MEP is
off in the no-context model (nothing would be left to recover the source from); and repeated
(entity, relation) pairs of a training batch share one encoding and its dropout draws
(``dedup_pairs_in_training``; the expected gradient is unchanged).

Work the outputs do not need is skipped, which changes no result beyond float rounding: the
context Transformer runs on packed real tokens (``hitter_core.layers``), the last entity layer
computes only the CLS output, and the last context layer only GCLS (and the source position
for the MEP loss) unless every hidden state is asked for. With ``shape_buckets`` (static
shapes) the packed pair and token counts are padded up to bucket sizes with rows that nothing
reads, so that an epoch sees a few distinct shapes. Dropout, attention and the
cross-entropy come from ``kernels_for(device)`` (``hitter_core.kernels``): torch's own ops,
or their faster CPU equivalents on CPU.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from hitter_core.config import HittERConfig
from hitter_core.kernels import kernels_for
from hitter_core.layers import LayerNorm, Packing, PostLNLayer, bucket_size

# Token-type ids of the context Transformer (REFERENCE.md "Encoder").
GCLS_TYPE, SOURCE_TYPE, NEIGHBOUR_TYPE = 0, 1, 2  # = the column, capped at 2


@dataclass
class HittEROutput(ModelOutput):
    """``scores`` (B, E); losses are scalars; ``hidden_states`` holds every context-layer
    output (B, 2+N, D) when asked for; ``attention_mask`` (B, 2+N) bool, True = real token."""

    loss: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    lp_loss: torch.Tensor | None = None
    mep_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attention_mask: torch.Tensor | None = None


class HittER(PreTrainedModel):
    """Entity Transformer + context Transformer + 1vsAll dot-product scoring."""

    config_class = HittERConfig
    base_model_prefix = "hitter"
    _no_split_modules = ["PostLNLayer"]

    def __init__(self, config: HittERConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.entity_embeddings = nn.Embedding(config.num_entities, d)
        self.relation_embeddings = nn.Embedding(2 * config.num_relations, d)
        self.cls_vector = nn.Parameter(torch.zeros(d))
        self.pair_position_embeddings = nn.Embedding(3, d)  # [CLS], entity, relation
        self.pair_norm = LayerNorm(d, eps=config.layer_norm_eps)
        self.pair_layers = nn.ModuleList(
            PostLNLayer(config, config.layer_norm_eps, ffn_dropout=False)
            for _ in range(config.num_entity_layers)
        )
        if config.use_context:
            self.gcls_vector = nn.Parameter(torch.zeros(d))
            self.mask_vector = nn.Parameter(torch.zeros(d))  # MEP [MASK]
            self.type_embeddings = nn.Embedding(config.type_vocab_size, d)
            self.context_norm = LayerNorm(d, eps=config.layer_norm_eps)
            self.context_layers = nn.ModuleList(
                PostLNLayer(config, config.context_layer_norm_eps, ffn_dropout=True)
                for _ in range(config.num_context_layers)
            )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear / Embedding normal(0, std), LayerNorm 1 / 0
        if isinstance(module, HittER):
            for name in ("cls_vector", "gcls_vector", "mask_vector"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name), mean=0.0, std=self.config.initializer_range)

    # ------------------------------------------------------------------ public entry points

    def forward(
        self,
        sources: torch.Tensor,
        relations: torch.Tensor,
        nbr_entities: torch.Tensor | None = None,
        nbr_relations: torch.Tensor | None = None,
        nbr_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> HittEROutput:
        """Score the queries (sources (B,), relations (B,) in [0, 2R), ?) against all entities.

        Neighbours (B, N) with ``nbr_mask`` True for real tokens; ignored when
        ``use_context`` is off, and N = 0 when not given. With ``targets`` (B,) the loss is
        computed (module docstring). MEP and dropout follow ``self.training``.
        """
        mep = self.training and self.config.use_context and self.config.mep_self_dropout > 0
        kernels = kernels_for(sources.device)
        # The 0.6 "output" dropout on the scoring table (REFERENCE.md), in training only.
        table = kernels.dropout(
            self.entity_embeddings.weight, self.config.output_dropout, self.training
        )  # (E, D)
        if not self.config.use_context:
            src_vec = self.entity_embeddings(sources)  # (B, D)
            query = self._encode_pairs(src_vec, relations, input_dropout=self.training)
            out = HittEROutput(scores=score_entities(query, table))  # (B, E)
            return self._add_loss(out, targets)

        aux = mep and self.config.mep_aux_loss
        hidden, head, mask, selected = self._contextualise(
            sources, relations, nbr_entities, nbr_relations, nbr_mask, mep=mep,
            input_dropout=self.training, hidden_states=output_hidden_states, head_positions=1 + aux,
        )  # head (B, 1 + aux, D): the last layer's GCLS (and source) outputs
        out = HittEROutput(
            scores=score_entities(head[:, 0], table),  # (B, E)
            hidden_states=hidden,
            attention_mask=mask,
        )
        if aux:
            # Recover the perturbed source from its context output (weights tied, no bias).
            if selected.any():
                src_scores = score_entities(head[selected, 1], table)  # (S, E)
                out.mep_loss = kernels.cross_entropy(
                    src_scores, sources[selected], label_smoothing=self.config.label_smoothing
                )
            else:
                out.mep_loss = head.new_zeros(())
        return self._add_loss(out, targets)

    def encode(
        self,
        sources: torch.Tensor,
        relations: torch.Tensor,
        nbr_entities: torch.Tensor | None = None,
        nbr_relations: torch.Tensor | None = None,
        nbr_mask: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Representation mode for the QA stage (REFERENCE.md "QA"): every context-layer output
        (B, 2+N, D) and the mask (B, 2+N). No source masking and no 0.6 input dropout; the
        Transformer-internal dropouts follow ``self.training``."""
        if not self.config.use_context:
            raise ValueError("encode() needs the context Transformer (use_context=True)")
        hidden, _, mask, _ = self._contextualise(
            sources, relations, nbr_entities, nbr_relations, nbr_mask,
            mep=False, input_dropout=False, hidden_states=True, head_positions=0,
        )
        return hidden, mask

    # ------------------------------------------------------------------ internals

    def _add_loss(self, out: HittEROutput, targets: torch.Tensor | None) -> HittEROutput:
        if targets is not None:
            out.lp_loss = kernels_for(out.scores.device).cross_entropy(
                out.scores, targets, label_smoothing=self.config.label_smoothing
            )
            out.loss = out.lp_loss
            if out.mep_loss is not None:
                out.loss = out.lp_loss + self.config.mep_loss_weight * out.mep_loss
        return out

    def _encode_pairs(
        self, entity_vecs: torch.Tensor, relation_ids: torch.Tensor, input_dropout: bool
    ) -> torch.Tensor:
        """Entity Transformer: (P, D) entity vectors and (P,) relation ids -> (P, D) CLS out."""
        P, D = entity_vecs.shape
        x = torch.stack(
            (self.cls_vector.expand(P, D), entity_vecs, self.relation_embeddings(relation_ids)),
            dim=1,
        )  # (P, 3, D)
        x = x + self.pair_position_embeddings.weight  # (3, D) broadcast
        x = kernels_for(x.device).dropout(x, self.config.output_dropout, input_dropout)
        x = self.pair_norm(x).view(P * 3, D)  # packed tokens, no padding
        starts = torch.arange(0, 3 * P, 3, device=x.device)  # (P,)
        packing = Packing(P, 3, None, starts, None)
        for layer in self.pair_layers[:-1]:
            x = layer(x, packing)
        return self.pair_layers[-1](x, packing, first=1)  # (P, D): only CLS is used

    def _sample_mep(self, B: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(B,) bool masks selected / masked / replaced, as the reference draws them."""
        c = self.config
        selected = torch.rand(B, device=device) < c.mep_self_dropout
        masked = selected & (torch.rand(B, device=device) < c.mep_mask_prob)
        replaced = selected & ~masked & (torch.rand(B, device=device) < c.mep_replace_prob)
        return selected, masked, replaced

    def _contextualise(
        self,
        sources: torch.Tensor,
        relations: torch.Tensor,
        nbr_entities: torch.Tensor | None,
        nbr_relations: torch.Tensor | None,
        nbr_mask: torch.Tensor | None,
        mep: bool,
        input_dropout: bool,
        hidden_states: bool,
        head_positions: int,
    ) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Both Transformers; returns (hidden, head, mask (B, 2+N), MEP-selected (B,)).

        ``hidden``: with ``hidden_states``, every context layer's (B, 2+N, D) output, zeros at
        padding; else None. ``head`` (B, k, D): the last layer's output at the first
        k = ``head_positions`` positions (None if 0), computed on its own, so that it is the
        same bit for bit whether hidden states are asked for or not (``hidden[-1]`` then holds
        it at those positions). Without hidden states the rest of the last layer is skipped."""
        B, two_r, device = sources.shape[0], 2 * self.config.num_relations, sources.device
        if nbr_entities is None:  # N = 0
            nbr_entities = nbr_relations = sources.new_zeros(B, 0)
            nbr_mask = torch.zeros(B, 0, dtype=torch.bool, device=device)
        elif nbr_mask is None:
            nbr_mask = torch.ones(nbr_entities.shape, dtype=torch.bool, device=device)
        src_vec, src_key, selected = self._perturb_sources(sources, relations, mep)

        # Real pairs (source first, then real neighbours) of the (B, 1+N) pair grid.
        ents = torch.cat((sources[:, None], nbr_entities), dim=1)  # (B, 1+N)
        rels = torch.cat((relations[:, None], nbr_relations), dim=1)  # (B, 1+N)
        keys = torch.cat((src_key[:, None], nbr_entities * two_r + nbr_relations), dim=1)
        real = torch.cat((nbr_mask.new_ones(B, 1), nbr_mask), dim=1)  # (B, 1+N)
        pair_out = self._encode_real_pairs(ents, rels, keys, real, src_vec, input_dropout)

        # Context Transformer over [GCLS, source, neighbours...].
        mask = torch.cat((torch.ones_like(real[:, :1]), real), dim=1)  # (B, 2+N)
        x, packing = self._pack_context(pair_out, mask)  # (Tb, D)
        hidden, head = self._run_context_layers(x, packing, mask, hidden_states, head_positions)
        return hidden, head, mask, selected

    def _perturb_sources(
        self, sources: torch.Tensor, relations: torch.Tensor, mep: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Source vectors (B, D) after MEP, their pair keys (B,) (equal keys share one
        encoding) and the MEP-selected (B,); replaced sources take a random entity's vector."""
        B, device, two_r = sources.shape[0], sources.device, 2 * self.config.num_relations
        src_vec = self.entity_embeddings(sources)  # (B, D)
        src_key = sources * two_r + relations  # (B,) pair key: entity * 2R + relation
        selected = torch.zeros(B, dtype=torch.bool, device=device)
        if mep:
            selected, masked, replaced = self._sample_mep(B, device)
            random_ids = torch.randint(self.config.num_entities, (B,), device=device)
            src_vec = torch.where(masked[:, None], self.mask_vector.to(src_vec.dtype), src_vec)
            src_vec = torch.where(
                replaced[:, None], self.entity_embeddings(random_ids).detach(), src_vec
            )
            # [MASK] acts as entity id E; replaced sources get keys of their own (detached).
            src_key = torch.where(masked, self.config.num_entities * two_r + relations, src_key)
            src_key = torch.where(replaced, -1 - torch.arange(B, device=device), src_key)
        return src_vec, src_key, selected

    def _encode_real_pairs(
        self, ents: torch.Tensor, rels: torch.Tensor, keys: torch.Tensor, real: torch.Tensor,
        src_vec: torch.Tensor, input_dropout: bool,
    ) -> torch.Tensor:
        """Entity Transformer over the real pairs of the (B, 1+N) pair grid -> (P, D), row-major;
        the source (column 0) takes ``src_vec`` (B, D), after MEP. Repeated keys are encoded
        once in eval, and in training with ``dedup_pairs_in_training``."""
        device, width = ents.device, ents.shape[1]  # width = 1 + N
        positions = real.flatten().nonzero().squeeze(1)  # (P,) into B*(1+N)
        if not self.training or self.config.dedup_pairs_in_training:
            uniq, inverse = torch.unique(keys.flatten()[positions], return_inverse=True)  # (P,)
            first = torch.full(
                (len(uniq),), len(positions), dtype=torch.long, device=device
            ).scatter_reduce_(0, inverse, torch.arange(len(positions), device=device), "amin")
            unique_pos = positions[first]  # (U,) flat position of each distinct pair
        else:
            inverse, unique_pos = None, positions
        U = len(unique_pos)
        # Static shapes: repeat the first pair up to the bucket size; the copies are dropped.
        unique_pos = pad_rows(unique_pos, bucket_size(U, self.config.shape_buckets))  # (Ub,)
        row, col = unique_pos // width, unique_pos % width  # (Ub,)
        ent_vec = torch.where(
            (col == 0)[:, None], src_vec[row], self.entity_embeddings(ents.flatten()[unique_pos])
        )  # (Ub, D)
        pair_out = self._encode_pairs(ent_vec, rels.flatten()[unique_pos], input_dropout)[:U]
        if inverse is not None:
            pair_out = pair_out[inverse]  # (P, D)
        return pair_out

    def _pack_context(
        self, pair_out: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, Packing]:
        """The context Transformer's input (Tb, D) and its :class:`Packing`: the T = B + P real
        tokens of ``mask`` (B, 2+N) in row-major order (GCLS of a row, then its pairs
        ``pair_out`` (P, D)), and with static shapes Tb - T more at padding positions (masked as
        keys, never read); type embeddings, dropout and norm added."""
        (B, width), D, device = mask.shape, self.config.hidden_size, pair_out.device
        ctx_pos = mask.flatten().nonzero().squeeze(1)  # (T,) into B*(2+N)
        T = len(ctx_pos)
        Tb = min(bucket_size(T, self.config.shape_buckets), mask.numel())
        if Tb > T:
            spare = (~mask).flatten().nonzero().squeeze(1)[: Tb - T]
            ctx_pos = torch.cat((ctx_pos, spare))  # (Tb,)
        row_starts = torch.cumsum(mask.sum(1), 0) - mask.sum(1)  # (B,) packed GCLS index
        is_pair = torch.zeros(Tb, dtype=torch.bool, device=device)
        is_pair[:T] = True
        is_pair[row_starts] = False
        x = pair_out.new_zeros(Tb, D).index_copy(
            0, row_starts, self.gcls_vector.expand(B, D).to(pair_out.dtype)
        ).index_copy(0, is_pair.nonzero().squeeze(1), pair_out)  # (Tb, D)
        type_ids = (ctx_pos % width).clamp(max=NEIGHBOUR_TYPE)  # column 0 GCLS, 1 source
        x = x + self.type_embeddings(type_ids)  # (Tb, D)
        x = kernels_for(device).dropout(x, self.config.hidden_dropout, self.training)
        x = self.context_norm(x)
        return x, Packing(B, width, ctx_pos, row_starts, mask[:, None, None, :])

    def _run_context_layers(
        self, x: torch.Tensor, packing: Packing, mask: torch.Tensor, hidden_states: bool,
        head_positions: int,
    ) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
        """The context layers over packed tokens x (Tb, D) -> (hidden, head), as
        :meth:`_contextualise` returns them; the last layer runs only where they need it."""
        B, D = mask.shape[0], self.config.hidden_size
        layers = []
        for layer in self.context_layers[:-1]:
            x = layer(x, packing)
            layers.append(x)
        head = hidden = None
        if head_positions:
            head = self.context_layers[-1](x, packing, first=head_positions)  # (B * k, D)
            head = head.view(B, head_positions, D)
        if hidden_states:
            layers.append(self.context_layers[-1](x, packing))
            hidden = [packing.pad(h).masked_fill_(~mask[..., None], 0.0)
                      for h in layers]  # (B, 2+N, D) each, zeros at padding
            if head is not None:
                hidden[-1] = torch.cat((head, hidden[-1][:, head_positions:]), dim=1)
            hidden = tuple(hidden)
        return hidden, head


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, ...) -> (rows, ...): ``t`` followed by copies of its first row (rows >= n >= 1)."""
    extra = rows - len(t)
    return t if extra <= 0 else torch.cat((t, t[:1].expand(extra, *t.shape[1:])))


def score_entities(queries: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, D) query vectors against the (E, D) entity table -> (B, E) scores, in float32 also
    under bf16 autocast: the 1vsAll softmax runs over 14,541 (FB15K-237) or 40,943 (WN18RR)
    entities, and bf16's 8 mantissa bits would tie many of their scores in the loss and in the
    ranking. One (B, D) x (D, E) product a step, a small share of the step's FLOPs."""
    with torch.autocast(queries.device.type, enabled=False):
        return queries.float() @ table.float().T


class HittERScorer:
    """HittER as a :class:`hitter_core.evaluate.Scorer`: (sources (B,), relations (B,)) ->
    scores (B, E) in eval mode, with the fixed evaluation neighbourhoods of
    ``neighbour_index`` (REFERENCE.md "Neighbourhoods")."""

    def __init__(self, model: HittER, neighbour_index) -> None:
        self.model = model
        self.neighbour_index = neighbour_index

    @torch.no_grad()
    def __call__(self, sources: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        model, device = self.model, self.model.device
        was_training = model.training
        model.eval()
        try:
            kwargs = {}
            if model.config.use_context:
                nb = self.neighbour_index.gather(
                    sources, model.config.max_neighbours, train=False,
                    full_width=model.config.shape_buckets > 0,
                )
                kwargs = dict(
                    nbr_entities=nb.entities.to(device),
                    nbr_relations=nb.relations.to(device),
                    nbr_mask=nb.mask.to(device),
                )
            return model(sources.to(device), relations.to(device), **kwargs).scores
        finally:
            model.train(was_training)


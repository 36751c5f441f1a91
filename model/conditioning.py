"""Condition encoder: the k + 1 CLIP embeddings (query, then neighbours) -> cross-attention context.

Three variants (`ModelConfig.conditioning`), the paper's ablation of how to feed the neighbours:
- "self_attention" (ours, the paper's best): project every embedding to the context width, add a
  learned per-slot position embedding, contextualise the k + 1 slots with a small self-attention
  encoder and hand all k + 1 tokens to the U-Net's cross-attention layers.
- "cross_attention": one token: the query attends to the k + 1 slots (itself included, so a row
  without neighbours still has a key), plus a feed-forward layer.
- "concat": one token: an MLP over the query concatenated with a learned linear projection of the
  k neighbour slots laid end to end.

Slot 0 holds the query embedding (f_img(x) in training, f_txt(prompt) at inference); slots 1..k hold
the neighbours. Any slot can be masked, slot 0 included (query dropout in training teaches the model
to draw from the neighbours alone, which is what makes retrieval and database swapping matter).
Fewer than k + 1 slots may be given (the no-kNN ablation, or fewer neighbours than the model was
trained with): the missing slots are padded with zeros and *masked*, so they carry no information:
"self_attention" masks them in its self-attention and in the denoiser's cross-attention,
"cross_attention" in its attention, "concat" zeroes their projections (a masked query is replaced
by its learned position embedding in the two one-token variants).
"""
import torch
from torch import nn

CONDITIONINGS = ("self_attention", "cross_attention", "concat")


class ConditionEncoder(nn.Module):
    """[B, n <= k+1, clip_dim] embeddings -> ([B, tokens, width] context, key mask or None)."""

    def __init__(self, clip_dim: int, width: int, k: int, layers: int, heads: int,
                 variant: str = "self_attention"):
        super().__init__()
        if variant not in CONDITIONINGS:
            raise ValueError(f"conditioning={variant!r}: use one of {CONDITIONINGS}")
        self.k, self.variant = k, variant
        self.proj = nn.Linear(clip_dim, width)
        self.position = nn.Parameter(torch.randn(k + 1, width) * 0.02)
        if variant == "self_attention":
            layer = nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True)
            # enable_nested_tensor=False: padded slots must come out as ordinary (masked) tokens.
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        elif variant == "cross_attention":
            self.attend = nn.MultiheadAttention(width, heads, batch_first=True)
            self.feed_forward = _mlp(width, width)
        else:
            self.neighbours = nn.Linear(k * width, width) if k else None
            self.feed_forward = _mlp(2 * width if k else width, width)
        self.tokens = k + 1 if variant == "self_attention" else 1
        self.norm = nn.LayerNorm(width)
        # Learned null context for classifier-free guidance: the whole context, every token.
        self.null_context = nn.Parameter(torch.randn(self.tokens, width) * 0.02)

    def forward(self, emb: torch.Tensor, drop_mask: torch.Tensor | None = None,
                neighbour_mask: torch.Tensor | None = None):
        """Encode emb; rows where drop_mask is True get the null context.

        neighbour_mask [B, n] (True = slot present) masks individual slots, slot 0 (the query)
        included; slots beyond emb's n are always masked; a row with every slot masked keeps slot 0.
        Returns (context, key_mask); key_mask is None when every context token is present, else a
        [B, tokens] bool mask to pass to cross-attention.
        """
        batch, slots, _ = emb.shape
        if slots > self.k + 1:
            raise ValueError(f"got {slots} condition slots but the model takes at most k + 1 = "
                             f"{self.k + 1}; retrieve k = {self.k} neighbours")
        slot_mask = _slot_mask(emb, self.k + 1, neighbour_mask)
        if slots < self.k + 1:
            emb = torch.cat([emb, emb.new_zeros(batch, self.k + 1 - slots, emb.shape[2])], dim=1)
        x = self.proj(emb) + self.position
        if self.variant == "self_attention":
            padding = None if slot_mask is None else ~slot_mask
            context, key_mask = self.norm(self.encoder(x, src_key_padding_mask=padding)), slot_mask
        else:
            context, key_mask = self._one_token(x, slot_mask), None
        if drop_mask is not None:
            # torch.where (not indexing) keeps null_context in every graph, as DDP requires.
            drop = drop_mask.to(context.device).view(batch, 1, 1)
            context = torch.where(drop, self.null_context.to(context.dtype), context)
            if key_mask is not None:
                key_mask = key_mask | drop.view(batch, 1)  # the null context uses every token
        return context, key_mask

    def _one_token(self, x: torch.Tensor, slot_mask: torch.Tensor | None) -> torch.Tensor:
        """The "cross_attention" and "concat" variants: [B, k+1, width] slots -> [B, 1, width]."""
        query = x[:, :1]
        if slot_mask is not None:  # a masked query asks with its position embedding alone
            query = torch.where(slot_mask[:, :1, None], query, self.position[:1].to(x.dtype))
        if self.variant == "cross_attention":
            padding = None if slot_mask is None else ~slot_mask
            token = query + self.attend(query, x, x, key_padding_mask=padding, need_weights=False)[0]
            return self.norm(token + self.feed_forward(token))
        parts = [query[:, 0]]
        if self.neighbours is not None:
            slots = x[:, 1:] if slot_mask is None else x[:, 1:] * slot_mask[:, 1:, None].to(x.dtype)
            parts.append(self.neighbours(slots.flatten(1)))
        return self.norm(self.feed_forward(torch.cat(parts, dim=1)))[:, None]


def _mlp(inputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


def _slot_mask(emb: torch.Tensor, total: int, neighbour_mask: torch.Tensor | None):
    """[B, total] bool mask of present slots, or None when all are present."""
    batch, slots, _ = emb.shape
    if neighbour_mask is None and slots == total:
        return None
    mask = torch.zeros(batch, total, dtype=torch.bool, device=emb.device)
    mask[:, :slots] = True if neighbour_mask is None else neighbour_mask.to(emb.device, torch.bool)
    # A row may drop its query slot (training with query dropout: the neighbours alone must carry
    # the condition), but attention needs at least one key: a row with nothing left keeps slot 0.
    empty = ~mask.any(dim=1)
    mask[:, 0] |= empty
    return mask

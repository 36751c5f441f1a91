"""Condition encoder: the k + 1 CLIP embeddings (query, then neighbours) -> cross-attention context.

This is the paper's best conditioning variant (i): project every embedding to the context width,
add a learned per-slot position embedding, contextualise the slots with a small self-attention
encoder, and hand the resulting tokens to the U-Net's cross-attention layers.

Slot 0 holds the query embedding (f_img(x) in training, f_txt(prompt) at inference); slots 1..k hold
the neighbours. Any slot can be masked, slot 0 included (query dropout in training teaches the model
to draw from the neighbours alone, which is what makes retrieval and database swapping matter). Fewer than k + 1 slots may be given (the no-kNN ablation, or fewer neighbours than
the model was trained with): the missing slots are padded with zeros and *masked*, both in the
self-attention here and in the denoiser's cross-attention, so they carry no information at all.
"""
import torch
from torch import nn


class ConditionEncoder(nn.Module):
    """[B, n <= k+1, clip_dim] embeddings -> ([B, k+1, width] context, key mask or None)."""

    def __init__(self, clip_dim: int, width: int, k: int, layers: int, heads: int):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(clip_dim, width)
        self.position = nn.Parameter(torch.randn(k + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True)
        # enable_nested_tensor=False: padded slots must come out as ordinary (masked) tokens.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        # Learned null context for classifier-free guidance: the whole context, every slot.
        self.null_context = nn.Parameter(torch.randn(k + 1, width) * 0.02)

    def forward(self, emb: torch.Tensor, drop_mask: torch.Tensor | None = None,
                neighbour_mask: torch.Tensor | None = None):
        """Encode emb; rows where drop_mask is True get the null context.

        neighbour_mask [B, n] (True = slot present) masks individual slots, slot 0 (the query) included;
        slots beyond emb's n are always masked; a row with every slot masked keeps slot 0. Returns (context, key_mask); key_mask is None when every slot is present,
        else a [B, k+1] bool mask to pass to cross-attention.
        """
        batch, slots, _ = emb.shape
        if slots > self.k + 1:
            raise ValueError(f"got {slots} condition slots but the model takes at most k + 1 = "
                             f"{self.k + 1}; retrieve k = {self.k} neighbours")
        key_mask = _slot_mask(emb, self.k + 1, neighbour_mask)
        if slots < self.k + 1:
            emb = torch.cat([emb, emb.new_zeros(batch, self.k + 1 - slots, emb.shape[2])], dim=1)
        x = self.proj(emb) + self.position
        padding = None if key_mask is None else ~key_mask
        context = self.norm(self.encoder(x, src_key_padding_mask=padding))
        if drop_mask is not None:
            # torch.where (not indexing) keeps null_context in every graph, as DDP requires.
            drop = drop_mask.to(context.device).view(batch, 1, 1)
            context = torch.where(drop, self.null_context.to(context.dtype), context)
            if key_mask is not None:
                key_mask = key_mask | drop.view(batch, 1)  # the null context uses every slot
        return context, key_mask


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

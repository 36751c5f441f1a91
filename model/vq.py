"""The VQ autoencoder of the discrete backbone: images <-> grids of codebook indices (tokens).

The network is diffusers' VQModel (encoder, VectorQuantizer with a commitment loss, decoder); here
are its config, the token round trip and the codebook statistics. Training it: model.vq_train.

Images are float [B, 3, H, W] in [-1, 1]; tokens are int64 [B, h, w] with h = H / downsample.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
from diffusers import VQModel

DOWNSAMPLES = (1, 2, 4, 8)


@dataclass
class VQConfig:
    """Everything needed to rebuild the VQ autoencoder (saved in its checkpoints and in every
    discrete-backbone checkpoint, whose decoder it is)."""
    resolution: int = 16        # image side in pixels
    downsample: int = 2         # image side / token grid side: 2 ** (levels - 1)
    codes: int = 256            # codebook size K
    channels: int = 64          # width of every encoder/decoder level
    embed_dim: int = 8          # codebook vector size (small vectors keep more codes in use)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    attention: bool = False     # self-attention in the encoder/decoder mid blocks

    def __post_init__(self):
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample={self.downsample}: use one of {DOWNSAMPLES}")
        if self.resolution % self.downsample:
            raise ValueError(f"resolution={self.resolution} must be divisible by downsample={self.downsample}")
        if self.codes < 2:
            raise ValueError(f"codes={self.codes} must be at least 2")
        if self.channels % self.norm_num_groups:
            raise ValueError(f"channels={self.channels} must be divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def grid(self) -> int:
        """Token grid side h = w."""
        return self.resolution // self.downsample

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "VQConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VQ config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def build_vq(config: VQConfig) -> VQModel:
    """diffusers' VQModel with log2(downsample) + 1 levels of `channels` each."""
    levels = int(math.log2(config.downsample)) + 1
    return VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                   up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(config.channels,) * levels,
                   layers_per_block=config.layers_per_block, latent_channels=config.embed_dim,
                   sample_size=config.resolution, num_vq_embeddings=config.codes,
                   norm_num_groups=config.norm_num_groups, vq_embed_dim=config.embed_dim,
                   mid_block_add_attention=config.attention)


def encode_tokens(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> int64 tokens [B, h, w] (nearest codebook vector)."""
    latents = vq.encode(images).latents
    _, _, (_, _, indices) = vq.quantize(latents)
    return indices.view(latents.shape[0], latents.shape[2], latents.shape[3])


def decode_tokens(vq: VQModel, tokens: torch.Tensor) -> torch.Tensor:
    """int64 tokens [B, h, w] -> float [B, 3, H, W] (not clamped)."""
    batch, h, w = tokens.shape
    quant = vq.quantize.get_codebook_entry(tokens.reshape(-1), (batch, h, w, vq.config.vq_embed_dim))
    return vq.decode(quant, force_not_quantize=True).sample


def codebook_usage(tokens: torch.Tensor, codes: int) -> dict:
    """{perplexity, used, dead}: exp(entropy) of the token histogram (K when uniform, 1 when one
    code is used), and the number of codes used / never used."""
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=codes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"perplexity": round(float(entropy.exp()), 3), "used": used, "dead": codes - used}


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = (reference.float() - reconstruction.float().clamp(-1, 1)).pow(2).mean()
    return float(10 * torch.log10(4.0 / mse.clamp(min=1e-12)))

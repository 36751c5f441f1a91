"""The discrete backbone: DiscreteConfig and DiscreteDenoiser (condition encoder + token transformer
+ the frozen VQ decoder).

The transformer is diffusers' Transformer2DModel in its vectorized mode (the VQ-Diffusion
decoder): the K codes plus [MASK] are embedded with learned 2-D positions, each block has
self-attention, cross-attention to the ConditionEncoder's k + 1 context tokens and a feed-forward
layer, the timestep enters through adaptive layer norm, and the output is log p(x_0) over the K
codes ([MASK] excluded) per token. The VQ autoencoder that made the tokens rides along (frozen),
so a checkpoint alone decodes its samples.
"""
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers import Transformer2DModel
from diffusers.models.normalization import AdaLayerNorm
from torch import nn

from model.conditioning import CONDITIONINGS, ConditionEncoder
from model.vq import VQConfig, build_vq


@dataclass
class DiscreteConfig:
    """Everything needed to rebuild the discrete denoiser (saved in every checkpoint)."""
    manipulation: ClassVar[bool] = False  # no local-manipulation mode on this backbone (not a saved field)
    vq: dict = dataclasses.field(default_factory=lambda: VQConfig().to_dict())  # the tokenizer
    layers: int = 4                # transformer blocks
    heads: int = 4
    head_dim: int = 32             # width = heads * head_dim
    cond_width: int = 128          # condition width = the transformer's cross_attention_dim
    clip_dim: int = 512
    k: int = 10
    cond_layers: int = 1
    cond_heads: int = 4
    conditioning: str = "self_attention"
    num_train_timesteps: int = 100  # N (the paper: 100)
    backbone: str = "discrete"

    def __post_init__(self):
        self.vq = VQConfig.from_dict(dict(self.vq)).to_dict()  # validates it
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={self.conditioning!r}: use one of {CONDITIONINGS}")
        if self.cond_width % self.cond_heads:
            raise ValueError(f"cond_width={self.cond_width} must be divisible by cond_heads={self.cond_heads}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be at least 2")
        if self.k < 0:
            raise ValueError(f"k={self.k} must be >= 0")

    @property
    def vq_config(self) -> VQConfig:
        return VQConfig.from_dict(self.vq)

    @property
    def resolution(self) -> int:
        return self.vq_config.resolution

    @property
    def codes(self) -> int:
        return self.vq_config.codes

    @property
    def grid(self) -> int:
        return self.vq_config.grid

    @classmethod
    def tiny(cls, **overrides) -> "DiscreteConfig":
        """8 px images, 4 x 4 tokens, 16 codes, 2 blocks of width 32: for tests."""
        base = dict(vq=VQConfig(resolution=8, downsample=2, codes=16, channels=16, embed_dim=4,
                                norm_num_groups=8).to_dict(),
                    layers=2, heads=2, head_dim=16, cond_width=32, clip_dim=32, k=3, cond_heads=2,
                    num_train_timesteps=10)
        return cls(**{**base, **overrides})

    @classmethod
    def demo(cls, **overrides) -> "DiscreteConfig":
        """16 px stickers as 8 x 8 tokens of 256 codes, 4 blocks of width 128: the CPU demo."""
        return cls(**overrides)

    @classmethod
    def paper(cls, **overrides) -> "DiscreteConfig":
        """The paper's decoder: 24 blocks of width 1024 (16 heads x 64), 32 x 32 tokens of 2887
        codes (a 256 px VQGAN with downsampling 8), N = 100; GPU only."""
        base = dict(vq=VQConfig(resolution=256, downsample=8, codes=2887, channels=128, embed_dim=256,
                                norm_num_groups=32, attention=True).to_dict(),
                    layers=24, heads=16, head_dim=64, cond_width=512, cond_layers=2, cond_heads=8)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DiscreteConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown discrete model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def build_transformer(config: DiscreteConfig) -> Transformer2DModel:
    """diffusers' vectorized Transformer2DModel: K codes + [MASK] in, log p(x_0) over K codes out.

    Its AdaLayerNorms split the timestep embedding along dim 0, i.e. take one timestep for the whole
    batch (VQDiffusionPipeline's use); training draws one per sample, so they are switched to their
    per-sample mode (chunk_dim=1, diffusers' CogVideoX layout: [B, 2 D] -> shift, scale per row)."""
    model = Transformer2DModel(
        num_attention_heads=config.heads, attention_head_dim=config.head_dim,
        num_vector_embeds=config.codes + 1, sample_size=config.grid, num_layers=config.layers,
        cross_attention_dim=config.cond_width, activation_fn="geglu-approximate",
        num_embeds_ada_norm=config.num_train_timesteps, norm_type="ada_norm", dropout=0.0)
    for module in model.modules():
        if isinstance(module, AdaLayerNorm):
            module.chunk_dim = 1
    return model


class DiscreteDenoiser(nn.Module):
    """forward(x_t [B, h*w] tokens (K = [MASK]), t [B], emb [B, n <= k+1, d]) -> log p(x_0) [B, K, h*w]."""

    backbone = "discrete"

    def __init__(self, config: DiscreteConfig):
        super().__init__()
        self.config = config
        self.condition = ConditionEncoder(config.clip_dim, config.cond_width, config.k,
                                          config.cond_layers, config.cond_heads, config.conditioning)
        self.transformer = build_transformer(config)
        self.vq = build_vq(config.vq_config).requires_grad_(False).eval()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                drop_mask: torch.Tensor | None = None, neighbour_mask: torch.Tensor | None = None) -> torch.Tensor:
        if emb.shape[-1] != self.config.clip_dim:
            raise ValueError(f"embedding dimension {emb.shape[-1]} differs from the model's "
                             f"clip_dim {self.config.clip_dim}")
        context, key_mask = self.condition(emb, drop_mask, neighbour_mask)
        return self.transformer(x_t, encoder_hidden_states=context, timestep=t,
                                encoder_attention_mask=key_mask, return_dict=False)[0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.vq.eval()  # frozen: always in eval mode
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        """The denoiser's parameters (condition encoder + transformer), the frozen VQ excluded."""
        return sum(p.numel() for p in self.trainable_parameters())


def count_parameters(config: DiscreteConfig) -> int:
    """Parameters of the condition encoder + transformer, built on the meta device (no memory)."""
    with torch.device("meta"):
        condition = ConditionEncoder(config.clip_dim, config.cond_width, config.k, config.cond_layers,
                                     config.cond_heads, config.conditioning)
        transformer = build_transformer(config)
    return sum(p.numel() for module in (condition, transformer) for p in module.parameters())

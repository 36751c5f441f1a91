"""The denoiser: ModelConfig (saved in every checkpoint) and KnnDenoiser (condition encoder +
U-Net).

The U-Net is diffusers' UNet2DConditionModel; cross-attention blocks sit at the resolutions
listed in `attention_resolutions` and attend to the ConditionEncoder's context tokens (k + 1, or one
for the one-token conditioning variants). With `space_to_depth` s > 1 the image is folded into
s x s blocks of channels first (PixelUnshuffle) and unfolded after (PixelShuffle), so the U-Net runs
on an (H/s) x (W/s) grid with 3 s^2 channels: a 32 px image at the cost of a 16 px one.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from model.conditioning import CONDITIONINGS, ConditionEncoder

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network and its noise schedule."""
    resolution: int = 32                      # image side in pixels
    in_channels: int = 3
    space_to_depth: int = 1                   # s: the U-Net sees resolution/s px with in_channels*s*s channels
    block_out_channels: tuple = (32, 64, 64)  # one U-Net level per entry, halving resolution
    layers_per_block: int = 1                 # residual blocks per level
    attention_resolutions: tuple = (16, 8)    # levels (by pixel size) with cross-attention
    attention_head_dim: int = 32              # channels per attention head
    norm_num_groups: int = 16
    cond_width: int = 128                     # condition width = U-Net cross_attention_dim
    clip_dim: int = 512                       # CLIP embedding size d
    k: int = 10                               # neighbours; the context has k + 1 tokens
    cond_layers: int = 1                      # self-attention layers of the condition encoder
    cond_heads: int = 4
    conditioning: str = "self_attention"      # see model.conditioning.CONDITIONINGS
    prediction_type: str = "epsilon"          # "epsilon" | "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"  # "squaredcos_cap_v2" (cosine) | "linear"
    num_train_timesteps: int = 1000
    manipulation: bool = False                # local manipulation: the U-Net also sees I_manip (3 more input channels)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_resolutions = tuple(self.attention_resolutions)
        _validate(self)

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """16 px, channels (16, 32): for tests."""
        base = dict(resolution=16, block_out_channels=(16, 32), attention_resolutions=(8,),
                    attention_head_dim=16, norm_num_groups=8, cond_width=32, clip_dim=32, k=3,
                    cond_heads=2)
        return cls(**{**base, **overrides})

    @classmethod
    def demo(cls, **overrides) -> "ModelConfig":
        """32 px, ~2 M parameters, 11 condition tokens: the CPU demo."""
        return cls(**overrides)

    @classmethod
    def paper(cls, **overrides) -> "ModelConfig":
        """64 px, 512 base channels x (1, 2, 3, 4), 3 residual blocks, attention at 32/16/8: the
        DALL-E 2-style decoder the paper uses (~2.9 B parameters; GPU only)."""
        base = dict(resolution=64, block_out_channels=(512, 1024, 1536, 2048), layers_per_block=3,
                    attention_resolutions=(32, 16, 8), attention_head_dim=64, norm_num_groups=32,
                    cond_width=512, cond_layers=2, cond_heads=8)
        return cls(**{**base, **overrides})

    def level_resolutions(self) -> list:
        """The U-Net's grid size at each level (after space-to-depth)."""
        return [self.resolution // self.space_to_depth // 2 ** i for i in range(len(self.block_out_channels))]

    def to_dict(self) -> dict:
        """Plain dict of primitives and lists (safe for torch.load(weights_only=True) and JSON)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def _validate(config: ModelConfig):
    """Raise ValueError naming the key and the fix for an impossible config."""
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={config.prediction_type!r}: "
                         f"use one of {PREDICTION_TYPES}")
    if config.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={config.beta_schedule!r}: use one of {BETA_SCHEDULES}")
    if config.space_to_depth < 1 or config.resolution % config.space_to_depth:
        raise ValueError(f"space_to_depth={config.space_to_depth} must be at least 1 and divide "
                         f"resolution={config.resolution}")
    levels = config.level_resolutions()
    if config.resolution % (config.space_to_depth * 2 ** (len(levels) - 1)):
        raise ValueError(f"resolution={config.resolution} must be divisible by space_to_depth * "
                         f"2**{len(levels) - 1} for {len(levels)} block_out_channels levels")
    for res in config.attention_resolutions:
        if res not in levels:
            raise ValueError(f"attention_resolutions has {res}; the levels are {levels}")
    for channels in config.block_out_channels:
        if channels % config.norm_num_groups or channels % config.attention_head_dim:
            raise ValueError(f"block_out_channels entry {channels} must be divisible by "
                             f"norm_num_groups={config.norm_num_groups} and "
                             f"attention_head_dim={config.attention_head_dim}")
    if config.cond_width % config.cond_heads:
        raise ValueError(f"cond_width={config.cond_width} must be divisible by "
                         f"cond_heads={config.cond_heads}")
    if config.conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning={config.conditioning!r}: use one of {CONDITIONINGS}")
    if config.k < 0:
        raise ValueError(f"k={config.k} must be >= 0")


def block_types(config: ModelConfig) -> tuple:
    """(down_block_types, up_block_types): CrossAttn blocks at the attention resolutions."""
    attend = [res in config.attention_resolutions for res in config.level_resolutions()]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend))
    return down, up


def build_unet(config: ModelConfig) -> UNet2DConditionModel:
    """The diffusers U-Net for config; the mid block always has cross-attention."""
    down, up = block_types(config)
    # diffusers' `attention_head_dim` is, despite its name, the number of heads (diffusers #2011).
    heads = tuple(c // config.attention_head_dim for c in config.block_out_channels)
    channels = config.in_channels * config.space_to_depth ** 2
    extra = 3 * config.space_to_depth ** 2 if config.manipulation else 0  # I_manip, concatenated to x_t
    return UNet2DConditionModel(
        sample_size=config.resolution // config.space_to_depth, in_channels=channels + extra,
        out_channels=channels, down_block_types=down, up_block_types=up,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=config.cond_width,
        attention_head_dim=heads, norm_num_groups=config.norm_num_groups)


class KnnDenoiser(nn.Module):
    """eps (or v) prediction: forward(x_t [B,C,H,W], t [B], emb [B,n<=k+1,d]) -> [B,C,H,W].

    A manipulation model (config.manipulation) also takes image_cond [B,3,H,W] in [-1, 1] (the
    manipulated image), concatenated to x_t as extra input channels (paper, section 3.1)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.condition = ConditionEncoder(config.clip_dim, config.cond_width, config.k,
                                          config.cond_layers, config.cond_heads, config.conditioning)
        self.unet = build_unet(config)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                drop_mask: torch.Tensor | None = None,
                neighbour_mask: torch.Tensor | None = None,
                image_cond: torch.Tensor | None = None) -> torch.Tensor:
        """drop_mask [B] bool: use the null context (guidance; image_cond is kept); neighbour_mask
        [B, n]: see ConditionEncoder."""
        if emb.shape[-1] != self.config.clip_dim:
            raise ValueError(f"embedding dimension {emb.shape[-1]} differs from the model's "
                             f"clip_dim {self.config.clip_dim}")
        if (image_cond is not None) != self.config.manipulation:
            raise ValueError("a manipulation model needs image_cond (the manipulated image), and only it takes one")
        context, key_mask = self.condition(emb, drop_mask, neighbour_mask)
        if image_cond is not None:
            x_t = torch.cat([x_t, image_cond.to(x_t.dtype)], dim=1)
        s = self.config.space_to_depth
        x = F.pixel_unshuffle(x_t, s) if s > 1 else x_t
        out = self.unet(x, t, encoder_hidden_states=context, encoder_attention_mask=key_mask, return_dict=False)[0]
        return F.pixel_shuffle(out, s) if s > 1 else out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

"""PyTorch Vision Transformers for the GPU benchmark's ViT-S -> ViT-Ti reference step.

Written from timm's `VisionTransformer` (Dosovitskiy et al. 2021; timm 1.0
`vision_transformer.py`) with its defaults, as `kdjax.models.vit` is: a `patch x patch`
convolution with stride `patch`, a class token, a learned position embedding over class token +
patches, pre-norm blocks `x + attn(norm1(x))`, `x + mlp(norm2(x))` (qkv with bias,
`F.scaled_dot_product_attention` as timm's `fused_attn`, an exact-GELU MLP of width 4 D,
LayerNorm eps 1e-6), a final LayerNorm and a linear head on the class token. Initialisation
as timm's `init_weights_vit_timm`: truncated normal (std 0.02) Linear weights and position
embedding, zero biases, class token N(0, 1e-6). Inputs NCHW.

A test loads kdjax's weights into these modules and checks that the logits are equal, so the
benchmark times the same network in both frameworks.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (image size, patch, width D, heads); 12 blocks. kdjax.models.vit's 32x32 models.
VITS = {"vit_tiny": (32, 4, 192, 3), "vit_small": (32, 4, 384, 6)}
_LAYER_NORM_EPS = 1e-6


class Attention(nn.Module):

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):

    def __init__(self, image_size, patch_size, embed_dim, depth, num_heads, num_classes):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        num_tokens = (image_size // patch_size) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build_vit(name, num_classes=100, depth=12):
    """A ViT of `VITS` by name; `depth` blocks (12 as timm's; fewer for a smoke test)."""
    if name not in VITS:
        raise ValueError(f"unknown ViT {name!r}; choose from {sorted(VITS)}")
    image_size, patch_size, embed_dim, num_heads = VITS[name]
    return VisionTransformer(image_size, patch_size, embed_dim, depth, num_heads, num_classes)

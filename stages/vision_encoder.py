"""Vision encoder (Qwen3-VL style): image/video patches -> visual tokens and DeepStack features.

Patches arrive flattened by the processor, in merge-block order (per temporal patch, per m×m block row-major,
the block's patches row-major). Patch embedding (a Conv3d whose kernel equals its stride, i.e. a Linear),
learned positions resampled bilinearly to each grid, 2-D axial rotary, bidirectional attention inside every
temporal frame of every image/video, then the final merger and one DeepStack merger per tapped block.

Shapes: N patches of all images/videos, n images/videos, S frames (one per temporal patch of each entry),
D hidden_size, H heads, Dh head dim, m spatial_merge_size, Do out_hidden_size, G side of the learned grid.
"""

import torch
import torch.nn.functional as F
from torch import nn

from common.config import VisionEncoderConfig
from common.errors import ConfigError, InvalidRequestError
from stages.encoder_layers import PackedSegments, activation, packed_attention
from stages.layers import rope_inv_freq, rotate_half


def patch_coordinates(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per patch: (row, col) in its frame's full-resolution patch grid, and its entry index. Each [N].

    Inverts the processor's merge-block order: within a frame, patch i sits in block i // m², at (i // m) % m
    rows and i % m columns inside the block; blocks run row-major over the (h/m)×(w/m) block grid.
    """
    t, h, w = grid_thw.long().unbind(1)  # [n] each
    counts = t * h * w
    entry = torch.repeat_interleave(torch.arange(len(grid_thw), device=grid_thw.device), counts)  # [N]
    first = torch.cumsum(counts, 0) - counts
    within = (torch.arange(entry.numel(), device=grid_thw.device) - first[entry]) % (h * w)[entry]  # [N]
    blocks_per_row = (w // merge)[entry]
    block, inside = within // (merge * merge), within % (merge * merge)
    row = (block // blocks_per_row) * merge + inside // merge
    col = (block % blocks_per_row) * merge + inside % merge
    return row, col, entry


def bilinear_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resampling of a `side`-long axis to `size` points with align_corners=True.

    index [N] target positions, size [N] target axis lengths -> (source taps [N, 2], weights [N, 2]).
    Point i samples source position i·(side-1)/(size-1) (0 when size is 1); taps are clamped to the border.
    """
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)  # [N], float32 like transformers
    low = torch.floor(src)
    frac = src - low
    taps = torch.stack([low, low + 1], dim=1).long().clamp(0, side - 1)  # [N, 2]
    weights = torch.stack([1 - frac, frac], dim=1)  # [N, 2]
    return taps, weights


def apply_rotary_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, Dh], cos/sin [N, Dh] float32 -> x rotated (computed in float32, unlike the decoders' rotary,
    and returned in x's dtype)."""
    xf = x.float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # Kept as a Conv3d so the weight keeps the hub shape [D, C, Tp, P, P]; kernel == stride, so it is a Linear.
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C·Tp·P·P] (ordered channel, time, row, col) -> [N, D]."""
        weight = self.proj.weight.flatten(1)  # [D, C·Tp·P·P], same (channel, time, row, col) order
        return F.linear(pixel_values.to(weight.dtype), weight, self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: PackedSegments) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [N, H, Dh] each
        q, k = apply_rotary_fp32(q, cos, sin), apply_rotary_fp32(k, cos, sin)
        out = packed_attention(q, k, v, frames, scale=self.head_dim**-0.5)  # [N, H, Dh]
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: PackedSegments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, frames)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """m×m neighbouring patches -> one token: LayerNorm, concat (4·D), Linear -> exact GELU -> Linear(-> Do).

    The final merger normalises each patch before the concat; the DeepStack mergers normalise after it.
    """

    def __init__(self, cfg: VisionEncoderConfig, norm_after_concat: bool):
        super().__init__()
        self.merged_size = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm_after_concat = norm_after_concat
        self.ln_q = nn.LayerNorm(self.merged_size if norm_after_concat else cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_size, self.merged_size), nn.GELU(), nn.Linear(self.merged_size, cfg.out_hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N/m², Do]; the m² patches of a block are consecutive rows."""
        if self.norm_after_concat:
            x = self.ln_q(x.reshape(-1, self.merged_size))
        else:
            x = self.ln_q(x).reshape(-1, self.merged_size)  # [N/m², m²·D]
        return self.mlp(x)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.grid_side = int(cfg.num_position_embeddings**0.5)  # G: the learned table is a G×G grid
        if self.grid_side**2 != cfg.num_position_embeddings:
            raise ConfigError(f"num_position_embeddings={cfg.num_position_embeddings} is not a square")
        self.head_dim = cfg.head_dim
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_concat=False)
        self.merger_list = nn.ModuleList(
            PatchMerger(cfg, norm_after_concat=True) for _ in cfg.deepstack_visual_indexes
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [N, C·Tp·P·P], grid_thw [n, 3] -> (merged [N/m², Do], deepstack: list of [N/m², Do]).

        deepstack[j] is merger_list[j] applied to the output of block deepstack_visual_indexes[j].
        """
        self._check_inputs(pixel_values, grid_thw)
        grid_thw = grid_thw.to(device=pixel_values.device, dtype=torch.long)
        row, col, entry = patch_coordinates(grid_thw, self.cfg.spatial_merge_size)  # [N] each
        x = self.patch_embed(pixel_values)  # [N, D]
        x = x + self._learned_positions(row, col, grid_thw[entry, 1], grid_thw[entry, 2]).to(x.dtype)
        cos, sin = self._rotary(row, col)  # [N, Dh] each, float32
        frames = PackedSegments(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]))  # [S]

        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack

    def _check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
        cfg = self.cfg
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise InvalidRequestError(f"grid_thw must be [n, 3], got {tuple(grid_thw.shape)}", param="grid_thw")
        if (grid_thw <= 0).any() or (grid_thw[:, 1:] % cfg.spatial_merge_size != 0).any():
            raise InvalidRequestError(
                f"grid_thw needs t, h, w > 0 and h, w divisible by {cfg.spatial_merge_size}, got {grid_thw.tolist()}",
                param="grid_thw",
            )
        patches = int(grid_thw.prod(dim=1).sum())
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        if tuple(pixel_values.shape) != (patches, patch_dim):
            raise InvalidRequestError(
                f"pixel_values must be [{patches}, {patch_dim}] for these grids, got {tuple(pixel_values.shape)}",
                param="pixel_values",
            )

    def _learned_positions(
        self, row: torch.Tensor, col: torch.Tensor, height: torch.Tensor, width: torch.Tensor
    ) -> torch.Tensor:
        """The G×G learned table resampled bilinearly (align_corners=True) to each frame's h×w grid -> [N, D]."""
        row_taps, row_weights = bilinear_taps(row, height, self.grid_side)  # [N, 2] each
        col_taps, col_weights = bilinear_taps(col, width, self.grid_side)
        taps = (row_taps[:, :, None] * self.grid_side + col_taps[:, None, :]).reshape(-1, 4)  # [N, 4] table rows
        weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)  # [N, 4]
        return (self.pos_embed(taps) * weights[:, :, None].to(self.pos_embed.weight.dtype)).sum(dim=1)

    def _rotary(self, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D axial rotary: the first half of each head's angles follow the row, the second the column.

        Computed here (not a buffer): it is tiny and this keeps the module free of state to restore after loading.
        """
        inv_freq = rope_inv_freq(self.head_dim // 2, self.cfg.rope_theta, device=row.device)  # [Dh/4]
        angles = torch.cat([row.float()[:, None] * inv_freq, col.float()[:, None] * inv_freq], dim=1)  # [N, Dh/2]
        angles = torch.cat([angles, angles], dim=1)  # [N, Dh], rotate-half layout
        return angles.cos(), angles.sin()

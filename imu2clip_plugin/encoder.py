"""The IMU encoder: IMU window ``(B, C, T)`` → embedding ``(B, embed_dim)`` in the CLIP space.

Architecture (all normalisations are per sample, so batch composition never changes an embedding)::

    x (B, C, T), mask (B, T)                                   C: IMU channels, T: samples (any length)
    └ zero the masked (gap) samples
    └ MaskedGroupNorm over the sensor groups                  accelerometer (0,1,2), gyroscope (3,4,5)
    └ n × [Conv1d(k, padding="same") → MaskedGroupNorm → ReLU]                 (B, conv_channels[-1], T)
    └ MaxPool1d(pool_kernel, ceil_mode=True); mask pooled alike                (B, C', T' = ceil(T / 5))
    └ MaskedGroupNorm
    └ GRU over time: input (B, T', C') batch_first                             (B, T', H · directions)
    └ mean over the valid time steps
    └ Dropout → Linear                                                          (B, embed_dim)

The GRU reads the **time axis** as its sequence and the channels as its features, so its weights do not depend
on the window length: 2 s, 5 s, 10 s or 999 samples all work with the same model. (The original IMU2CLIP code
ran its GRU over the channel axis, which tied the model to 1000-sample windows.)

Masked samples (``mask == False``, e.g. the loader's ``imu_mask`` in a gap) are set to 0 on input and after every
block, are left out of every normalisation's statistics and of the final pooling, so their values never reach
the output.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class IMUEncoderConfig:
    """Hyper-parameters of :class:`IMUEncoder` (immutable; JSON round-trip with ``to_dict``/``from_dict``).

    Attributes:
        in_channels: IMU channels C of the input ``(B, C, T)`` (6 = accelerometer xyz + gyroscope xyz).
        groups: channel indices normalised together by the input GroupNorm, one tuple per sensor; they must
            partition ``range(in_channels)``. ``None``: one group holding every channel.
        conv_channels: output channels of each Conv1d block; its length is the number of blocks.
        kernel_sizes: kernel size (samples) of each Conv1d block, same length as ``conv_channels``.
        norm_groups: GroupNorm groups inside the conv blocks and after the pooling (divides every conv width).
        pool_kernel: MaxPool1d kernel and stride (samples); the GRU sees ``ceil(T / pool_kernel)`` steps.
        gru_hidden: GRU hidden size per direction.
        gru_layers: stacked GRU layers.
        bidirectional: a bidirectional GRU (output width ``2 * gru_hidden``).
        embed_dim: output embedding size (512 for ViT-B-32's CLIP space).
        dropout: dropout between GRU layers and before the projection.
    """

    in_channels: int = 6
    groups: tuple[tuple[int, ...], ...] | None = ((0, 1, 2), (3, 4, 5))
    conv_channels: tuple[int, ...] = (64, 128, 128)
    kernel_sizes: tuple[int, ...] = (5, 5, 5)
    norm_groups: int = 8
    pool_kernel: int = 5
    gru_hidden: int = 256
    gru_layers: int = 2
    bidirectional: bool = True
    embed_dim: int = 512
    dropout: float = 0.1

    def __post_init__(self) -> None:
        groups = None if self.groups is None else tuple(tuple(int(c) for c in g) for g in self.groups)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        object.__setattr__(self, "kernel_sizes", tuple(int(k) for k in self.kernel_sizes))
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        flat = sorted(c for g in self.channel_groups for c in g)
        if flat != list(range(self.in_channels)) or any(len(g) == 0 for g in self.channel_groups):
            raise ValueError(f"groups {self.groups} must partition the channels 0..{self.in_channels - 1} "
                             "(each channel in exactly one non-empty group)")
        if not self.conv_channels or len(self.conv_channels) != len(self.kernel_sizes):
            raise ValueError(f"conv_channels {self.conv_channels} and kernel_sizes {self.kernel_sizes} must be "
                             "non-empty and of the same length (one entry per conv block)")
        bad = [c for c in self.conv_channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"norm_groups={self.norm_groups} must divide every conv width; it does not divide {bad}")
        if min(self.kernel_sizes) < 1 or self.pool_kernel < 1:
            raise ValueError("kernel sizes and pool_kernel must be >= 1")
        if self.gru_hidden < 1 or self.gru_layers < 1 or self.embed_dim < 1:
            raise ValueError("gru_hidden, gru_layers and embed_dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def channel_groups(self) -> tuple[tuple[int, ...], ...]:
        """The input normalisation groups, ``groups`` or one group of all channels."""
        return self.groups if self.groups is not None else (tuple(range(self.in_channels)),)

    @property
    def n_blocks(self) -> int:
        """Number of Conv1d blocks."""
        return len(self.conv_channels)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
        d["groups"] = None if self.groups is None else [list(g) for g in self.groups]
        d["conv_channels"] = list(self.conv_channels)
        d["kernel_sizes"] = list(self.kernel_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IMUEncoderConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they would be silently ignored otherwise)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown IMUEncoderConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)


class MaskedGroupNorm(nn.Module):
    """GroupNorm over channel groups with statistics taken over valid time steps only.

    Each group's mean and variance are computed over (its channels × the valid steps of one sample); every
    channel then gets its own affine ``weight``/``bias`` as in ``nn.GroupNorm``. Groups may be any partition of
    the channels (not only contiguous equal blocks). Input ``x (B, C, T)``, ``mask (B, 1, T)`` float (1 valid,
    0 masked) or None; output ``(B, C, T)``, with masked steps set to 0.
    """

    def __init__(self, groups: Sequence[Sequence[int]], num_channels: int, eps: float = 1e-5):
        super().__init__()
        assign = torch.zeros(num_channels, len(groups))
        for g, chans in enumerate(groups):
            assign[list(chans), g] = 1.0
        self.register_buffer("assign", assign, persistent=False)  # (C, G) one-hot channel → group
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    @classmethod
    def contiguous(cls, num_groups: int, num_channels: int, eps: float = 1e-5) -> "MaskedGroupNorm":
        """``num_groups`` contiguous groups of ``num_channels // num_groups`` channels (like ``nn.GroupNorm``)."""
        size = num_channels // num_groups
        return cls([range(g * size, (g + 1) * size) for g in range(num_groups)], num_channels, eps)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # statistics in float32 even under autocast (as torch's own group_norm): float16 sums of squares overflow
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        with torch.autocast(x.device.type, enabled=False):
            return self._normalise(x, None if mask is None else mask.to(x.dtype))

    def _normalise(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if mask is None:
            mask = x.new_ones(x.shape[0], 1, x.shape[2])
        a = self.assign.to(x.dtype)
        count = mask.sum(-1) * a.sum(0)                        # (B, G) valid values per group
        count = count.clamp_min(1.0)
        mean_g = (x * mask).sum(-1) @ a / count               # (B, G)
        mean_c = (mean_g @ a.T).unsqueeze(-1)                  # (B, C, 1)
        centred = (x - mean_c) * mask
        var_g = (centred * centred).sum(-1) @ a / count        # (B, G), biased like nn.GroupNorm
        inv_c = torch.rsqrt(var_g + self.eps) @ a.T            # (B, C)
        y = centred * inv_c.unsqueeze(-1)
        return (y * self.weight.to(x.dtype)[:, None] + self.bias.to(x.dtype)[:, None]) * mask


class ConvBlock(nn.Module):
    """Conv1d (stride 1, ``padding="same"``) → MaskedGroupNorm → ReLU; masked steps zeroed. ``(B, Cin, T) → (B, Cout, T)``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, norm_groups: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, padding="same")
        self.norm = MaskedGroupNorm.contiguous(norm_groups, c_out)
        self.act = nn.ReLU()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x), mask)) * mask


class IMUEncoder(nn.Module):
    """IMU window → CLIP-space embedding (see the module docstring for the architecture).

    ``forward(x (B, C, T) float, mask (B, T) bool | None) -> (B, embed_dim)``; any ``T >= 1``.
    """

    def __init__(self, config: IMUEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or IMUEncoderConfig()
        self.in_norm = MaskedGroupNorm(config.channel_groups, config.in_channels)
        widths = (config.in_channels, *config.conv_channels)
        self.blocks = nn.ModuleList(
            ConvBlock(widths[i], widths[i + 1], config.kernel_sizes[i], config.norm_groups)
            for i in range(config.n_blocks))
        self.pool = nn.MaxPool1d(config.pool_kernel, ceil_mode=True)
        self.post_norm = MaskedGroupNorm.contiguous(config.norm_groups, config.conv_channels[-1])
        self.gru = nn.GRU(input_size=config.conv_channels[-1], hidden_size=config.gru_hidden,
                          num_layers=config.gru_layers, batch_first=True, bidirectional=config.bidirectional,
                          dropout=config.dropout if config.gru_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        gru_out = config.gru_hidden * (2 if config.bidirectional else 1)
        self.proj = nn.Linear(gru_out, config.embed_dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, normalize: bool = False) -> Tensor:
        """Embed IMU windows.

        Args:
            x: ``(B, C, T)`` float, C = ``config.in_channels`` (the loader's ``batch["imu"]``, SI units).
            mask: ``(B, T)`` bool, True where the sample is valid (the loader's ``batch["imu_mask"]``); None: all valid.
            normalize: L2-normalise the output (what the contrastive loss expects).

        Returns:
            ``(B, embed_dim)`` float. A window with no valid sample embeds to ``proj.bias``.
        """
        if x.ndim != 3 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected x of shape (B, {self.config.in_channels}, T), got {tuple(x.shape)}")
        B, _, T = x.shape
        if mask is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        else:
            if mask.shape != (B, T):
                raise ValueError(f"mask must have shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")
            valid = mask.to(device=x.device, dtype=torch.bool)
        valid = valid.unsqueeze(1)                                       # (B, 1, T)
        m = valid.to(x.dtype)
        h = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))  # NaN-safe zeroing
        h = self.in_norm(h, m)
        for block in self.blocks:
            h = block(h, m)
        # max-pool over valid steps only; a pooled step is valid when any of its inputs is
        h = self.pool(h.masked_fill(~valid, torch.finfo(h.dtype).min))
        m = self.pool(m)                                                  # (B, 1, T')
        h = torch.where(m > 0, h, torch.zeros((), dtype=h.dtype, device=h.device))
        h = self.post_norm(h, m)
        out, _ = self.gru(h.transpose(1, 2))                              # time is the sequence: (B, T', H*dirs)
        w = m.transpose(1, 2)                                             # (B, T', 1)
        pooled = (out * w).sum(1) / w.sum(1).clamp_min(1.0)               # mean over valid steps
        z = self.proj(self.dropout(pooled))
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (all, or only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def downsampled_length(self, T: int) -> int:
        """Number of GRU steps for a window of ``T`` samples: ``ceil(T / pool_kernel)``."""
        return math.ceil(T / self.config.pool_kernel)


def save_encoder(model: IMUEncoder, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (weights) and ``config.json`` (config + format version) into ``directory``.

    Returns the directory. Files are written to a temporary name first and renamed, so a reader never sees a
    half-written file.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = d / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "class": "IMUEncoder"})
    tmp.replace(d / WEIGHTS_NAME)
    meta = {"class": "IMUEncoder", "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    tmp = d / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(d / CONFIG_NAME)
    return d


def load_encoder(directory: str | Path, device: str | torch.device = "cpu") -> IMUEncoder:
    """Rebuild an :class:`IMUEncoder` saved by :func:`save_encoder` (strict: every weight must match)."""
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: not an IMU encoder saved by save_encoder()")
    meta = json.loads(cfg_path.read_text())
    if meta.get("class") != "IMUEncoder" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: expected class IMUEncoder, format_version {FORMAT_VERSION}; "
                         f"found class {meta.get('class')!r}, format_version {meta.get('format_version')!r}")
    model = IMUEncoder(IMUEncoderConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(w_path), device="cpu"), strict=True)
    return model.to(device).eval()

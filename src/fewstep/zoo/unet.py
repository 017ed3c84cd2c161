"""fewstep's small UNet: the network behind every bundled diffusion model.

A DDPM-style UNet (Ho et al. 2020, appendix B) cut down to fit a CPU:

* residual blocks ``GroupNorm -> SiLU -> Conv3x3`` twice, with the time (and class) embedding added
  between the two convolutions, and a 1x1 convolution on the skip path when the width changes;
* down-sampling by a strided 3x3 convolution, up-sampling by nearest-neighbour doubling followed by a
  3x3 convolution;
* optional single-head self-attention at the lowest resolution (1x1 convolutions for q, k, v);
* a sinusoidal embedding of the float timestep index (Vaswani et al. 2017, as in DDPM);
* an optional class embedding with one extra "null" class for classifier-free guidance
  (Ho & Salimans 2022): label ``num_classes`` means "no label".

Only standard ``torch.nn`` modules are used (``Conv2d``, ``GroupNorm``, ``Linear``, ``Embedding``,
``SiLU``), so tools that rewrite convolutions (spatially sparse inference) can convert it module by
module.

Example::

    >>> import torch
    >>> from fewstep.zoo.unet import UNet, UNetConfig
    >>> net = UNet(UNetConfig(in_channels=1, base_channels=8, channel_mult=(1, 2), num_classes=10))
    >>> net(torch.zeros(2, 1, 16, 16), torch.tensor([10.0, 500.0]), label=torch.tensor([3, 10])).shape
    torch.Size([2, 1, 16, 16])
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

__all__ = ["UNetConfig", "UNet", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet` (stored verbatim in each bundled model's json).

    Args:
        in_channels: image channels (1 for digits, 3 for RGB).
        base_channels: width at full resolution; level ``i`` has ``base_channels * channel_mult[i]``.
        channel_mult: one entry per resolution level; each level after the first halves the size.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more, as DDPM).
        attention_levels: indices of the levels that end with self-attention (the middle always has
            one when this is non-empty).
        num_classes: number of class labels, or 0 for an unconditional model. A conditional model
            also accepts ``label == num_classes``: the null label used for guidance.
        groups: GroupNorm groups (reduced automatically for narrow layers so it divides the width).
        min_group_channels: fewer groups where a layer is narrow, so each group has at least this many
            channels. A group of ONE channel (instance norm) subtracts the per-channel constant that
            the time/class embedding adds just before it, so the block cannot see time or label;
            the 4-wide ``digits16-s`` uses 4 (one group), the others were trained with 1.
        dropout: dropout inside residual blocks during training.
        skip_betas: ``(beta_start, beta_end, num_timesteps)`` of a linear beta table, or ``()``. When
            set, the output is ``sigma_t * x + F(x, t)``: the network learns only the residual
            from the noise prediction that is optimal for unit-variance Gaussian data (EDM's
            ``c_skip`` preconditioning, Karras et al. 2022, Table 1, with sigma_data = 1, written
            for eps prediction). Near pure noise the eps target is almost ``x`` itself; a plain
            network must reproduce it to ~1e-3, because few-step samplers turn eps errors into
            data errors multiplied by ``sigma/alpha`` (157 at t = 999 of DDPM's table). With the
            skip the output also scales with ``x``, which GroupNorm would otherwise hide, so a
            trajectory that drifts is pulled back instead of running away.
    """

    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple = ()
    num_classes: int = 0
    groups: int = 8
    min_group_channels: int = 1
    dropout: float = 0.0
    skip_betas: tuple = ()

    def __post_init__(self):
        # json round trips give lists; keep tuples so configs compare equal and hash
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(int(a) for a in self.attention_levels))
        object.__setattr__(self, "skip_betas", tuple(float(b) for b in self.skip_betas))
        if self.skip_betas and (len(self.skip_betas) != 3 or not 0 < self.skip_betas[0] < self.skip_betas[1] < 1
                                or self.skip_betas[2] < 2 or self.skip_betas[2] != int(self.skip_betas[2])):
            raise ValueError(
                f"skip_betas: expected (beta_start, beta_end, num_timesteps) with 0 < start < end < 1, got {self.skip_betas!r}"
            )
        for name in ("in_channels", "base_channels", "num_res_blocks", "groups", "min_group_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult: expected positive integers, got {self.channel_mult!r}")
        if any(not 0 <= a < len(self.channel_mult) for a in self.attention_levels):
            raise ValueError(
                f"attention_levels: each must be a level index in [0, {len(self.channel_mult) - 1}], "
                f"got {self.attention_levels!r}"
            )
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes: expected an integer >= 0, got {self.num_classes!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        d["skip_betas"] = list(self.skip_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"architecture: unknown UNet settings {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, ``(batch,) -> (batch, dim)`` (DDPM, Transformer)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def _norm(channels: int, groups: int, min_group_channels: int = 1) -> nn.GroupNorm:
    g = math.gcd(channels, max(1, min(groups, channels // min_group_channels)))  # narrow layers: fewer groups
    return nn.GroupNorm(g, channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: tuple[int, int], dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch, *groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch, *groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        # The block starts as the identity on its skip path: deep stacks train stably from step one.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a (small) feature map."""

    def __init__(self, channels: int, groups: tuple[int, int]):
        super().__init__()
        self.norm = _norm(channels, *groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """A residual block optionally followed by self-attention (one entry of the UNet's ladder)."""

    def __init__(self, in_ch, out_ch, emb_dim, groups, dropout, attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, groups, dropout)
        self.attn = SelfAttention(out_ch, groups) if attention else None

    def forward(self, x, emb):
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """``net(x, model_time, label=None) -> eps`` for images whose side is divisible by ``2**(levels-1)``.

    ``model_time`` is a 1-D tensor of float timestep indices (one per sample). ``label`` is a 1-D
    integer tensor (or a Python int for the whole batch); ``None`` means the null label. An
    unconditional model (``num_classes == 0``) rejects labels.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config: expected a UNetConfig, got {type(config).__name__}")
        self.config = config
        c = config
        ch0 = c.base_channels
        emb_dim = 4 * ch0
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes > 0 else None
        self.conv_in = nn.Conv2d(c.in_channels, ch0, 3, padding=1)

        norm_groups = (c.groups, c.min_group_channels)
        widths = [ch0 * m for m in c.channel_mult]
        self.down = nn.ModuleList()
        skip_widths = [ch0]
        ch = ch0
        for level, width in enumerate(widths):
            for _ in range(c.num_res_blocks):
                self.down.append(_Stage(ch, width, emb_dim, norm_groups, c.dropout, level in c.attention_levels))
                ch = width
                skip_widths.append(ch)
            if level != len(widths) - 1:
                self.down.append(Downsample(ch))
                skip_widths.append(ch)

        self.mid1 = _Stage(ch, ch, emb_dim, norm_groups, c.dropout, bool(c.attention_levels))
        self.mid2 = ResBlock(ch, ch, emb_dim, norm_groups, c.dropout)

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            for _ in range(c.num_res_blocks + 1):
                self.up.append(
                    _Stage(ch + skip_widths.pop(), width, emb_dim, norm_groups, c.dropout, level in c.attention_levels)
                )
                ch = width
            if level != 0:
                self.up.append(Upsample(ch))

        self.norm_out = _norm(ch, *norm_groups)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if c.skip_betas:
            start, end, n = c.skip_betas
            betas = torch.linspace(start, end, int(n), dtype=torch.float64)
            # derived from the config, so not stored in weight files
            self.register_buffer("skip_log_alpha", (0.5 * torch.cumsum(torch.log1p(-betas), 0)).float(), persistent=False)
        else:
            self.skip_log_alpha = None

    def skip_sigma(self, model_time: torch.Tensor) -> torch.Tensor:
        """sigma(t) of the skip's table at float timesteps, log-alpha interpolated linearly as DiscreteVP does."""
        table = self.skip_log_alpha
        t = model_time.to(table.dtype).clamp(0, table.numel() - 1)
        lo = t.floor().long().clamp(max=table.numel() - 2)
        w = t - lo.to(t.dtype)
        log_alpha = table[lo] * (1 - w) + table[lo + 1] * w
        return torch.sqrt(-torch.expm1(2.0 * log_alpha))

    @property
    def null_label(self) -> int | None:
        """The label meaning "unconditional" (``num_classes``), or ``None`` for unconditional models."""
        return self.config.num_classes if self.config.num_classes > 0 else None

    def _embedding(self, model_time: torch.Tensor, label, batch: int, device) -> torch.Tensor:
        t = model_time.reshape(-1)
        if t.numel() == 1 and batch > 1:
            t = t.expand(batch)
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(self.conv_in.weight.dtype))
        if self.label_emb is None:
            if label is not None:
                raise ValueError("label: this model is unconditional (num_classes=0); call it without a label")
            return emb
        if label is None:
            label = self.config.num_classes
        if not isinstance(label, torch.Tensor):
            label = torch.tensor(label)
        label = label.to(device=device, dtype=torch.long).reshape(-1)
        if label.numel() == 1 and batch > 1:
            label = label.expand(batch)
        return emb + self.label_emb(label)

    def forward(self, x: torch.Tensor, model_time, label=None) -> torch.Tensor:
        if not isinstance(model_time, torch.Tensor):
            model_time = torch.tensor([float(model_time)])
        emb = self._embedding(model_time.to(x.device), label, x.shape[0], x.device)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb)
            skips.append(h)
        h = self.mid2(self.mid1(h, emb), emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.conv_out(self.act(self.norm_out(h)))
        if self.skip_log_alpha is not None:
            t = model_time.to(x.device).reshape(-1).expand(x.shape[0]) if model_time.numel() == 1 else model_time.to(x.device)
            out = out + self.skip_sigma(t).to(x.dtype)[:, None, None, None] * x
        return out


def flops_per_call(net: nn.Module, sample_shape, **cond) -> int:
    """Floating point operations of one call on ONE sample, counted by ``FlopCounterMode``.

    Counts matmuls and convolutions (2 per multiply-add), as torch's counter does; norms and
    activations are not counted (they are a few percent here).
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *sample_shape)
    t = torch.tensor([500.0])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t, **cond)
    return int(counter.get_total_flops())

"""Exact tiled encode/decode for large images: the same numbers as the untiled pass, less memory.

diffusers' ``enable_tiling()`` runs the whole network on overlapping tiles and blends them; each tile
normalises with its own GroupNorm statistics, so tiles disagree (seams, colour shifts). Here the
network is run layer by layer instead (diffusers ``Encoder``/``Decoder`` of ``autoencoders/vae.py``):

* every convolution is computed tile by tile, each tile reading a halo of real neighbour pixels
  (zero padding only at the image border, exactly as the untiled conv pads);
* every GroupNorm uses the statistics of the whole image, gathered over all tiles when its input is
  written: per tile and channel the mean and centred sum of squares (two-pass, so no cancellation),
  merged exactly in float64 across tiles and then channels into groups (Chan, Golub & LeVeque's
  pairwise update: the statistics of the union, not an average of per-tile variances);
* the mid-block attention is global over the latent, queries in chunks with
  ``scaled_dot_product_attention`` (memory efficient: no (N, N) matrix is ever stored).

The feature map between two GroupNorms is kept whole (one image at a time), so peak memory is a few
full-size maps of the widest full-resolution layer plus one tile's temporaries, instead of the many
full-size temporaries (norm, activation, conv outputs, conv workspaces) of the untiled pass.
Which mode a call runs (``auto``) is decided in ``memory_plan.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..model import downsample_factor, split_moments

DEFAULT_TILE = 512  # image pixels; a tile of the widest SD layer (256 ch) then needs ~1 GiB of temporaries
ATTENTION_CHUNK = 4096  # queries per scaled_dot_product_attention call

Box = tuple[int, int, int, int]  # rows [r0, r1), cols [c0, c1)


@dataclass
class FMap:
    """One image's feature map (1, C, H, W) and its per-channel float64 statistics for the next GroupNorm."""

    x: torch.Tensor
    scale: int  # image pixels per element
    count: int = 0  # elements per channel seen so far
    mean: torch.Tensor | None = None  # (C,) float64
    m2: torch.Tensor | None = None  # (C,) float64, sum of squared deviations from ``mean``


# ----------------------------------------------------------------------------- tile machinery


def _tiles(h: int, w: int, t: int) -> list[Box]:
    return [(r, min(r + t, h), c, min(c + t, w)) for r in range(0, h, t) for c in range(0, w, t)]


def _window(x: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], pre: Callable | None, up: int) -> torch.Tensor:
    """``pre(x)`` (pointwise), nearest-upsampled ``up``x, on rows/cols that may leave the map: zeros outside.

    The zeros stand in for the conv's own zero padding (applied after norm and activation), so a tile
    border reads real neighbours and only the image border is padded.
    """
    h, w = x.shape[-2] * up, x.shape[-1] * up
    (u0, u1), (v0, v1) = rows, cols
    a0, a1, b0, b1 = max(u0, 0), min(u1, h), max(v0, 0), min(v1, w)
    t = x[..., a0 // up : -(-a1 // up), b0 // up : -(-b1 // up)]
    if pre is not None:
        t = pre(t)
    if up > 1:  # diffusers Upsample2D: F.interpolate(scale_factor=2, mode="nearest"); commutes with pointwise pre
        t = F.interpolate(t, scale_factor=float(up), mode="nearest")
        oa, ob = a0 - up * (a0 // up), b0 - up * (b0 // up)
        t = t[..., oa : oa + a1 - a0, ob : ob + b1 - b0]
    if (a0, a1, b0, b1) != (u0, u1, v0, v1):
        t = F.pad(t, (b0 - v0, v1 - b1, a0 - u0, u1 - a1))
    return t


def _conv_out_size(n: int, conv: nn.Conv2d, extra: int, up: int) -> int:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return (n * up + 2 * p + extra - k) // s + 1


def _conv_tile(x: torch.Tensor, conv: nn.Conv2d, box: Box, pre: Callable | None = None, up: int = 1) -> torch.Tensor:
    """Output tile ``box`` of ``conv(upsample(pre(x)))``, exact: output o reads inputs o*s - p + [0, k)."""
    r0, r1, c0, c1 = box
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    if (sh, sw) == (1, 1) and (kh, kw) == (2 * ph + 1, 2 * pw + 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros":
        # 'same' conv: read the halo that exists, let the conv zero-pad, crop outputs next to a tile
        # border (they saw zeros instead of neighbours); the image border's zeros are the true padding
        h, w = x.shape[-2] * up, x.shape[-1] * up
        a0, b0 = max(r0 - ph, 0), max(c0 - pw, 0)
        t = _window(x, (a0, min(r1 + ph, h)), (b0, min(c1 + pw, w)), pre, up)
        y = conv(t)  # the module itself (its padding is (ph, pw)): keeps a patched forward, e.g. fastconv
        return y[..., r0 - a0 : r1 - a0, c0 - b0 : c1 - b0]
    rows = (r0 * sh - ph, (r1 - 1) * sh - ph + kh)
    cols = (c0 * sw - pw, (c1 - 1) * sw - pw + kw)
    t = _window(x, rows, cols, pre, up)
    return F.conv2d(t, conv.weight, conv.bias, stride=conv.stride, padding=0, dilation=conv.dilation, groups=conv.groups)


def _merge(n_a: int, mean_a: torch.Tensor, m2_a: torch.Tensor, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor):
    """Statistics of the union of two sets (Chan et al. 1979): exact, stable in float64."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def _accumulate(fm: FMap, y: torch.Tensor) -> None:
    """Add tile ``y`` (1, C, h, w) to ``fm``'s per-channel statistics."""
    y = y.float() if y.element_size() < 4 else y  # fp16/bf16 sums would lose precision or overflow
    m = y.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
    d = y - m
    m2 = d.square_().sum(dim=(0, 2, 3)).double()  # centred first: no E[x^2] - E[x]^2 cancellation
    n, m = y[0, 0].numel(), m.flatten().double()
    if fm.mean is None:
        fm.count, fm.mean, fm.m2 = n, m, m2
    else:
        fm.count, fm.mean, fm.m2 = _merge(fm.count, fm.mean, fm.m2, n, m, m2)


def group_norm_affine(norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor, channels: int, dtype: torch.dtype):
    """``norm`` with given statistics as a per-channel map ``x * scale + shift``: (scale, shift), (C,) each.

    ``mean``/``var``: per-group mean and biased variance (G,), float64; the affine is folded in float64.
    """
    per = channels // norm.num_groups
    rstd = (var + norm.eps).rsqrt().repeat_interleave(per)  # (C,)
    mean = mean.repeat_interleave(per)
    weight = norm.weight.double() if norm.affine else torch.ones_like(rstd)
    bias = norm.bias.double() if norm.affine else torch.zeros_like(rstd)
    return (weight * rstd).to(dtype), (bias - mean * weight * rstd).to(dtype)


def _norm_act(fm: FMap, norm: nn.GroupNorm | None, act: nn.Module | None) -> Callable | None:
    """Pointwise ``act(GroupNorm(x))`` with the whole map's statistics (float64 sums -> group mean/var)."""
    if norm is None:
        return act
    if not isinstance(norm, nn.GroupNorm):
        raise NotImplementedError(f"tiling: {type(norm).__name__} is not supported (GroupNorm only); use tiling='never'")
    c, g = fm.x.shape[1], norm.num_groups
    if fm.count != fm.x[0, 0].numel():
        raise RuntimeError("tiling: statistics do not cover the whole feature map (internal error)")
    cm, cm2 = fm.mean.view(g, -1), fm.m2.view(g, -1)  # (G, C/G): a group is C/G consecutive channels
    mean = cm.mean(1)  # (G,), channels have equal counts
    m2 = cm2.sum(1) + fm.count * ((cm - mean[:, None]) ** 2).sum(1)
    var = m2 / (fm.count * (c // g))  # biased, as GroupNorm
    scale, shift = group_norm_affine(norm, mean, var, c, fm.x.dtype)
    scale, shift = scale.view(1, c, 1, 1), shift.view(1, c, 1, 1)
    if act is None:
        return lambda t: torch.addcmul(shift, t, scale)
    if isinstance(act, nn.SiLU):
        return lambda t: F.silu(torch.addcmul(shift, t, scale), inplace=True)
    return lambda t: act(torch.addcmul(shift, t, scale))


def _conv_layer(
    fm: FMap,
    conv: nn.Conv2d,
    tile: int,
    *,
    pre: Callable | None = None,
    up: int = 1,
    extra: int = 0,
    post: Callable | None = None,
    out: torch.Tensor | None = None,
    stats: bool = True,
) -> FMap:
    """``post(conv(upsample(pre(x))), box)`` tile by tile into ``out`` (new, or given: may be ``x`` itself).

    When ``out`` is ``x`` (a same-size conv overwriting its own input, saving a full-size map), a row
    of tiles is written only after the next row is computed: its halo rows are read until then.
    """
    x = fm.x
    ho, wo = _conv_out_size(x.shape[-2], conv, extra, up), _conv_out_size(x.shape[-1], conv, extra, up)
    s = fm.scale * x.shape[-2] // ho
    t = max(tile // s, 8)
    if out is None:
        out = x.new_empty(x.shape[0], conv.out_channels, ho, wo)
    elif out is x and not (up == 1 and conv.stride == (1, 1) and conv.padding[0] <= t and (ho, wo) == x.shape[-2:]):
        raise ValueError("tiling: only a same-size conv may overwrite its input (internal error)")
    res = FMap(out, s)
    pending: list[tuple[Box, torch.Tensor]] = []  # the previous row of tiles, when writing in place
    for box in _tiles(ho, wo, t):
        if out is x and box[2] == 0:  # a new row of tiles: the row before the previous one is safe to write
            done = [(b, y) for b, y in pending if b[1] <= box[0] - t]
            pending = [(b, y) for b, y in pending if b[1] > box[0] - t]
            for b, y in done:
                out[..., b[0] : b[1], b[2] : b[3]] = y
        y = _conv_tile(x, conv, box, pre, up)
        if post is not None:
            y = post(y, box)
        if stats:
            _accumulate(res, y)
        if out is x:
            pending.append((box, y))
        else:
            out[..., box[0] : box[1], box[2] : box[3]] = y
    for b, y in pending:
        out[..., b[0] : b[1], b[2] : b[3]] = y
    return res


# ----------------------------------------------------------------------------- blocks


def _resnet(fm: FMap, rn: nn.Module, tile: int) -> FMap:
    """diffusers ResnetBlock2D (temb None): (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))) / osf."""
    if rn.upsample is not None or rn.downsample is not None or getattr(rn, "time_emb_proj", None) is not None:
        raise NotImplementedError("tiling: ResnetBlock2D with up/downsample or time embedding; use tiling='never'")
    h = _conv_layer(fm, rn.conv1, tile, pre=_norm_act(fm, rn.norm1, rn.nonlinearity))
    x, sc, osf = fm.x, rn.conv_shortcut, rn.output_scale_factor

    def post(y: torch.Tensor, box: Box) -> torch.Tensor:
        r0, r1, c0, c1 = box
        skip = x[..., r0:r1, c0:c1] if sc is None else _conv_tile(x, sc, box)
        return y.add_(skip) if osf == 1 else (skip + y) / osf  # x + 0 == x/1 bit for bit

    # in place, so a resnet holds two full-size maps: into x when the shapes match (conv2 reads h with
    # halo, x only at the tile itself), else into h (rows of tiles written late, see _conv_layer)
    same = sc is None and rn.conv2.out_channels == x.shape[1]
    res = _conv_layer(h, rn.conv2, tile, pre=_norm_act(h, rn.norm2, rn.nonlinearity), post=post, out=x if same else h.x)
    res.scale = fm.scale
    return res


def _attention(fm: FMap, attn: nn.Module) -> FMap:
    """diffusers Attention (AttnProcessor2_0, the VAE mid-block's): global over all tokens, queries chunked."""
    if attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
        raise NotImplementedError("tiling: attention with spatial/qk norm is not supported; use tiling='never'")
    x = fm.x  # (1, C, h, w)
    b, c, hh, ww = x.shape
    n, heads = hh * ww, attn.heads
    pre = _norm_act(fm, attn.group_norm, None)
    chunk = ATTENTION_CHUNK
    flat = x.view(b, c, n)

    def tokens(i: int, j: int) -> torch.Tensor:  # normalised tokens i..j, (1, j-i, C)
        t = flat[:, :, i:j]
        return (pre(t[..., None])[..., 0] if pre is not None else t).transpose(1, 2)

    d = attn.to_k.out_features // heads
    k = x.new_empty(b, heads, n, d)
    v = x.new_empty(b, heads, n, attn.to_v.out_features // heads)
    for i in range(0, n, chunk):
        t = tokens(i, min(i + chunk, n))
        k[:, :, i : i + t.shape[1]] = attn.to_k(t).view(b, -1, heads, d).transpose(1, 2)
        v[:, :, i : i + t.shape[1]] = attn.to_v(t).view(b, -1, heads, v.shape[-1]).transpose(1, 2)
    res = FMap(x, fm.scale)  # written in place: k and v hold everything later queries need
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        q = attn.to_q(tokens(i, j)).view(b, -1, heads, d).transpose(1, 2)  # (1, heads, j-i, d)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        o = attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, j - i, -1)))  # (1, j-i, C)
        o = o.transpose(1, 2)
        if attn.residual_connection:
            o = o + flat[:, :, i:j]
        o = o / attn.rescale_output_factor
        _accumulate(res, o[..., None])
        flat[:, :, i:j] = o
    return res


def _mid(fm: FMap, mid: nn.Module, tile: int) -> FMap:
    fm = _resnet(fm, mid.resnets[0], tile)
    for attn, rn in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            fm = _attention(fm, attn)
        fm = _resnet(fm, rn, tile)
    return fm


def _check(module: nn.Module, names: tuple[str, ...]) -> None:
    for sub in module.modules():
        kind = type(sub).__name__
        if kind.endswith(("Block2D", "Encoder", "Decoder")) and kind not in names:
            raise NotImplementedError(f"tiling: {kind} is not supported by exact tiling; use tiling='never'")


def _check_tile(tile_size: int, f: int) -> int:
    if not isinstance(tile_size, int) or tile_size <= 0 or tile_size % f:
        raise InputError(f"tile_size={tile_size!r}: must be a positive multiple of {f} image pixels")
    return tile_size


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False, disable=None)


# ----------------------------------------------------------------------------- encode / decode


@torch.no_grad()
def tiled_encode_moments(vae: nn.Module, x: torch.Tensor, tile_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact tiled ``vae.encode``: images (B, 3, H, W) in [-1, 1], H and W multiples of 8 ->
    raw posterior (mean, logvar), each (B, C, H/8, W/8) float32, logvar clamped to [-30, 20] as diffusers.

    Equals ``vae.quant_conv(vae.encoder(x))`` up to float rounding; ``tile_size`` in image pixels.
    """
    enc = vae.encoder
    _check(enc, ("Encoder", "DownEncoderBlock2D", "UNetMidBlock2D", "ResnetBlock2D", "Downsample2D"))
    f = downsample_factor(vae)
    tile = _check_tile(tile_size or DEFAULT_TILE, f)
    quant = vae.quant_conv
    outs = []
    for i in range(x.shape[0]):  # one image at a time: GroupNorm statistics are per image
        bar = _progress(sum(len(b.resnets) for b in enc.down_blocks) + 1, "tiled encode")
        fm = FMap(x[i : i + 1], 1)
        fm = _conv_layer(fm, enc.conv_in, tile)
        for block in enc.down_blocks:
            for rn in block.resnets:
                fm = _resnet(fm, rn, tile)
                bar.update(1)
            for ds in block.downsamplers or []:
                # Downsample2D(padding=0): F.pad (0, 1, 0, 1) then stride-2 conv: the extra zero row/col
                if ds.norm is not None or not ds.use_conv:
                    raise NotImplementedError("tiling: only conv Downsample2D without norm is supported; use tiling='never'")
                fm = _conv_layer(fm, ds.conv, tile, extra=1 if ds.padding == 0 else 0)
        fm = _mid(fm, enc.mid_block, tile)
        bar.update(1)

        def post(y: torch.Tensor, box: Box) -> torch.Tensor:
            return quant(y) if quant is not None else y  # 1x1 conv: pointwise

        fm = _conv_layer(fm, enc.conv_out, tile, pre=_norm_act(fm, enc.conv_norm_out, enc.conv_act), post=post, stats=False)
        outs.append(fm.x.float())
        bar.close()
    return split_moments(torch.cat(outs))  # (B, C, h, w) each


@torch.no_grad()
def tiled_decode(vae: nn.Module, z: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
    """Exact tiled ``vae.decode``: raw latents (B, C, h, w) -> images (B, 3, 8h, 8w), model dtype, not clamped.

    Equals ``vae.decoder(vae.post_quant_conv(z))`` up to float rounding; ``tile_size`` in image pixels.
    """
    dec = vae.decoder
    _check(dec, ("Decoder", "UpDecoderBlock2D", "UNetMidBlock2D", "ResnetBlock2D", "Upsample2D"))
    f = downsample_factor(vae)
    tile = _check_tile(tile_size or DEFAULT_TILE, f)
    pq = vae.post_quant_conv
    out = None
    for i in range(z.shape[0]):
        bar = _progress(sum(len(b.resnets) for b in dec.up_blocks) + 1, "tiled decode")
        fm = FMap(z[i : i + 1], f)
        fm = _conv_layer(fm, dec.conv_in, tile, pre=pq)  # post_quant_conv is 1x1: pointwise, before the zero pad
        fm = _mid(fm, dec.mid_block, tile)
        bar.update(1)
        for block in dec.up_blocks:
            for rn in block.resnets:
                fm = _resnet(fm, rn, tile)
                bar.update(1)
            for us in block.upsamplers or []:
                if not us.use_conv or us.use_conv_transpose or not us.interpolate or us.norm is not None:
                    raise NotImplementedError("tiling: only nearest-2x + conv Upsample2D is supported; use tiling='never'")
                fm = _conv_layer(fm, us.conv if us.name == "conv" else us.Conv2d_0, tile, up=2)
        pre = _norm_act(fm, dec.conv_norm_out, dec.conv_act)
        if out is None:
            out = fm.x.new_empty(z.shape[0], dec.conv_out.out_channels, fm.x.shape[-2], fm.x.shape[-1])
        _conv_layer(fm, dec.conv_out, tile, pre=pre, out=out[i : i + 1], stats=False)
        bar.close()
    return out

"""Sums of ``x x^T`` over a layer's input rows (a Linear layer's input vectors, a convolution's im2col
patches): the statistic behind the reconstruction curvature G of :mod:`camphive.curvature.reconstruction`.

They are taken over every calibration image in every pruning cycle, so at ImageNet sizes their
cost counts; this module is about speed, without changing what is computed:

* Products in float32 (the input's precision, at least float32), each product summing at most
  ``ROW_CHUNK`` rows, the partial sums added in float64 (or the requested ``dtype``). Float64
  inputs keep float64 products.
* Ungrouped stride-1 convolutions (most of a ResNet's work) never form their patches. Entry
  ``((j, a, b), (i, a + da, b + db))`` of the sum is ``sum x[j, u, v] x[i, u + da, v + db]``
  (offsets in units of the dilation) over the window ``[a, a + out_h) x [b, b + out_w)`` of tap
  ``(a, b)``. Over the whole input instead of a window, the sums for every offset with ``da >= 0``
  are the weight gradient of one ``kh x (2 kw - 1)`` convolution whose output gradient is the input
  itself: one call to the convolution library, ~15/9 of the layer's forward cost for a 3x3 kernel
  where the patches' ``X^T X`` costs 81/9. Each tap's window leaves out a few border lines (rows or
  columns; zero padding aside): their sums are subtracted, and those of the pixels where left-out
  rows and columns cross added back. Offsets with ``da < 0`` are transposes. The pieces are summed
  over batches and assembled into G once, in :meth:`GramSums.total`; the diagonal is summed
  directly, so it is exact and never negative.
* Other convolutions form at most ``PATCH_CHUNK`` patch entries at a time.

Accuracy against float64 (tests): entries within ~1e-6 of ``sqrt(S_ii S_jj)``, S the sums over the
whole input (not the window); entries of inputs that are nearly zero inside their window but not at
its border can carry that absolute error, which the damping of every solve covers. Inputs exactly
zero in their window get exactly zero rows and columns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROW_CHUNK = 65536  # input rows per float32 product sum: bounds its rounding error
PATCH_CHUNK = 2**24  # im2col entries formed at a time (64 MiB in float32)


class GramSums:
    """``sum x x^T`` over the input rows of ``layer``, batch after batch: :meth:`add` each batch's
    inputs, then :meth:`total` is ``(groups, fan_in, fan_in)`` in ``dtype``, ordered like the columns
    of ``layer.weight.reshape(out, -1)``; ``rows`` counts the rows summed."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype = torch.float64) -> None:
        self.layer, self.dtype, self.rows = layer, dtype, 0
        self.parts: dict[tuple, dict[str, torch.Tensor]] = {}  # per padded input size (H, W); () if unused
        is_conv = isinstance(layer, (nn.Conv1d, nn.Conv2d))
        self.shifted = is_conv and layer.groups == 1 and all(step == 1 for step in layer.stride)

    def add(self, inputs: torch.Tensor) -> None:
        """Add one batch of the layer's inputs: ``(N, ..., in_features)``, ``(N, C, L)`` or ``(N, C, H, W)``."""
        if isinstance(self.layer, nn.Linear):
            rows = inputs.reshape(-1, inputs.shape[-1])
            self.rows += rows.shape[0]
            for chunk in torch.split(rows, ROW_CHUNK):
                self._accumulate((), {"gram": _gram(chunk.unsqueeze(0))})
            return
        padded, kernel, stride, dilation = padded_2d(self.layer, inputs)
        out = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(padded.shape[2:], kernel, stride, dilation)]
        positions = max(1, out[0] * out[1])
        self.rows += positions * int(padded.shape[0])
        per_chunk = max(1, ROW_CHUNK // positions)
        if not self.shifted:
            per_chunk = max(1, min(per_chunk, PATCH_CHUNK // (positions * int(self.layer.weight[0].numel()))))
        size = tuple(padded.shape[2:]) if self.shifted else ()
        for chunk in torch.split(padded, per_chunk):
            if self.shifted:
                self._accumulate(size, _shifted_pieces(chunk, kernel, dilation, _zero_border(self.layer)))
            else:
                self._accumulate(size, {"gram": _unfolded_gram(chunk, self.layer.groups, kernel, stride, dilation)})

    def _accumulate(self, size: tuple, pieces: dict[str, torch.Tensor]) -> None:
        sums = self.parts.setdefault(size, {})
        for key, value in pieces.items():
            if key in sums:
                sums[key].add_(value.to(self.dtype))
            else:
                sums[key] = value.to(self.dtype)

    def total(self) -> torch.Tensor | None:
        """The sum so far, ``(groups, fan_in, fan_in)`` in ``dtype`` (None before any :meth:`add`)."""
        if not self.shifted:
            return self.parts[()]["gram"] if self.parts else None
        layer = self.layer
        kernel = layer.kernel_size if isinstance(layer, nn.Conv2d) else (1, *layer.kernel_size)
        dilation = layer.dilation if isinstance(layer, nn.Conv2d) else (1, *layer.dilation)
        total = None
        for size, sums in self.parts.items():  # one part per input size seen (usually one)
            lines = _left_out_lines(kernel, dilation, size, _zero_border(layer))
            gram = _assemble(sums, kernel, lines)
            total = gram if total is None else total.add_(gram)
        return total


def input_gram(layer: nn.Module, inputs: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, int]:
    """``(sum of x x^T over the layer's input rows, number of rows)`` for one batch; see :class:`GramSums`."""
    sums = GramSums(layer, dtype)
    sums.add(inputs)
    return sums.total(), sums.rows


def padded_2d(layer: nn.Module, inputs: torch.Tensor):
    """The input padded as the layer pads it, as a 2-D image (Conv1d: height 1), and the
    kernel, stride and dilation as pairs."""
    padding = list(layer._reversed_padding_repeated_twice)  # also right for padding="same"
    if any(padding):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        inputs = F.pad(inputs, padding, mode=mode)
    if isinstance(layer, nn.Conv1d):
        inputs = inputs.unsqueeze(-2)
        kernel, stride, dilation = (1, *layer.kernel_size), (1, *layer.stride), (1, *layer.dilation)
    else:
        kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    return inputs, kernel, stride, dilation


def _zero_border(layer: nn.Module) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)``: lines of the padded input known to be zero (zero padding)."""
    if layer.padding_mode != "zeros":
        return 0, 0, 0, 0
    left, right, *rest = layer._reversed_padding_repeated_twice
    top, bottom = rest if rest else (0, 0)
    return top, bottom, left, right


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """``X^T X`` per group of ``(groups, rows, fan_in)``, in the input's precision but at least float32."""
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    return rows.transpose(1, 2) @ rows


def _unfolded_gram(padded: torch.Tensor, groups: int, kernel, stride, dilation) -> torch.Tensor:
    """``X^T X`` per group over the im2col rows of a padded ``(N, C, H, W)`` input."""
    patches = F.unfold(padded, kernel, dilation=dilation, stride=stride)  # (N, C*kh*kw, L)
    patches = patches.reshape(patches.shape[0], groups, -1, patches.shape[-1]).permute(1, 0, 3, 2)
    return _gram(patches.reshape(groups, -1, patches.shape[-1]))


def _shifted_pieces(padded: torch.Tensor, kernel, dilation, zero_border) -> dict[str, torch.Tensor]:
    """The sums from which :func:`_assemble` builds ``X^T X`` of an ungrouped stride-1 convolution.

    ``padded``: ``(N, C, H, W)`` as the layer pads it. Returns, with ``T = (kh, 2kw - 1)`` offsets:
    ``full`` ``(C, C, *T)`` (whole input), ``per_row`` ``(rows, C, C, *T)`` and ``per_col``
    ``(cols, C, C, *T)`` (left-out lines), ``per_pixel`` ``(rows, cols, C, C, *T)`` (their
    crossings), ``diagonal`` ``(C, kh, kw)`` (sum of squares over each tap's window).
    """
    (kh, kw), (dh, dw) = kernel, dilation
    image = padded.to(torch.promote_types(padded.dtype, torch.float32))
    channels, height, width = image.shape[1:]
    top, bottom, left, right = zero_border
    bottom, right = height - bottom, width - right  # [top, bottom) x [left, right): where the input may be nonzero
    margin = dw * (kw - 1)  # zeros left, right and below keep every shifted window inside; zeros add nothing
    shifted = F.pad(image, (margin, margin, 0, dh * (kh - 1)))
    full = torch.nn.grad.conv2d_weight(
        shifted[..., top : bottom + dh * (kh - 1), left : right + 2 * margin], (channels, channels, kh, 2 * kw - 1),
        image[..., top:bottom, left:right], dilation=(dh, dw))
    (rows, _), (cols, _) = _left_out_lines(kernel, dilation, (height, width), zero_border)
    row_taps = torch.tensor(rows, dtype=torch.long)[:, None] + dh * torch.arange(kh)  # (rows, kh) in shifted
    col_taps = torch.tensor(cols, dtype=torch.long)[:, None] + margin + dw * torch.arange(1 - kw, kw)  # (cols, 2kw-1)
    # Each product: (lines, ..., C) base vectors against (lines, ..., C, kh, 2kw - 1) shifted neighbourhoods.
    bands = shifted[:, :, row_taps, left : right + 2 * margin].unfold(4, 2 * margin + 1, 1)[..., ::dw]
    per_row = _products(image[:, :, rows, left:right].permute(2, 0, 3, 1), bands.permute(2, 0, 4, 1, 3, 5))
    bands = shifted[:, :, top : bottom + dh * (kh - 1), col_taps].unfold(2, dh * (kh - 1) + 1, 1)[..., ::dh]
    per_col = _products(image[:, :, top:bottom, cols].permute(3, 0, 2, 1), bands.permute(3, 0, 2, 1, 5, 4))
    patches = shifted[:, :, row_taps[:, None, :, None], col_taps[None, :, None, :]]  # (N, C, rows, cols, kh, 2kw-1)
    crossings = image[:, :, rows][:, :, :, cols].flatten(2, 3).permute(2, 0, 1).unsqueeze(2)  # (rows x cols, N, 1, C)
    per_pixel = _products(crossings, patches.flatten(2, 3).permute(2, 0, 1, 3, 4).unsqueeze(2))
    squares = (image * image).sum(0)  # (C, H, W)
    out_h, out_w = height - dh * (kh - 1), width - dw * (kw - 1)
    diagonal = torch.stack([squares[:, a * dh : a * dh + out_h, b * dw : b * dw + out_w].sum((1, 2))
                            for a in range(kh) for b in range(kw)], dim=1).reshape(channels, kh, kw)
    return {"full": full, "per_row": per_row, "per_col": per_col, "diagonal": diagonal,
            "per_pixel": per_pixel.unflatten(0, (len(rows), len(cols)))}


def _left_out_lines(kernel, dilation, size, zero_border):
    """For rows, then columns: the lines that some tap window leaves out and that may be nonzero (not
    zero padding), and for each tap which of them its window ``[t d, t d + size - (k - 1) d)`` leaves out."""
    found = []
    for k, d, length, (start, end) in zip(kernel, dilation, size, (zero_border[:2], zero_border[2:])):
        out = length - (k - 1) * d
        lines = [line for line in range(start, length - end) if not (k - 1) * d <= line < out]
        found.append((lines, [[not t * d <= line < t * d + out for line in lines] for t in range(k)]))
    return found


def _products(base: torch.Tensor, neighbourhoods: torch.Tensor) -> torch.Tensor:
    """``(lines, C, C, kh, 2kw - 1)``: ``base`` ``(lines, ..., C)`` against ``neighbourhoods``
    ``(lines, ..., C, kh, 2kw - 1)``, summed over the middle (sample and position) dimensions."""
    lines, channels = base.shape[0], base.shape[-1]
    taps = neighbourhoods.shape[-2:]
    if lines == 0:
        return base.new_zeros(0, channels, channels, *taps)
    base = base.reshape(lines, -1, channels)
    neighbourhoods = neighbourhoods.reshape(lines, base.shape[1], -1)
    return (base.transpose(1, 2) @ neighbourhoods).reshape(lines, channels, channels, *taps)


def _assemble(sums: dict[str, torch.Tensor], kernel, lines) -> torch.Tensor:
    """``(1, fan_in, fan_in)`` from the summed pieces of :func:`_shifted_pieces` (same layout as the
    patches); ``lines`` from :func:`_left_out_lines`."""
    (kh, kw), ((_, rows_out), (_, cols_out)) = kernel, lines
    channels = sums["full"].shape[0]
    blocks = sums["full"].new_empty(kh, kw, kh, kw, channels, channels)  # [tap, tap']: a (C, C) block of G
    for a in range(kh):
        for b in range(kw):
            window = _window_sums(sums, rows_out[a], cols_out[b], a, b)
            blocks[a, b, a + 1 :] = window[1:]  # taps below (a, b) ...
            blocks[a + 1 :, :, a, b] = window[1:].transpose(-1, -2)
            blocks[a, b, a, b:] = window[0, b:]  # ... and to its right in the same row
            blocks[a, b:, a, b] = window[0, b:].transpose(-1, -2)
    fan_in = channels * kh * kw
    gram = blocks.permute(4, 0, 1, 5, 2, 3).reshape(1, fan_in, fan_in)
    diagonal = sums["diagonal"].reshape(fan_in)
    gram.diagonal(dim1=1, dim2=2).copy_(diagonal)  # exact, never negative
    dead = diagonal == 0  # inputs that are zero everywhere in their window: exactly zero rows and columns
    gram[:, dead] = 0
    gram[:, :, dead] = 0
    return gram


def _window_sums(sums: dict[str, torch.Tensor], rows_out: list[bool], cols_out: list[bool], a: int, b: int):
    """``(kh - a, kw, C, C)``: sums over tap ``(a, b)``'s window at the offsets that land on a tap
    (``da`` in ``[0, kh - a)``, ``db`` in ``[-b, kw - b)``), from the whole-input sums and the left-out lines."""
    full = sums["full"]
    kh, kw = full.shape[2], (full.shape[3] + 1) // 2
    window = (..., slice(0, kh - a), slice(kw - 1 - b, 2 * kw - 1 - b))
    total = full[window].clone()
    for r, row_left_out in enumerate(rows_out):
        if row_left_out:
            total -= sums["per_row"][r][window]
            for c, col_left_out in enumerate(cols_out):
                if col_left_out:
                    total += sums["per_pixel"][r, c][window]
    for c, col_left_out in enumerate(cols_out):
        if col_left_out:
            total -= sums["per_col"][c][window]
    return total.permute(2, 3, 0, 1)

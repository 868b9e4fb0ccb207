"""Pruned linears and 1x1 convolutions run as sparse CSR products on the CPU, where that measured
faster than dense (:func:`to_sparse_csr`); also importable from :mod:`camphive.sparse_format`, beside
the compressed file format."""
from __future__ import annotations

import torch
from torch import nn

from camphive.errors import ConfigError

# Where torch's CSR product measured faster than dense (benchmarks/sparse_cpu.py, one CPU thread, three runs):
# linears from 1024x1024 and 1x1 convolutions from 96x576 weights at sparsity 0.95 and above (1.03x to 17x). A
# 512x512 linear at batch 1 (0.81x-0.99x) and some layers at 0.9 were slower; smaller layers were not measured.
CSR_MIN_SPARSITY = 0.95
CSR_MIN_WEIGHTS = {nn.Linear: 1024 * 1024, nn.Conv2d: 96 * 576}


class CSRLinear(nn.Module):
    """Inference-only ``nn.Linear`` with its (out, in) weight in sparse CSR: inputs (..., in) -> (..., out)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        # Not persistent: a converted model is for running; save the model before converting it.
        self.register_buffer("weight", layer.weight.detach().to_sparse_csr(), persistent=False)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone(), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.reshape(-1, self.in_features)
        outputs = torch.mm(self.weight, rows.t()).t()  # (out, in) x (in, rows), transposed back as a view
        if self.bias is not None:
            outputs = outputs + self.bias
        return outputs.reshape(*inputs.shape[:-1], self.out_features)


class CSRConv1x1(nn.Module):
    """Inference-only 1x1 ``nn.Conv2d`` (stride 1, groups 1) as CSR (out, in) x (in, N*H*W); NCHW in and out."""

    def __init__(self, layer: nn.Conv2d) -> None:
        super().__init__()
        self.register_buffer("weight", layer.weight.detach().flatten(1).to_sparse_csr(), persistent=False)
        bias = torch.zeros(layer.out_channels) if layer.bias is None else layer.bias.detach().clone()
        self.register_buffer("bias", bias[:, None], persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = inputs.shape
        if batch == 1:  # (1, C, H, W) is already the (C, H*W) matrix: no copy
            return torch.addmm(self.bias, self.weight, inputs.reshape(channels, -1)).reshape(1, -1, height, width)
        columns = inputs.transpose(0, 1).reshape(channels, -1)
        outputs = torch.addmm(self.bias, self.weight, columns).reshape(-1, batch, height, width)
        return outputs.transpose(0, 1).contiguous()


def to_sparse_csr(model: nn.Module, *, min_sparsity: float = CSR_MIN_SPARSITY) -> list[str]:
    """Replace, in place, the layers where CSR measured faster (see ``CSR_MIN_WEIGHTS``); return their names.

    A linear or 1x1 convolution (stride 1, no padding, groups 1) is replaced when at least
    ``min_sparsity`` of its weight is exactly zero. For inference on the CPU: the converted
    layers have no trainable weight, and their weights leave ``state_dict`` (save first).
    """
    if not CSR_MIN_SPARSITY <= min_sparsity < 1:
        raise ConfigError(f"min_sparsity {min_sparsity} is outside [{CSR_MIN_SPARSITY}, 1): below "
                          f"{CSR_MIN_SPARSITY} CSR measured slower than dense for some layers")
    replaced = []
    for name, module in list(model.named_modules())[1:]:  # the model itself cannot be replaced in place
        kind = type(module)
        if kind not in CSR_MIN_WEIGHTS or module.weight.numel() < CSR_MIN_WEIGHTS[kind]:
            continue
        pointwise = kind is nn.Linear or (module.kernel_size, module.stride, module.padding, module.groups) == (
            (1, 1), (1, 1), (0, 0), 1)
        if not pointwise or float((module.weight == 0).float().mean()) < min_sparsity:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, CSRLinear(module) if kind is nn.Linear else CSRConv1x1(module))
        replaced.append(name)
    return replaced

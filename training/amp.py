"""Mixed precision for training (``fit --amp bf16|fp16|off``): what runs in low precision and what stays in fp32.

Low precision (``torch.autocast``) covers the two convolutional networks, where the time goes and rounding is
harmless: the 2D feature pyramid over the 32 sources and the compression layer, and the sparse 3D CNN. Everything
after them runs in fp32 with autocast disabled: the cost volume (its variance is E[f²] − E[f]², which cancels
catastrophically in an 8-bit mantissa), the SDF MLP and its gradient (the eikonal term differentiates it twice), the
NeuS rendering (sigmoids of SDF·inv_s with inv_s growing to ~10³, cumulative products along the ray) and the losses.
The latent volume and the fused features are cast up where they leave the networks.

Batch norms get fp32 inputs too: autocast leaves normalisation to its input's dtype, the server's norms update their
fp32 running statistics in place (which needs matching dtypes), and the reference's statistics are fp32.

fp16 needs loss scaling (:meth:`Precision.grad_scaler`); bf16 has fp32's range and does not. With ``off`` every
function here is the identity and the network runs exactly its fp32 code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from server.common.errors import BadInputError
from server.stages.reconstruction.cost_volume import build_cost_volume
from server.stages.reconstruction.norm import ActivatedBatchNorm2d
from server.stages.reconstruction.sdf_network import ConditionalVolume, SparseSdfNetwork
from server.stages.reconstruction.sparse_conv import SparseBatchNorm, SparseVolume

AMP_MODES = ("bf16", "fp16", "off")
"""Values of ``--amp``; its default (None here) is bf16 on CUDA (fp16 on GPUs without bf16) and off on the CPU."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved ``--amp`` setting for one device type."""

    mode: str
    """``bf16``, ``fp16`` or ``off``."""
    device_type: str
    """``cuda`` or ``cpu``."""

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES.get(self.mode, torch.float32)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The low-precision region (a no-op context when off)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def fp32(self) -> contextlib.AbstractContextManager:
        """A region that stays fp32 even inside an autocast region (a no-op context when off)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, enabled=False)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16; a disabled scaler (``scale`` returns the loss unchanged) otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.mode == "fp16")


def resolve_precision(mode: str | None, device: torch.device) -> Precision:
    """The precision of ``--amp mode`` on ``device``; None picks the device's default.

    Raises:
        BadInputError: an unknown mode, fp16 on the CPU, or bf16 on a GPU without it.
    """
    cuda = device.type == "cuda"
    if mode is None:
        mode = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    if mode not in AMP_MODES:
        raise BadInputError(f"--amp {mode!r}: choose one of {', '.join(AMP_MODES)}")
    if mode == "fp16" and not cuda:
        raise BadInputError("--amp fp16 needs CUDA (loss-scaled fp16 is a GPU format); on the CPU use bf16 or off")
    if mode == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise BadInputError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or off")
    return Precision(mode, device.type)


def _fp32_input(module: nn.Module, args: tuple) -> tuple:
    (x,) = args
    if isinstance(x, SparseVolume):
        return (x if x.features.dtype == torch.float32 else SparseVolume(x.features.float(), x.mask, x.stride),)
    return (x.float(),)


def keep_norms_fp32(model: nn.Module) -> None:
    """Give every batch norm of ``model`` fp32 inputs (forward pre-hooks; a no-op on fp32 inputs)."""
    for module in model.modules():
        if isinstance(module, (ActivatedBatchNorm2d, SparseBatchNorm)) and not getattr(module, "_fp32_inputs", False):
            module.register_forward_pre_hook(_fp32_input)
            module._fp32_inputs = True


def conditional_volume(net: SparseSdfNetwork, fused: torch.Tensor, proj: torch.Tensor,
                       precision: Precision) -> ConditionalVolume:
    """:meth:`SparseSdfNetwork.conditional_volume` with the CNNs in ``precision`` and the cost volume in fp32.

    Args:
        net: the SDF network; fused: [V, F, H, W] source features (any float dtype); proj: [V, 4, 4].

    Returns:
        The fp32 latent volume (exactly ``net.conditional_volume(fused, proj)`` when precision is off).
    """
    if not precision.enabled:
        return net.conditional_volume(fused, proj)
    with precision.autocast():
        compressed = net.compress_layer(fused)
    with precision.fp32():
        cost = build_cost_volume(compressed.float(), proj, net.volume_dims)
    with precision.autocast():
        regularised = net.sparse_costreg_net(cost)
    return ConditionalVolume(latent=regularised.features.float()[None], mask=regularised.mask[None, None].float())

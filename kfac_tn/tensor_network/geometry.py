"""Per-dimension geometry of a convolution: sizes, stride, padding, dilation.

A :class:`ConvDim` describes one spatial dimension of a (transposed) convolution
completely; an N-d convolution is a tuple of N of them. Everything above this file
(index patterns, einsum expressions, factors) only reads these numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from torch import nn


@dataclass(frozen=True)
class ConvDim:
    """One spatial dimension of a convolution or transposed convolution.

    Attributes:
        input_size: I, the spatial size of the layer's input (before padding).
        kernel_size: K.
        stride: S >= 1.
        dilation: D >= 1.
        pad_left: zero padding before the input (for a transposed convolution: the
            ``padding`` argument, which *crops* the output).
        pad_right: zero padding after the input (convolution only; for a transposed
            convolution equal to ``pad_left``).
        output_padding: extra output entries of a transposed convolution (0 otherwise).
        transposed: whether the dimension belongs to a transposed convolution.

    For a convolution, input ``i`` feeds output ``o`` through tap ``k`` iff
    ``i = k·D + o·S − pad_left``; for a transposed convolution iff
    ``o = i·S + k·D − pad_left``.
    """

    input_size: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    pad_left: int = 0
    pad_right: int = 0
    output_padding: int = 0
    transposed: bool = False

    def __post_init__(self) -> None:
        for name in ("input_size", "kernel_size", "stride", "dilation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.pad_left < 0 or self.pad_right < 0:
            raise ValueError(
                f"padding must be >= 0, got ({self.pad_left}, {self.pad_right})."
            )
        if self.output_padding < 0:
            raise ValueError(f"output_padding must be >= 0, got {self.output_padding}.")
        if not self.transposed and self.output_padding:
            raise ValueError("output_padding is only defined for transposed convolutions.")
        if self.transposed and self.output_padding >= max(self.stride, self.dilation):
            raise ValueError(
                "output_padding must be smaller than stride or dilation, got "
                f"output_padding={self.output_padding}, stride={self.stride}, "
                f"dilation={self.dilation}."
            )
        if self.output_size < 1:
            raise ValueError(
                f"Convolution dimension {self} has no output (output size "
                f"{self.output_size}); the input is too small for the kernel."
            )

    @property
    def output_size(self) -> int:
        """O, the spatial size of the layer's output."""
        span = self.dilation * (self.kernel_size - 1) + 1
        if self.transposed:
            return (
                (self.input_size - 1) * self.stride
                - 2 * self.pad_left
                + span
                + self.output_padding
            )
        return 1 + (self.input_size + self.pad_left + self.pad_right - span) // self.stride

    @property
    def is_dense(self) -> bool:
        """Whether Π is a pure reshape of a (sliced) input: K <= S, no pad, no dilation.

        Covers patchify (K == S), down-sampling (K < S, unused inputs sliced away) and
        the identity (K == S == 1). Requires O·S <= I so that the input splits into O
        blocks of S without padding. Only for convolutions, not transposed ones.
        """
        return (
            not self.transposed
            and self.kernel_size <= self.stride
            and self.pad_left == 0
            and self.dilation == 1
            and self.output_size * self.stride <= self.input_size
        )


def _as_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must have {n} entries, got {value}.")
    return value


def same_padding(kernel_size: int, dilation: int) -> tuple[int, int]:
    """Left/right padding of ``padding='same'`` as torch applies it (extra on the right)."""
    total = dilation * (kernel_size - 1)
    return total // 2, total - total // 2


def conv_dims(
    input_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] | Sequence[tuple[int, int]] = 0,
    dilation: int | Sequence[int] = 1,
    output_padding: int | Sequence[int] = 0,
    transposed: bool = False,
) -> tuple[ConvDim, ...]:
    """Build the per-dimension geometry from torch-style hyper-parameters.

    Args:
        input_shape: spatial input sizes ``(I1, ..., IN)``.
        kernel_size, stride, dilation, output_padding: int or N-tuple.
        padding: int, N-tuple of ints, N-tuple of ``(left, right)`` pairs, or the
            strings ``'same'`` / ``'valid'`` (convolutions only).
        transposed: whether the layer is a transposed convolution.

    Returns:
        N :class:`ConvDim` objects.
    """
    n = len(input_shape)
    if n < 1:
        raise ValueError("A convolution needs at least one spatial dimension.")
    kernel = _as_tuple(kernel_size, n, "kernel_size")
    strides = _as_tuple(stride, n, "stride")
    dilations = _as_tuple(dilation, n, "dilation")
    out_pads = _as_tuple(output_padding, n, "output_padding")
    if isinstance(padding, str):
        if transposed:
            raise ValueError(f"padding={padding!r} is not supported for transposed convolutions.")
        if padding == "valid":
            pads = [(0, 0)] * n
        elif padding == "same":
            if any(s != 1 for s in strides):
                raise ValueError("padding='same' is not supported for strided convolutions.")
            pads = [same_padding(k, d) for k, d in zip(kernel, dilations)]
        else:
            raise ValueError(f"Unknown padding {padding!r}; use an int, a tuple, 'same' or 'valid'.")
    elif isinstance(padding, int):
        pads = [(padding, padding)] * n
    else:
        padding = tuple(padding)
        if len(padding) != n:
            raise ValueError(f"padding must have {n} entries, got {padding}.")
        pads = [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding]
    if transposed and any(left != right for left, right in pads):
        raise ValueError("Transposed convolutions take symmetric padding only.")
    return tuple(
        ConvDim(
            input_size=int(i),
            kernel_size=k,
            stride=s,
            dilation=d,
            pad_left=pl,
            pad_right=pr,
            output_padding=op,
            transposed=transposed,
        )
        for i, k, s, d, (pl, pr), op in zip(input_shape, kernel, strides, dilations, pads, out_pads)
    )


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def layer_conv_dims(layer: nn.Module, input_shape: Sequence[int]) -> tuple[ConvDim, ...]:
    """Geometry of a torch convolution layer for a batched input of ``input_shape``.

    Non-zero padding modes (reflect, replicate, circular) are *not* folded in here:
    the caller pads the input explicitly (``kfac_tn.factors.layers`` does, with
    ``F.pad``) and then uses padding 0.
    """
    if not isinstance(layer, CONV_TYPES + TRANSPOSED_CONV_TYPES):
        raise TypeError(f"Unsupported layer {type(layer).__name__}; expected a convolution.")
    n = len(layer.kernel_size)
    transposed = isinstance(layer, TRANSPOSED_CONV_TYPES)
    spatial = tuple(input_shape[-n:])
    if transposed:
        return _cached_conv_dims(
            spatial, tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation),
            tuple(layer.output_padding), True,
        )
    if layer.padding_mode != "zeros":
        padding: int | tuple = 0
    else:
        # torch's own left/right split (also for 'same') in reversed (last-dim-first) order
        rev = layer._reversed_padding_repeated_twice
        padding = tuple((rev[2 * (n - 1 - d)], rev[2 * (n - 1 - d) + 1]) for d in range(n))
    return _cached_conv_dims(spatial, tuple(layer.kernel_size), tuple(layer.stride), padding,
                             tuple(layer.dilation), 0, False)


@lru_cache(maxsize=1024)
def _cached_conv_dims(spatial: tuple, kernel: tuple, stride: tuple, padding, dilation: tuple, output_padding,
                      transposed: bool) -> tuple[ConvDim, ...]:
    """:func:`conv_dims` of hashable arguments, cached (a layer's geometry per input size is
    asked for at every statistics step; ConvDim is immutable)."""
    return conv_dims(spatial, kernel, stride, padding, dilation, output_padding, transposed)

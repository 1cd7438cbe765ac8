"""Faster CPU matrix products for the frozen text tower: oneDNN with weights packed once.

A PEZ step feeds the text tower few rows (prompt_len + 2 per prompt), and at so few rows
the generic fp32 GEMM spends much of each call re-arranging the weight matrix. oneDNN's
linear with a weight packed once per model does not: on this project's AVX2 CPUs its
products run about 1.7x faster, which makes a whole step about 1.3x faster (docs/performance.md,
Performance). Its rows also do not depend on how many rows share a call, so a problem gives
the same numbers alone or batched.

The tower's weights are frozen, so each linear layer keeps two packed copies: W for the
forward product and W^T for the gradient with respect to its input (no weight gradients
are ever needed). The products are the same; only their rounding order differs. The dense
weights stay where they are, so the model's state_dict, open_clip's helpers and every other
dtype or device keep working: a packed layer runs its packed product only for fp32 CPU
inputs outside autocast, and the ordinary product otherwise.

`apply(tower, vocab, enable)` is the one entry point. The operators are private to torch, so
before the first use they must pass a self-check on a tiny product; if they are missing or
fail it, packing stays off and the plain products run (logged once at INFO level).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from pez_cli.errors import first_line

log = logging.getLogger("pez")


@functools.cache
def available() -> bool:
    """Whether oneDNN's packed linear works in this torch build: present, and a tiny packed
    product equals the plain one (checked once per process)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not (torch.backends.mkldnn.is_available() and ops is not None
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        log.info("packed CPU weights: this torch build has no oneDNN packed linear; using plain products")
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, b, x = torch.randn(24, 16, generator=g), torch.randn(24, generator=g), torch.randn(3, 5, 16, generator=g)
        ok = torch.allclose(_product(x, _pack(w, 15), b), F.linear(x, w, b), rtol=1e-4, atol=1e-5)
    except Exception as e:  # a private operator whose signature changed, or that fails here
        log.info("packed CPU weights: oneDNN self-check failed (%s); using plain products", first_line(e))
        return False
    if not ok:
        log.info("packed CPU weights: oneDNN self-check gave wrong numbers; using plain products")
    return ok


def packable(tensor: torch.Tensor) -> bool:
    """Whether a constant can be packed: a frozen fp32 CPU tensor, with oneDNN working."""
    return (
        not tensor.requires_grad
        and tensor.dtype == torch.float32
        and tensor.device.type == "cpu"
        and available()
    )


def _pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """weight (out, in) in oneDNN's blocked layout for products with about rows_hint rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ W^T + bias with W packed: (..., out)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


class _PackedLinearFn(torch.autograd.Function):
    """y = x W^T + b for a frozen W; the backward pass returns the input's gradient only."""

    @staticmethod
    def forward(ctx, x, forward_w, backward_w, bias):
        ctx.backward_w = backward_w
        return _product(x, forward_w, bias)

    @staticmethod
    def backward(ctx, grad):
        return _product(grad, ctx.backward_w, None), None, None, None


def use_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of x with a packed copy of `weight` applies: fp32 CPU, no autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


class PackedMatrix:
    """A constant matrix M (out, in), packed for fast no-grad products x @ M^T."""

    def __init__(self, matrix: torch.Tensor, rows_hint: int):
        self.matrix = _pack(matrix, rows_hint)
        self.nbytes = matrix.numel() * matrix.element_size()

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out); fp32 CPU tensors only."""
        return _product(x, self.matrix, None)


class PackedWeight:
    """Packed copies of one frozen weight matrix, made for its current values."""

    def __init__(self, weight: torch.Tensor, rows_hint: int):
        self.forward = _pack(weight, rows_hint)  # W (out, in)
        self.backward = _pack(weight.t(), rows_hint)  # W^T (in, out): grad_in = grad_out @ W
        self.nbytes = 2 * weight.numel() * weight.element_size()

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _PackedLinearFn.apply(x, self.forward, self.backward, bias)


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose fp32 CPU products use packed weights.

    Holds the original weight and bias parameters under the same names, so state_dict keys
    and anything that reads `.weight` are unchanged.
    """

    def __init__(self, linear: nn.Linear, rows_hint: int):
        super().__init__()
        self.original = [linear]  # a list, so it is not registered as a submodule twice
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = PackedWeight(linear.weight, rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_packed(x, self.weight):
            return self.packed.apply(x, self.bias)
        return F.linear(x, self.weight, self.bias)


def last_positions(x: torch.Tensor, keep: int) -> torch.Tensor:
    """The last `keep` positions of x (..., T, C); x itself when that is all of them, since even a
    whole-length slice costs a zero-filled copy in the backward pass."""
    return x if keep == x.shape[-2] else x[..., -keep:, :]


class PackedSelfAttention(nn.Module):
    """A frozen nn.MultiheadAttention (batch-first) whose fp32 CPU self-attention uses packed weights.

    Computes what nn.MultiheadAttention computes for self-attention with a float mask and no
    padding mask: the packed input projection, scaled dot-product attention per head, the
    packed output projection. Any other call goes to the original module.
    """

    def __init__(self, mha: nn.MultiheadAttention, rows_hint: int):
        super().__init__()
        self.original = [mha]
        self.num_heads = mha.num_heads
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.packed_in = PackedWeight(mha.in_proj_weight, rows_hint)
        self.packed_out = PackedWeight(mha.out_proj.weight, rows_hint)

    @staticmethod
    def supports(mha: nn.Module) -> bool:
        """Whether `mha` is the plain configuration this module reproduces."""
        return (
            type(mha) is nn.MultiheadAttention
            and mha.batch_first
            and mha._qkv_same_embed_dim
            and mha.bias_k is None
            and mha.bias_v is None
            and not mha.add_zero_attn
            and mha.dropout == 0.0
            and mha.in_proj_weight is not None
        )

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        plain = (
            key is query and value is query and key_padding_mask is None and not need_weights
            and not is_causal and (attn_mask is None or attn_mask.is_floating_point())
            and query.dim() == 3 and use_packed(query, self.in_proj_weight)
        )
        if not plain:
            return self.original[0](query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                    attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        batch, seq, width = query.shape
        q, k, v = self.queries_keys_values(query)  # 3 x (B, H, T, W/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, W/H)
        out = out.transpose(1, 2).reshape(batch, seq, width)
        return self.packed_out.apply(out, self.out_proj.bias), None

    def last_queries(self, x: torch.Tensor, attn_mask: torch.Tensor | None, keep: int,
                     prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Self-attention's output at the last `keep` positions only: (B, T, W) -> (B, keep, W).
        Attention runs for every position as in forward (one query alone rounds differently
        there), the output projection for the kept ones (packed rows do not depend on how many
        there are, from two rows up). `prefix`: keys and values (H, P, W/H) of P positions before
        x's, shared by every sequence (attn_mask is then (T, P + T))."""
        batch, _, width = x.shape
        q, k, v = self.queries_keys_values(x)  # 3 x (B, H, T, W/H)
        if prefix is not None:
            shape = (batch, *prefix[0].shape)
            k = torch.cat([prefix[0].expand(shape), k], dim=2)  # (B, H, P + T, W/H)
            v = torch.cat([prefix[1].expand(shape), v], dim=2)
        out = last_positions(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask), keep)  # (B, H, keep, W/H)
        out = out.transpose(1, 2).reshape(batch, keep, width)
        return self.packed_out.apply(out, self.out_proj.bias)

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The packed input projection of x (B, T, W), split per head: 3 x (B, H, T, W/H)."""
        batch, seq, width = x.shape
        qkv = self.packed_in.apply(x, self.in_proj_bias)  # (B, T, 3W)
        q, k, v = qkv.view(batch, seq, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v


def pack_modules(root: nn.Module, rows_hint: int) -> int:
    """Swap the frozen nn.Linear and self-attention modules under `root` for packed ones.

    Only modules whose parameters are all frozen fp32 CPU tensors are swapped. Returns the
    number swapped (0 when oneDNN is unavailable: packable() says no to every parameter).
    """

    def all_packable(module: nn.Module) -> bool:
        params = list(module.parameters())
        return bool(params) and all(packable(p) for p in params)

    swapped = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (PackedLinear, PackedSelfAttention)) or not all_packable(child):
                continue
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child, rows_hint))
                swapped += 1
            elif PackedSelfAttention.supports(child):
                setattr(parent, name, PackedSelfAttention(child, rows_hint))
                swapped += 1
    return swapped


def packed_nbytes(root: nn.Module) -> int:
    """Bytes held by the packed copies under `root` (the dense weights not counted)."""
    total = 0
    for module in root.modules():
        if isinstance(module, PackedLinear):
            total += module.packed.nbytes
        elif isinstance(module, PackedSelfAttention):
            total += module.packed_in.nbytes + module.packed_out.nbytes
    return total


def unpack_modules(root: nn.Module) -> int:
    """Put back the original modules that pack_modules swapped out. Returns how many."""
    restored = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (PackedLinear, PackedSelfAttention)):
                setattr(parent, name, child.original[0])
                restored += 1
    return restored


def apply(tower, vocab, enable: bool) -> bool:
    """Pack (or unpack) the text tower's layers and projection and the vocabulary's chunks;
    returns whether packed products are on. The one entry point for packing."""
    if not enable or tower.amp_dtype is not None:
        unpack_tower(tower)
        vocab.packed = []
        return False
    rows = tower.context_length
    pack_modules(tower.transformer, rows_hint=rows)
    layers = packed_nbytes(tower.transformer) > 0
    proj = tower.text_projection
    if layers and tower.packed_projection is None and isinstance(proj, nn.Parameter) and packable(proj):
        tower.packed_projection = PackedWeight(proj.t(), rows_hint=rows)  # x @ proj
    if layers and not vocab.packed and packable(vocab.normalized):
        vocab.packed = [PackedMatrix(chunk, rows) for chunk in vocab.chunks()]
    return layers and bool(vocab.packed)


def unpack_tower(tower) -> None:
    """Back to the plain modules (before the weights change dtype: packed copies would not)."""
    unpack_modules(tower.transformer)
    tower.packed_projection = None
    tower.start_states = None  # computed with the packed products


def packed_bytes(tower, vocab) -> int:
    """Memory held by the packed copies of a tower and a vocabulary."""
    projection = tower.packed_projection.nbytes if tower.packed_projection is not None else 0
    return packed_nbytes(tower.transformer) + projection + sum(chunk.nbytes for chunk in vocab.packed)

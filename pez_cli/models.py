"""Loading CLIP through open_clip and running its own text tower on embeddings.

pez never forks open_clip: `TextTower` holds references to the model's own modules
(token_embedding, positional_embedding, transformer, attn_mask, ln_final, text_projection)
and runs them on a sequence of embeddings instead of token ids.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pez_cli import hub, packing
from pez_cli.errors import ConfigError, ModelError, first_line

# What a user without the weights can do; {name} is the model asked for.
OFFLINE_HINT = ("point --model at a local copy (where there is network: pez export {name} DIR, then --model "
                "local-dir:DIR), or try pez demo (nothing to download)")
# Printed prompts are encoded in passes of at most this many residual-stream values (rows x
# positions x width), so refinement's candidates for a whole batch group keep memory flat: a
# pass's widest activation (the MLP's, 4x) is then 16 MB in fp32. ViT-H-14 at 16 tokens: 56
# texts a pass (1,000 tokens, enough to keep a GPU busy); ViT-B-32: 113.
ENCODE_ELEMENTS = 2 ** 20
# Sequence length from which the packed tower runs a shared first position once (kept keys and
# values): below it, the attention over the fewer queries left does not round as open_clip's.
FIRST_KEPT_FROM = 6
MODEL_FLAG = "--model"  # the flag OFFLINE_HINT names; load_model(flag=...) names another


def pick_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise ConfigError("device 'mps' was asked for but MPS is not available")
    if name.startswith("cuda:") and name[5:].isdigit():  # one GPU of several, numbered as torch numbers them
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(name[5:]) >= count:
            present = f"GPUs cuda:0 to cuda:{count - 1}" if count > 1 else "GPU cuda:0" if count else "no CUDA GPU"
            raise ConfigError(f"device {name!r} was asked for but this machine has {present}")
        return torch.device(name)
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def has_bf16(device: torch.device) -> bool:
    """Whether the device computes in bf16 natively: CUDA GPUs that support it, and CPUs with
    AVX-512 BF16 or AMX (as torch's oneDNN reports). The one place pez asks (the CLIPs'
    --precision auto on CUDA, and the language model's and Stable Diffusion's weights)."""
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The reduced-precision dtype for a --precision choice, or None for plain fp32.

    auto: bf16 on CUDA GPUs that support it, fp32 elsewhere (CPUs without bf16 units gain
    nothing from it, and fp32 keeps results comparable with the paper's code).
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda" and has_bf16(device):
            return torch.bfloat16
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision 'fp16' is not supported on the CPU; use fp32 or bf16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def inference_dtype(device: torch.device) -> torch.dtype:
    """The weights' dtype of a model pez only runs forward (the language model, Stable
    Diffusion): bf16 on CUDA GPUs that have it (else fp16), fp16 on MPS, fp32 on the CPU. The
    CLIPs, which are optimized through, follow --precision instead (resolve_precision)."""
    if device.type == "cuda":
        return torch.bfloat16 if has_bf16(device) else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def lm_dtype(device: torch.device) -> torch.dtype:
    """The language model's weights' dtype: inference_dtype's, but bf16 on a CPU that computes
    in bf16 natively (AVX-512 BF16 or AMX, as torch's oneDNN reports): its matrix products ran
    3x faster there than in fp32 (a 2-core AMD EPYC), the whole run with the prior about 15%
    faster, and a GPU reads the same model in bf16 too. Elsewhere on a CPU bf16 is emulated and
    slower, so fp32 stays."""
    return torch.bfloat16 if device.type == "cpu" and has_bf16(device) else inference_dtype(device)


def precision_name(precision: str, device: torch.device) -> str:
    """What --precision resolves to on this device: fp32, bf16 or fp16."""
    names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names[resolve_precision(precision, device)]


def compute_on(device: str | torch.device, precision: str) -> tuple[torch.device, str]:
    """Where a run computes and in what arithmetic, decided once for every runner (a command,
    a batch job, a Ray worker): the device a --device name picks (or the device a loaded
    model is on) and the precision name --precision resolves to there. Rows and results
    record that name, since the arithmetic decides the prompt."""
    where = device if isinstance(device, torch.device) else pick_device(device)
    return where, precision_name(precision, where)


class TextTower(nn.Module):
    """The CLIP text encoder of an open_clip model, run on embeddings.

    Works for open_clip's `CLIP` (text modules on the model) and `CustomTextCLIP` with a
    `TextTransformer` (`model.text`), as long as the tower is causal and pools at the end
    token, which is what makes "only the first prompt_len + 2 positions matter" exact.
    """

    def __init__(self, model: nn.Module, end_id: int):
        super().__init__()
        src = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if src is None or not all(hasattr(src, a) for a in needed):
            raise ModelError(
                f"{type(model).__name__} has no CLIP-style text transformer; "
                "pez needs an open_clip model with token_embedding and a causal text tower"
            )
        pool = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        if getattr(src, "attn_mask", None) is None or pool not in ("argmax", "eos"):
            raise ModelError(
                "this model's text tower is not causal with end-token pooling, "
                "which PEZ requires (OpenAI and OpenCLIP CLIP models are)"
            )
        if getattr(src, "cls_emb", None) is not None:
            raise ModelError("text towers with an appended class token (CoCa) are not supported")
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.register_buffer("attn_mask", src.attn_mask, persistent=False)
        self.end_id = end_id
        self.context_length = int(self.positional_embedding.shape[0])
        self.width = int(self.token_embedding.weight.shape[1])
        self.amp_dtype: torch.dtype | None = None  # set by set_precision
        self.packed_projection: packing.PackedWeight | None = None  # set by packing.apply
        # (first embedding (W,), each block's (keys, values)) of a shared first position: _forward
        self.start_states: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def set_precision(self, dtype: torch.dtype | None) -> None:
        """Keep the weights in `dtype` (None: as loaded) and run forward under autocast."""
        if dtype is not None:
            packing.unpack_tower(self)  # packed copies would keep the old values
            self.to(dtype)
        self.amp_dtype = dtype

    @property
    def output_dim(self) -> int:
        proj = self.text_projection
        if proj is None:
            return self.width
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, D), not normalized, of embedded sequences x (B, T, W) ending in EOT.

        On the packed CPU path a first position shared by every sequence (the start token's
        embedding, in every pez run) is a constant: its keys and values in each block are
        computed once and kept, and no gradient flows back to it."""
        if self.amp_dtype is None:
            return self._forward(x)
        # No cast cache: the weights are already in amp_dtype, and CUDA graph capture needs it off.
        with torch.autocast(x.device.type, dtype=self.amp_dtype, cache_enabled=False):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        cast = self.transformer.get_cast_dtype()
        packed = self._packed_blocks(x)
        first = self._first_position_states(x) if packed else None
        x = x.to(cast) + self.positional_embedding[:seq_len].to(cast)  # (B, T, W)
        mask = self.attn_mask[:seq_len, :seq_len].to(x.dtype)
        blocks = self.transformer.resblocks
        if packed:
            if first is not None:  # the first position's keys and values are known: run the others
                x, mask = x[:, 1:], mask[1:]  # (B, T - 1, W), (T - 1, T)
            prefixes = first or [None] * len(blocks)
            for block, prefix in zip(blocks[:-1], prefixes):
                x = self._packed_block(block, x, mask, prefix, keep=x.shape[1])
            # Only the EOT position's output of the last block is read: the other positions need
            # only their keys and values (its MLP and output projection, three quarters of its
            # products, run for one position). One sequence keeps its last two positions: a
            # one-row product takes another kernel in oneDNN, which rounds otherwise.
            x = self._packed_block(blocks[-1], x, mask, prefixes[-1], keep=1 if x.shape[0] > 1 else 2)
        else:
            x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x[:, -1])  # (B, W): LayerNorm is per position; EOT is last
        proj = self.text_projection
        if proj is None:
            return x
        if self.packed_projection is not None and packing.use_packed(x, proj):
            return self.packed_projection.apply(x, None)
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (B, D)

    def _packed_blocks(self, x: torch.Tensor) -> bool:
        """Whether the blocks can run as `_packed_block`: the same arithmetic bit for bit as
        open_clip's (packed fp32 products on the CPU, whose rows do not depend on how many
        there are; tests check it), for open_clip's plain block."""
        from open_clip.transformer import ResidualAttentionBlock

        blocks = getattr(self.transformer, "resblocks", None)
        if not blocks or not getattr(self.transformer, "batch_first", False) or getattr(self.transformer, "grad_checkpointing", False):
            return False
        return (all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                    and isinstance(b.attn, packing.PackedSelfAttention) for b in blocks)
                and packing.use_packed(x, blocks[0].attn.in_proj_weight))

    @staticmethod
    def _packed_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                      prefix: tuple[torch.Tensor, torch.Tensor] | None, keep: int) -> torch.Tensor:
        """open_clip's ResidualAttentionBlock at x's last `keep` positions: (B, T, W) -> (B, keep, W).
        prefix: the keys and values of positions before x's, shared by every sequence."""
        x_end = packing.last_positions(x, keep) + block.ls_1(block.attn.last_queries(block.ln_1(x), mask, keep, prefix))
        return x_end + block.ls_2(block.mlp(block.ln_2(x_end)))

    def _first_position_states(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each block's keys and values (H, 1, W/H) at the first position when every sequence of
        x (B, T, W) starts with the same embedding, computed once per embedding; else None. A
        causal tower's first position sees only itself, so these are constants, and with two
        rows its products round as in a batch. Taken from FIRST_KEPT_FROM positions up: with
        fewer queries left, attention rounds otherwise (two left on one CPU, three on another)."""
        first = x[0, 0]
        if x.shape[1] < FIRST_KEPT_FROM or not torch.equal(x[:, 0], first.expand(x.shape[0], -1)):
            return None
        if self.start_states is None or not torch.equal(self.start_states[0], first):
            cast = self.transformer.get_cast_dtype()
            with torch.no_grad():
                h = (first.to(cast) + self.positional_embedding[0].to(cast)).expand(2, 1, -1)  # (2, 1, W)
                mask = self.attn_mask[:1, :1].to(h.dtype)
                states = []
                for block in self.transformer.resblocks:
                    _, k, v = block.attn.queries_keys_values(block.ln_1(h))  # (2, H, 1, W/H)
                    states.append((k[0], v[0]))
                    h = self._packed_block(block, h, mask, None, keep=1)
            self.start_states = (first.detach().clone(), states)
        return self.start_states[1]

    # -- growing texts one token at a time (the beam) -------------------------------------------
    def can_grow(self) -> bool:
        """Whether grow() applies: open_clip's plain blocks (self-attention with one input
        projection), batch first. Other towers score grown texts whole."""
        from open_clip.transformer import ResidualAttentionBlock

        blocks = getattr(self.transformer, "resblocks", None)
        return bool(blocks) and getattr(self.transformer, "batch_first", False) and all(
            type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
            and getattr(b.attn, "in_proj_weight", None) is not None for b in blocks)

    @torch.no_grad()
    def prefix_states(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's keys and values (B, H, n, W/H) of token id prefixes (B, n) that start
        with the start token: what grow() extends. A causal tower's prefix positions never see
        what comes after them, so these hold for every text that starts with the prefix."""
        with self._autocast(ids.device):
            cast = self.transformer.get_cast_dtype()
            n = ids.shape[1]
            x = self.token_embedding(ids).to(cast) + self.positional_embedding[:n].to(cast)  # (B, n, W)
            mask = self.attn_mask[:n, :n].to(x.dtype)
            states = []
            for block in self.transformer.resblocks:
                q, k, v = _queries_keys_values(block.attn, block.ln_1(x))  # (B, H, n, W/H)
                states.append((k, v))
                x = self._block_rest(block, x, q, k, v, mask)
            return states

    @torch.no_grad()
    def grow(self, states: list[tuple[torch.Tensor, torch.Tensor]], tokens: torch.Tensor
             ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Texts longer than their prefixes, scored without running the prefixes again: text
        (b, e) is prefix b (its keys and values in `states`, (B, H, n, W/H) per block) followed
        by tokens[b, e] (tokens: (B, E), one token each, or (B, E, T), a run of T) and the end
        token. Returns their normalized features (B, E, D) and each block's keys and values
        (B, E, H, 1, W/H) at the first new token, for prefix_states of the grown texts
        (concatenated to their prefix's along the length). Each text's new positions attend to
        its prefix's keys and values (shared by its E siblings, never copied per text) and to
        each other, causally: the arithmetic of encoding the texts whole but for the order of
        its sums (features agree to about 1e-6)."""
        if tokens.dim() == 2:
            tokens = tokens[..., None]
        batch, extra, run = tokens.shape
        n = int(states[0][0].shape[2])
        with self._autocast(tokens.device):
            cast = self.transformer.get_cast_dtype()
            ids = torch.cat([tokens, torch.full_like(tokens[..., :1], self.end_id)], dim=-1).view(batch * extra, run + 1)
            x = self.token_embedding(ids).to(cast) + self.positional_embedding[n:n + run + 1].to(cast)  # (B*E, T+1, W)
            width = x.shape[-1]
            grown = []
            for block, (keys, values) in zip(self.transformer.resblocks, states):
                q, k, v = _queries_keys_values(block.attn, block.ln_1(x))  # (B*E, H, T+1, W/H)
                heads, dim = q.shape[1], q.shape[3]
                grown.append((k[:, :, :1].reshape(batch, extra, heads, 1, dim), v[:, :, :1].reshape(batch, extra, heads, 1, dim)))
                out = _attend_after_prefix(q, k, v, keys.to(q.dtype), values.to(q.dtype), extra)
                x = self._block_after_attention(block, x, out.transpose(1, 2).reshape(batch * extra, run + 1, width))
            x = self.ln_final(x[:, -1])
            proj = self.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
            return F.normalize(x.float(), dim=-1).view(batch, extra, -1), grown

    @staticmethod
    def _block_after_attention(block: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The rest of a block once attention's per-head outputs are joined (B, T, W): its output
        projection, the residuals and the MLP."""
        attn = block.attn
        if isinstance(attn, packing.PackedSelfAttention) and packing.use_packed(out, attn.in_proj_weight):
            out = attn.packed_out.apply(out, attn.out_proj.bias)
        else:
            out = attn.out_proj(out)
        x = x + block.ls_1(out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    @classmethod
    def _block_rest(cls, block: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """A block's attention from its queries, keys and values, then its MLP: (B, T, W)."""
        batch, seq, width = x.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, seq, width)
        return cls._block_after_attention(block, x, out)

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=False)

    def encode_ids(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Normalized features (N, D) of token id sequences that each end in the EOT id, in
        passes of at most ENCODE_ELEMENTS residual-stream values (rows x length x width)."""
        device = self.token_embedding.weight.device
        out = torch.empty(len(sequences), self.output_dim, device=device)
        by_len: dict[int, list[int]] = {}
        for i, seq in enumerate(sequences):
            if seq[-1] != self.end_id:
                raise ValueError("sequence must end with the end-of-text id")
            by_len.setdefault(len(seq), []).append(i)
        for length, rows in by_len.items():
            chunk = max(1, ENCODE_ELEMENTS // (length * self.width))  # memory flat in the number of texts
            for at in range(0, len(rows), chunk):
                part = rows[at:at + chunk]
                ids = torch.tensor([list(sequences[i]) for i in part], device=device)
                feats = self.forward(self.token_embedding(ids))
                out[torch.tensor(part, device=device)] = F.normalize(feats.float(), dim=-1)
        return out


def _attend_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         extra: int) -> torch.Tensor:
    """Attention of t new positions per text (q, k, v: (B*E, H, t, d)) over their prefix's
    keys and values (B, H, n, d), shared by the E texts of each prefix, and causally over
    themselves: one softmax over both parts, without copying a prefix for each text.
    Returns (B*E, H, t, d)."""
    texts, heads, t, dim = q.shape
    batch = keys.shape[0]
    scale = dim ** -0.5
    qs = q.view(batch, extra, heads, t, dim).transpose(1, 2).reshape(batch, heads, extra * t, dim) * scale
    before = qs @ keys.transpose(-1, -2)  # (B, H, tE, n)
    before = before.view(batch, heads, extra, t, -1).transpose(1, 2).reshape(texts, heads, t, -1)  # (B*E, H, t, n)
    own = (q * scale) @ k.transpose(-1, -2)  # (B*E, H, t, t)
    own = own.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    weights = torch.softmax(torch.cat([before, own], dim=-1), dim=-1)  # (B*E, H, t, n + t)
    n = keys.shape[2]
    from_prefix = weights[..., :n].reshape(batch, extra, heads, t, n).transpose(1, 2).reshape(batch, heads, extra * t, n)
    out = (from_prefix @ values).view(batch, heads, extra, t, dim).transpose(1, 2).reshape(texts, heads, t, dim)
    return out + weights[..., n:] @ v


def _queries_keys_values(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A self-attention's input projection of x (B, T, W), split per head: 3 x (B, H, T, W/H)."""
    if isinstance(attn, packing.PackedSelfAttention) and packing.use_packed(x, attn.in_proj_weight):
        return attn.queries_keys_values(x)
    batch, seq, width = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3W)
    q, k, v = qkv.view(batch, seq, 3, attn.num_heads, width // attn.num_heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def split_model_name(name: str) -> tuple[str | None, str, str | None]:
    """'hf-hub:x' -> ('hf-hub', 'x', None); 'local-dir:p' -> ('local-dir', 'p', None);
    'ARCH/TAG' -> (None, ARCH, TAG). TAG may also be a path to a checkpoint file."""
    for schema in ("hf-hub", "local-dir"):
        prefix = schema + ":"
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if not rest:
                raise ModelError(f"model {name!r} names no {'repository' if schema == 'hf-hub' else 'folder'}")
            return schema, rest, None
    if "/" not in name:
        return None, name, None
    arch, tag = name.split("/", 1)
    return None, arch, tag


def _known_names() -> list[str]:
    import open_clip

    return [f"{arch}/{tag}" for arch, tag in open_clip.list_pretrained()]


def check_model_name(name: str) -> None:
    """Raise a ModelError naming close matches if `name` is not something open_clip can load."""
    import open_clip

    schema, ident, tag = split_model_name(name)
    if schema is None and os.path.isdir(os.path.expanduser(name)):
        raise ModelError(f"model folder {name} has no open_clip_config.json (a local-dir: model needs one)")
    if schema == "local-dir":
        path = os.path.expanduser(ident)
        if not os.path.isdir(path):
            raise ModelError(f"model folder not found: {ident}")
        if not os.path.isfile(os.path.join(path, "open_clip_config.json")):
            raise ModelError(f"model folder {ident} has no open_clip_config.json")
        return
    if schema == "hf-hub":
        return
    if tag is not None and os.path.isfile(os.path.expanduser(tag)):
        if ident not in open_clip.list_models():
            raise ModelError(_unknown(ident, open_clip.list_models(), "architecture"))
        return
    if tag is None or (ident, tag) not in set(open_clip.list_pretrained()):
        raise ModelError(_unknown(name, _known_names(), "model"))


def _unknown(name: str, choices: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, choices, n=4, cutoff=0.5)
    if close:
        return f"unknown {what} {name!r}; close matches: {', '.join(close)}"
    return f"unknown {what} {name!r}; `python -c \"import open_clip; print(open_clip.list_pretrained())\"` lists them"


class PieceEncoder:
    """tokenizer.encode, word by word from a cache where that is provably the same.

    Scoring printed prompts re-tokenizes many thousands of texts that share their words (most
    of the time goes to ftfy and the regex, not to the BPE). For open_clip's BPE tokenizer with
    its default cleaning (ftfy, HTML unescaping, whitespace, optionally lower case), a text of
    printable ASCII without '&' is left alone by ftfy and the unescaping, and no token of its
    pattern spans a space, so the text encodes to the concatenation of its space-separated
    pieces' encodings; those are cached. Any other text or tokenizer is encoded whole."""

    CLEANERS = ("_clean_lower", "_clean_whitespace")
    LIMIT = 1 << 18  # cached pieces before the cache starts over

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        clean = getattr(tokenizer, "clean_fn", None)
        self.fast = (type(tokenizer).__name__ == "SimpleTokenizer" and type(tokenizer).__module__ == "open_clip.tokenizer"
                     and getattr(clean, "__module__", "") == "open_clip.tokenizer"
                     and getattr(clean, "__name__", "") in self.CLEANERS)
        self.cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        if not (self.fast and text.isascii() and text.isprintable() and "&" not in text):
            return self.tokenizer.encode(text)
        out: list[int] = []
        for piece in text.split():
            ids = self.cache.get(piece)
            if ids is None:
                if len(self.cache) >= self.LIMIT:
                    self.cache.clear()
                ids = self.cache[piece] = self.tokenizer.encode(piece)
            out.extend(ids)
        return out


@dataclass
class LoadedModel:
    """A CLIP model ready for PEZ: the text tower, the tokenizer, and (until released) images."""

    name: str
    device: torch.device
    text: TextTower
    tokenizer: Any
    clip: nn.Module | None = None
    preprocess: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    # exp(logit_scale): what CLIP multiplies a cosine by to make the logits it was trained on, so
    # that scale * cosine is in the same units for every CLIP (100 for OpenAI's and OpenCLIP's
    # large models, where training clamps it; a model without one is taken to be at that clamp).
    logit_scale: float = 100.0
    pieces: "PieceEncoder" = field(init=False)

    def __post_init__(self) -> None:
        self.pieces = PieceEncoder(self.tokenizer)

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def tokenize(self, text: str) -> list[int]:
        """[start] + BPE ids + [end], truncated to the context length like the tokenizer does."""
        ids = [self.tokenizer.sot_token_id] + self.pieces.encode(text) + [self.tokenizer.eot_token_id]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length]
            ids[-1] = self.tokenizer.eot_token_id
        return ids

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalized text features (N, D)."""
        return self.text.encode_ids([self.tokenize(t) for t in texts])

    @torch.no_grad()  # not inference_mode: the features are targets that later enter autograd
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Normalized image features (N, D) of PIL images, each image encoded alone: matrix
        products round differently with the number of rows, so encoding images together would
        make an image's features (and so its prompt) depend on its neighbours in a batch job,
        a group or a Ray block. The image tower runs once per image whatever the job."""
        if self.clip is None:
            raise RuntimeError("the image tower was already released")
        feats = [F.normalize(self.clip.encode_image(self.preprocess(im)[None].to(self.device)).float(), dim=-1)
                 for im in images]
        return torch.cat(feats) if feats else torch.empty(0, self.text.output_dim, device=self.device)

    def release_image_tower(self) -> None:
        """Drop everything but the text tower so only it stays in memory during the loop. Once
        is enough: a later call costs nothing (a full gc.collect() takes 0.15 s with torch loaded,
        which every group of a batch once paid)."""
        if self.clip is None:
            return
        self.clip = None
        self.preprocess = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# text_cfg keys that make open_clip build a Hugging Face tokenizer or text model. Those load
# files (and, with trust_remote_code, Python code) from the model folder or the Hub, and PEZ
# needs CLIP's own BPE vocabulary anyway, so such configs are refused before anything loads.
HF_TEXT_KEYS = ("hf_tokenizer_name", "hf_model_name", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "tokenizer_mode")
# tokenizer_kwargs that open_clip's BPE tokenizer may take from a config (plain data).
TOKENIZER_KWARGS = ("clean",)
# The text cleaning functions open_clip's BPE tokenizer knows (open_clip.tokenizer.get_clean_fn).
CLEAN_FUNCTIONS = ("lower", "whitespace", "canonicalize")
CONFIG_FILE = "open_clip_config.json"


def _has_key(tree: Any, key: str) -> bool:
    if isinstance(tree, dict):
        return key in tree or any(_has_key(v, key) for v in tree.values())
    if isinstance(tree, list):
        return any(_has_key(v, key) for v in tree)
    return False


def _read_config_file(path: str, name: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model {name!r}: cannot read {CONFIG_FILE} ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelError(f"model {name!r}: {CONFIG_FILE} has no model_cfg object")
    return config["model_cfg"]


def model_config(name: str, offline: bool = False) -> dict[str, Any]:
    """The architecture config (model_cfg) of a model name, read by pez itself: the folder's
    or the Hub repository's open_clip_config.json (only that file), or open_clip's built-in.
    offline: the Hub was found out of reach (the error says so)."""
    import open_clip

    schema, ident, tag = split_model_name(name)
    if schema == "local-dir":
        return _read_config_file(os.path.join(os.path.expanduser(ident), CONFIG_FILE), name)
    if schema == "hf-hub":
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(repo_id=ident, filename=CONFIG_FILE)
        except Exception as e:
            raise ModelError(hub.cannot_fetch(f"model {name!r}", e, offline, OFFLINE_HINT.format(name=name))) from None
        return _read_config_file(path, name)
    cfg = open_clip.get_model_config(ident)
    if cfg is None:
        raise ModelError(_unknown(ident, open_clip.list_models(), "architecture"))
    return cfg


def check_model_config(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """Refuse configs that would make open_clip load a non-CLIP tokenizer or text model (and
    possibly run code shipped with the model). Returns the BPE tokenizer's keyword arguments."""
    if _has_key(cfg, "trust_remote_code"):
        raise ModelError(f"model {name!r} asks to run code from its files (trust_remote_code); pez never does")
    text = cfg.get("text_cfg") or {}
    if not isinstance(text, dict):
        raise ModelError(f"model {name!r}: text_cfg must be an object")
    hf = [k for k in HF_TEXT_KEYS if text.get(k)]
    if hf:
        raise ModelError(f"model {name!r} uses a Hugging Face text tower or tokenizer ({hf[0]}); pez needs CLIP's BPE tokenizer")
    if (cfg.get("vision_cfg") or {}).get("timm_model_pretrained"):
        raise ModelError(f"model {name!r} would download separate timm image weights (timm_model_pretrained); pez does not")
    if "multimodal_cfg" in cfg:
        raise ModelError("text towers with an appended class token (CoCa) are not supported")
    kwargs = text.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ModelError(f"model {name!r}: tokenizer_kwargs must be an object, got {kwargs!r}")
    extra = [k for k in kwargs if k not in TOKENIZER_KWARGS]
    if extra:
        raise ModelError(f"model {name!r}: unsupported tokenizer_kwargs {extra!r}")
    if "clean" in kwargs and kwargs["clean"] not in CLEAN_FUNCTIONS:
        raise ModelError(f"model {name!r}: tokenizer_kwargs clean must be one of {', '.join(CLEAN_FUNCTIONS)}, "
                         f"got {kwargs['clean']!r}")
    return dict(kwargs)


def check_shared_vocabulary(names: Sequence[str], models: Sequence["LoadedModel"]) -> None:
    """One prompt can serve several models only if they read it alike: the same vocabulary and
    the same text cleaning. A ModelError names the first two that differ."""
    def reading(m: "LoadedModel") -> tuple:
        return (m.tokenizer.vocab_size, sorted(m.info.get("tokenizer", {}).items()), m.tokenizer.encoder == models[0].tokenizer.encoder)

    for name, model in zip(names[1:], models[1:]):
        if reading(model) != reading(models[0]):
            raise ModelError(f"models {names[0]!r} and {name!r} do not share a tokenizer vocabulary, "
                             "so one prompt cannot serve both")


def bpe_tokenizer(cfg: dict[str, Any], name: str):
    """open_clip's BPE tokenizer (its bundled vocabulary), built by pez from a checked config."""
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer

    kwargs = check_model_config(cfg, name)
    context = (cfg.get("text_cfg") or {}).get("context_length", DEFAULT_CONTEXT_LENGTH)
    return SimpleTokenizer(context_length=context, **kwargs)


def load_model(name: str, device: torch.device, flag: str = MODEL_FLAG) -> LoadedModel:
    """Load an open_clip model by pez's model name; errors become ModelError with a hint that
    names `flag`, the option the name came from (--judge-model for the judge)."""
    try:
        return _load_model(name, device)
    except ModelError as e:
        if flag == MODEL_FLAG:
            raise
        raise ModelError(str(e).replace(MODEL_FLAG + " ", flag + " ")) from None


def _load_model(name: str, device: torch.device) -> LoadedModel:
    check_model_name(name)
    schema, ident, tag = split_model_name(name)
    from_hub = schema == "hf-hub" or (schema is None and not os.path.isfile(os.path.expanduser(tag or "")))
    with hub.session() if from_hub else contextlib.nullcontext(False) as offline:
        cfg = model_config(name, offline)
        tokenizer = bpe_tokenizer(cfg, name)  # refuses foreign tokenizers before anything is built
        open_name, pretrained, quick_gelu = _open_clip_source(name, offline)
        model, preprocess = _create(name, open_name, pretrained, quick_gelu, device, offline)
    loaded = wrap_model(name, model, tokenizer, preprocess, device)
    loaded.info.update(open_name=open_name, quick_gelu=quick_gelu, tokenizer=check_model_config(cfg, name))
    return loaded


def _open_clip_source(name: str, offline: bool) -> tuple[str, str | None, bool]:
    """open_clip's model name, its `pretrained` argument and whether the weights need QuickGELU;
    pretrained tags are downloaded (or found cached) here, so a failure gets pez's hint."""
    import open_clip

    schema, ident, tag = split_model_name(name)
    if schema == "local-dir":
        return f"local-dir:{os.path.expanduser(ident)}", None, False
    if schema == "hf-hub":
        return name, None, False
    if tag is not None and os.path.isfile(os.path.expanduser(tag)):
        return ident, os.path.expanduser(tag), False
    _ensure_downloaded(name, ident, tag, offline)
    # Weights trained with QuickGELU (OpenAI's) need it even under the plain arch name.
    return ident, tag, bool(open_clip.get_pretrained_cfg(ident, tag).get("quick_gelu", False))


def _create(name: str, open_name: str, pretrained: str | None, quick_gelu: bool, device: torch.device, offline: bool):
    import open_clip

    try:
        with warnings.catch_warnings():  # torch's note on a checkpoint's pickle protocol would precede pez's one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            # weights_only: a .bin/.pth checkpoint is unpickled without running any code in it.
            model, _, preprocess = open_clip.create_model_and_transforms(
                open_name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu, weights_only=True
            )
    except Exception as e:  # open_clip wraps download and parse failures in many types
        if open_name.startswith("hf-hub:"):
            raise ModelError(hub.cannot_fetch(f"model {name!r}", e, offline, OFFLINE_HINT.format(name=name))) from None
        raise ModelError(f"could not load model {name!r}: {first_line(e)}") from None
    return model, preprocess


def wrap_model(name: str, model: nn.Module, tokenizer: Any, preprocess: Any, device: torch.device) -> LoadedModel:
    """A LoadedModel around an open_clip model that is already built (frozen, eval mode)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tower = TextTower(model, end_id=tokenizer.eot_token_id)
    if tokenizer.vocab_size != tower.token_embedding.weight.shape[0]:
        raise ModelError(
            f"model {name!r} has {tower.token_embedding.weight.shape[0]} token embeddings but its "
            f"tokenizer has {tokenizer.vocab_size} tokens"
        )
    scale = getattr(model, "logit_scale", None)
    scale = float(scale.detach().float().exp()) if isinstance(scale, torch.Tensor) else 100.0
    return LoadedModel(name=name, device=device, text=tower, tokenizer=tokenizer, clip=model, preprocess=preprocess,
                       logit_scale=scale)


def export_model(name: str, folder: Path) -> Path:
    """Save a loadable model as a `local-dir:` folder (config JSON + safetensors weights)."""
    from open_clip.factory import get_model_config

    folder = Path(folder).expanduser()
    if folder.exists() and any(folder.iterdir()):
        raise ModelError(f"export folder {folder} is not empty")
    loaded = load_model(name, torch.device("cpu"))
    model_cfg = get_model_config(loaded.info["open_name"])
    if model_cfg is None:
        raise ModelError(f"cannot find the architecture config of {name!r}")
    model_cfg = dict(model_cfg)
    if loaded.info["quick_gelu"]:
        model_cfg["quick_gelu"] = True
    preprocess_cfg = dict(getattr(loaded.clip.visual, "preprocess_cfg", {}) or {})
    preprocess_cfg.pop("size", None)  # follows the architecture's image size
    # open_clip loads weights as fp32 whatever they were stored as: written back in the
    # checkpoint's own dtype, an fp16 model stays its size (and its values, exactly).
    return save_local_dir(loaded.clip, model_cfg, preprocess_cfg, folder, dtype=checkpoint_dtype(name))


def save_local_dir(model: nn.Module, model_cfg: dict, preprocess_cfg: dict, folder: Path,
                   dtype: torch.dtype | None = None) -> Path:
    """Write an open_clip model in the `local-dir:` layout: config JSON + safetensors weights
    (floating ones as `dtype` when given), with the permissions the umask gives new files."""
    from safetensors.torch import save_file

    from pez_cli.files import new_file_mode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2, default=list))
    state = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    weights = folder / "open_clip_model.safetensors"
    save_file(state, str(weights))
    os.chmod(weights, new_file_mode())  # safetensors writes 0600
    return folder


# safetensors' dtype names of floating tensors.
SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_dtype(name: str) -> torch.dtype | None:
    """The floating dtype that most of a model's stored weights have (by element count), read
    from the checkpoint file it loads from (already on disk or in the cache once the model has
    loaded); None where there is no file to read."""
    path = _checkpoint_file(name)
    if path is None:
        return None
    sizes: dict[torch.dtype, int] = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                dtype = SAFETENSORS_FLOATS.get(part.get_dtype())
                if dtype is not None:
                    sizes[dtype] = sizes.get(dtype, 0) + _numel(part.get_shape())
    else:
        try:  # mapped, not read: only the dtypes are wanted
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an old (not zip) checkpoint cannot be mapped; an unreadable one fails its load first
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                return None
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                sizes[value.dtype] = sizes.get(value.dtype, 0) + value.numel()
    return max(sizes, key=sizes.get) if sizes else None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _checkpoint_file(name: str) -> str | None:
    """The weights file a model name loads from: a folder's (safetensors first), a checkpoint
    file, a pretrained tag's cached download, or a Hub repository's cached weights."""
    schema, ident, tag = split_model_name(name)
    if schema == "local-dir":
        folder = Path(os.path.expanduser(ident))
        found = [sorted(folder.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")]
        return next((str(files[0]) for files in found if files), None)
    try:
        if schema == "hf-hub":
            from huggingface_hub import hf_hub_download

            for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                with contextlib.suppress(Exception):
                    return hf_hub_download(repo_id=ident, filename=filename)
            return None
        if tag is not None and os.path.isfile(os.path.expanduser(tag)):
            return os.path.expanduser(tag)
        import open_clip
        from open_clip.pretrained import download_pretrained

        return download_pretrained(open_clip.get_pretrained_cfg(ident, tag)) or None
    except Exception:  # no file to read: the export keeps fp32
        return None


def _ensure_downloaded(name: str, arch: str, tag: str, offline: bool = False) -> None:
    """Fetch (or find cached) weights first so a failure gets pez's offline hint."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    try:
        path = download_pretrained(cfg)
    except Exception as e:
        raise ModelError(hub.cannot_fetch(f"model {name!r}", e, offline, OFFLINE_HINT.format(name=name))) from None
    if not path:
        raise ModelError(f"could not download weights for {name!r}; {OFFLINE_HINT.format(name=name)}")

"""The paper's optimization loop, re-stated faithfully, for benchmarks and equivalence tests.

This follows `optimize_prompt_loop` of the PEZ authors' code (Wen et al. 2023) step by step,
including what pez's engine does differently to be fast:
- the text tower runs on all context positions: `<start> p1..pN <end>` padded with the
  tokenizer's pad id to the full context, reading features at the end token;
- two forward passes per step: a no-grad pass scoring the projected prompt on ALL targets,
  then a gradient pass on the sampled subset (random permutation, first batch_size);
- the whole token-embedding matrix is normalized again at every step for the projection;
- one problem at a time, fp32 (or whatever dtype the model is in).
It is not used by the CLI. `allowed_ids` applies pez's token filter (the paper has none), so
the two loops can be compared token for token; without it every token may be chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pez_cli.vocab import pad_id


@dataclass
class ReferenceResult:
    best_ids: list[int]
    best_similarity: float
    step_ids: list[list[list[int]]] = field(default_factory=list)  # per step: (restarts, L) ids


def _encode_text_embedding(text: nn.Module, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The authors' `encode_text_embedding`: the full padded context, features at argmax(ids)."""
    cast = text.transformer.get_cast_dtype()
    x = embeds.to(cast) + text.positional_embedding.to(cast)  # (B, context, W)
    x = text.transformer(x, attn_mask=text.attn_mask)
    x = text.ln_final(x)
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]  # (B, W) at the end token
    proj = text.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _forward_text_embedding(text, embeds, ids, target_features):
    """(targets, prompts) cosine similarities, as the authors' `forward_text_embedding`."""
    text_features = _encode_text_embedding(text, embeds, ids)
    target_features = target_features / target_features.norm(dim=1, keepdim=True)
    text_features = text_features / text_features.norm(dim=1, keepdim=True)
    return target_features @ text_features.t()


def _nn_project(prompt: torch.Tensor, embedding: nn.Embedding, allowed: torch.Tensor | None):
    """Nearest token by cosine, normalizing the whole vocabulary matrix again every call."""
    with torch.no_grad():
        batch, length, width = prompt.shape
        queries = F.normalize(prompt.reshape(-1, width), dim=-1)
        matrix = F.normalize(embedding.weight, dim=-1)
        if allowed is not None:
            matrix = matrix[allowed]
        hits = (queries @ matrix.t()).topk(1, dim=-1).indices[:, 0]
        if allowed is not None:
            hits = allowed[hits]
        ids = hits.reshape(batch, length)
        return embedding(ids), ids


def paper_loop(
    text: nn.Module,
    tokenizer,
    target_features: torch.Tensor,
    prompt_len: int,
    steps: int,
    lr: float = 0.1,
    weight_decay: float = 0.1,
    restarts: int = 1,
    batch_size: int | None = 1,
    seed: int = 0,
    allowed_ids: torch.Tensor | None = None,
    loss_weight: float = 1.0,
    record: bool = False,
) -> ReferenceResult:
    """Run the paper's loop. `text` is an open_clip CLIP (or anything with its text modules)."""
    embedding = text.token_embedding
    device = embedding.weight.device
    context = text.positional_embedding.shape[0]
    generator = torch.Generator().manual_seed(seed)

    # initialize_prompt: random token ids, their embeddings are the parameters.
    if allowed_ids is None:
        init = torch.randint(embedding.weight.shape[0], (restarts, prompt_len), generator=generator)
    else:
        allowed_cpu = allowed_ids.cpu()
        init = allowed_cpu[torch.randint(len(allowed_cpu), (restarts, prompt_len), generator=generator)]
    prompt = embedding(init.to(device)).detach().to(embedding.weight.dtype)
    prompt.requires_grad_(True)
    # The template: <start> -1 x prompt_len <end> <pad>...; -1 marks optimized positions.
    pad = pad_id(tokenizer)
    dummy = [tokenizer.sot_token_id] + [-1] * prompt_len + [tokenizer.eot_token_id]
    dummy += [pad] * (context - len(dummy))
    dummy_ids = torch.tensor([dummy] * restarts, device=device)
    tmp = dummy_ids.clone()
    tmp[tmp == -1] = pad
    dummy_embeds = embedding(tmp).detach()

    optimizer = torch.optim.AdamW([prompt], lr=lr, weight_decay=weight_decay)
    best_sim = -1000 * loss_weight
    best_ids: list[int] = []
    result = ReferenceResult([], best_sim)
    allowed = allowed_ids.to(device) if allowed_ids is not None else None
    width = prompt.shape[-1]

    for _ in range(steps):
        if batch_size is None:
            targets = target_features
        else:
            order = torch.randperm(len(target_features), generator=generator).to(device)
            targets = target_features[order][:batch_size]

        projected, nn_indices = _nn_project(prompt, embedding, allowed)

        with torch.no_grad():  # pass 1: score the projected prompt on ALL targets
            padded = dummy_embeds.detach().clone()
            padded[dummy_ids == -1] = projected.reshape(-1, width)
            logits = _forward_text_embedding(text, padded, dummy_ids, target_features)
            per_prompt = logits.mean(dim=0)
            universal = per_prompt.max().item()
            best_index = per_prompt.argmax().item()

        tmp_embeds = projected.detach().clone()
        tmp_embeds.requires_grad = True
        padded = dummy_embeds.detach().clone()
        padded[dummy_ids == -1] = tmp_embeds.reshape(-1, width)
        logits = _forward_text_embedding(text, padded, dummy_ids, targets)  # pass 2: gradient
        loss = (1 - logits.mean()) * loss_weight
        (prompt.grad,) = torch.autograd.grad(loss, [tmp_embeds])
        optimizer.step()
        optimizer.zero_grad()

        if record:
            result.step_ids.append(nn_indices.tolist())
        if best_sim * loss_weight < universal * loss_weight:
            best_sim = universal
            best_ids = nn_indices[best_index].tolist()

    result.best_ids, result.best_similarity = best_ids, best_sim
    return result


def pez_step_ids(pez, problems: list[torch.Tensor]) -> tuple[list[list[list[list[int]]]], list]:
    """The ids pez's engine chose at every step, per problem ([problem][step] -> (restarts, L)
    ids), and its best by the ids' score (optimize.Best), as the paper's loop would choose:
    what the equivalence checks compare with `paper_reference`."""
    per_problem: list[list] = [[] for _ in problems]
    paper_best: list = []

    def record(progress) -> None:
        ids = progress.last_ids.view(len(problems), pez.settings.restarts, -1)
        for k in range(len(problems)):
            per_problem[k].append(ids[k].tolist())
        if progress.step == progress.steps:
            paper_best.extend(progress.paper_best())

    pez.solve(problems, on_progress=record)
    return per_problem, paper_best


def paper_reference(pez, targets: torch.Tensor, **kw) -> ReferenceResult:
    """The paper's loop on one problem with a Pez's model, settings and allowed tokens."""
    s = pez.settings.for_target("image")
    return paper_loop(
        pez.model.clip, pez.model.tokenizer, targets, prompt_len=s.prompt_len, steps=s.steps, lr=s.lr,
        weight_decay=s.weight_decay, restarts=s.restarts, batch_size=s.batch_size, seed=s.seed,
        allowed_ids=pez.vocab.allowed_ids, record=True, **kw,
    )

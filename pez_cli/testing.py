"""Tiny randomly initialised models for tests and device checks: no downloads, no weights.

A CLIP built from an open_clip JSON config and saved as a `local-dir:` folder, and a Stable
Diffusion pipeline built from configs with a tokenizer made from open_clip's bundled BPE
vocabulary (the vocabulary real Stable Diffusion text encoders use), and a tiny GPT-2 with a
word-level tokenizer of its own for --lm.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

# Few layers, small width, the real 49408-token vocabulary and 77-token context.
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_clip(folder: Path, seed: int = 0, cfg: dict | None = None) -> Path:
    """Build a random CLIP from `cfg` and save it in open_clip's local-dir layout."""
    import open_clip

    from pez_cli.models import save_local_dir

    cfg = cfg or TINY_CFG
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    return save_local_dir(model, cfg, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, folder)


def random_targets(n: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n random unit vectors (n, dim), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)


def clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt for transformers' CLIPTokenizer, from open_clip's BPE file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def save_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """A tiny Stable Diffusion 1.x pipeline from configs, saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    vocab_file, merges_file = clip_tokenizer_files(folder.parent / f"{folder.name}-tokenizer-src")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def _tiny_clip_text(folder: Path, projection: bool = False):
    """A CLIP tokenizer (open_clip's vocabulary) and a tiny random CLIP text model for a pipeline."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_file, merges_file = clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77, pad_token="<|endoftext|>")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    )
    return tokenizer, (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_t5():
    """A T5 tokenizer built with the tokenizers library (a unigram vocabulary of a few words and
    the letters and digits, so any prompt encodes) and a tiny random T5 encoder."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = "a photo of the red green blue cat dog on left right".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0, model_max_length=512)
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return tokenizer, encoder


def _tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )


def save_tiny_flux(folder: Path, seed: int = 0, guidance: bool = False) -> Path:
    """A tiny FLUX.1 pipeline (schnell-like; guidance=True: dev-like) from configs: a CLIP text
    model, a T5 encoder, a one-block transformer and VAE; saved with save_pretrained."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = _tiny_clip_text(folder.parent / f"{folder.name}-tokenizer-src")
    tokenizer_2, text_encoder_2 = _tiny_t5()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=guidance,
    )
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(1), text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def save_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """A tiny Stable Diffusion 3 pipeline from configs: two CLIP text models with projections, a
    T5 encoder, a one-layer transformer and VAE; saved with save_pretrained."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer, text_encoder = _tiny_clip_text(folder.parent / f"{folder.name}-tokenizer-src", projection=True)
    tokenizer_2, text_encoder_2 = _tiny_clip_text(folder.parent / f"{folder.name}-tokenizer-src", projection=True)
    tokenizer_3, text_encoder_3 = _tiny_t5()
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(4), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


# Special tokens of the word-level language-model tokenizers below.
LM_SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def word_tokenizer(words):
    """A transformers tokenizer with one token per word (and per punctuation mark), built with
    the tokenizers library: a vocabulary unlike CLIP's, as a user's language model has."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(LM_SPECIALS) + sorted(set(words) - set(LM_SPECIALS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def tiny_gpt2(tokenizer, seed: int = 0, width: int = 32, layers: int = 2, heads: int = 2, positions: int = 64):
    """A randomly initialised GPT-2 for `tokenizer`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def train_lm(model, tokenizer, texts, steps: int, batch: int = 32, lr: float = 3e-3, seed: int = 0, log=None):
    """Train a causal language model on texts, each read as [BOS] text [EOS]. Returns the losses."""
    import random

    import transformers

    from pez_cli.lm import quiet_transformers

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    losses = []
    with quiet_transformers(transformers):
        _train(model, tokenizer, texts, steps, batch, rng, opt, losses, log)
    model.eval()
    return losses


def _train(model, tokenizer, texts, steps, batch, rng, opt, losses, log):
    for step in range(steps):
        chosen = [texts[rng.randrange(len(texts))] for _ in range(batch)]
        rows = [[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
                for ids in tokenizer(chosen, add_special_tokens=False)["input_ids"]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, :len(r)] = torch.tensor(r)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"lm step {step}/{steps} loss {losses[-1]:.4f}")


def save_tiny_lm(folder: Path, words=("a", "red", "blue", "cat", "dog", "on", "the", "mat", ","), seed: int = 0,
                 texts=None, steps: int = 0) -> Path:
    """A tiny GPT-2 with a word-level tokenizer, saved with save_pretrained (the layout --lm
    reads); trained for `steps` on `texts` when given, random otherwise."""
    tokenizer = word_tokenizer(words)
    model = tiny_gpt2(tokenizer, seed)
    if texts and steps:
        train_lm(model, tokenizer, list(texts), steps, seed=seed)
    return save_lm(model, tokenizer, folder)


def save_lm(model, tokenizer, folder: Path) -> Path:
    """save_pretrained for a language model and its tokenizer, without progress bars."""
    import transformers

    from pez_cli.lm import quiet_transformers

    folder = Path(folder)
    with quiet_transformers(transformers):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def plant_in_hub_cache(folder: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Copy a model folder into the Hugging Face cache as `repo_id` at `revision` (its snapshot and
    refs/main), the way a download leaves it: what `--lm auto` then finds offline, no mocking."""
    import shutil

    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot

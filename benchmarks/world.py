"""A synthetic world whose every picture has an exact caption, and a tiny CLIP trained on it.

    python benchmarks/world.py                 # train (or reuse) the world model, print its report
    python benchmarks/world.py --steps 200 --width 64 --cache /tmp/w   # a smaller one
    python benchmarks/world.py --captions varied --export-demo pez_cli/demo_world   # `pez demo`'s

Scenes are drawn procedurally: one or two shapes (circle, square, triangle, star, diamond,
cross), each with a colour and a size, at a position, on a coloured background, captioned
e.g. "a large red circle on the left on a blue background". Each scene also carries its
structured facts, so a recovered prompt can be checked word by word.

The CLIP is an open_clip architecture built from a JSON config with the real 49408-token
vocabulary and tokenizer, trained contrastively on freshly drawn scenes (deterministic from
a seed). Captions are short, so the text tower is trained on the first TEXT_POSITIONS
positions only (the causal tower makes this exact for captions that fit). The result is saved
as an open_clip `local-dir:` folder that pez loads like any other model.

The world also has a language model (`world_lm`, `python benchmarks/world.py --lm`): a tiny
GPT-2 with its own word-level tokenizer (not CLIP's), trained on captions of scenes drawn with
another seed (in the varied world, in varied phrasings), saved with save_pretrained for --lm.
It knows how the world's captions are written, never which scene a picture shows.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = {"small": 0.16, "large": 0.3}  # radius as a share of the image side
ONE_POSITIONS = {"on the left": (0.3, 0.5), "on the right": (0.7, 0.5), "at the top": (0.5, 0.3),
                 "at the bottom": (0.5, 0.7), "in the center": (0.5, 0.5)}
IMAGE_SIZE = 64
TEXT_POSITIONS = 32  # captions are at most ~24 tokens; the tower is trained on this many
MEAN = STD = (0.5, 0.5, 0.5)


@dataclass
class Scene:
    caption: str
    background: str
    shapes: list[dict] = field(default_factory=list)  # each: shape, color, size, position

    @property
    def colors(self) -> list[str]:
        return [s["color"] for s in self.shapes] + [self.background]

    @property
    def shape_words(self) -> list[str]:
        return [s["shape"] for s in self.shapes]


def shape_colors(background: str) -> list[str]:
    """The colours a shape may have on this background: any but the background's own."""
    return [c for c in COLORS if c != background]


def random_scene(rng: random.Random) -> Scene:
    background = rng.choice(list(COLORS))
    count = rng.choice((1, 1, 2))
    palette = shape_colors(background)
    if count == 1:
        positions = [rng.choice(list(ONE_POSITIONS))]
    else:
        positions = ["on the left", "on the right"]
    shapes = [{"shape": rng.choice(SHAPES), "color": rng.choice(palette), "size": rng.choice(list(SIZES)),
               "position": pos} for pos in positions]
    return make_scene(shapes, background)


def make_scene(shapes: list[dict], background: str) -> Scene:
    """A scene with its canonical caption."""
    parts = [f"a {s['size']} {s['color']} {s['shape']} {s['position']}" for s in shapes]
    return Scene(" and ".join(parts) + f" on a {background} background", background, shapes)


def alternatives(scene: Scene) -> list[Scene]:
    """Every scene with this one's sizes and positions and any background, shape colours
    (never the background's, as scenes are drawn) and shapes: the captions an optimizer could
    write if it could only write this scene's caption form."""
    out = []
    for background in COLORS:
        choices = [[{**s, "color": c, "shape": k} for c in shape_colors(background) for k in SHAPES]
                   for s in scene.shapes]
        out.extend(make_scene(list(combo), background) for combo in itertools.product(*choices))
    return out


CAPTION_STYLES = ("fixed", "varied")


def varied_caption(scene: Scene, rng: random.Random) -> str:
    """The scene's facts in a randomly chosen phrasing: shapes in either order, the article
    optional, the position before or after its shape, the background first or last. A model
    trained on these must read what is named rather than one sentence template; the canonical
    caption (`scene.caption`) is one of the phrasings."""
    phrases = []
    for s in rng.sample(scene.shapes, len(scene.shapes)):
        thing = f"{rng.choice(('a ', ''))}{s['size']} {s['color']} {s['shape']}"
        phrases.append(f"{thing} {s['position']}" if rng.random() < 0.7 else f"{s['position']} {thing}")
    shapes = rng.choice((" and ", ", ")).join(phrases)
    form = rng.randrange(3)
    if form == 0:
        return f"{shapes} on a {scene.background} background"
    if form == 1:
        return f"a {scene.background} background with {shapes}"
    return f"{shapes}, {scene.background} background"


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if kind == "cross":
        w = r * 0.35
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(kind)


def draw(scene: Scene, size: int = IMAGE_SIZE, jitter: random.Random | None = None) -> Image.Image:
    """Render a scene; `jitter` (training only) moves shapes and sizes a little."""
    img = Image.new("RGB", (size, size), COLORS[scene.background])
    d = ImageDraw.Draw(img)
    for s in scene.shapes:
        fx, fy = ONE_POSITIONS[s["position"]]
        r = SIZES[s["size"]] * size * (len(scene.shapes) == 1 and 1.0 or 0.8)
        if jitter is not None:
            fx += jitter.uniform(-0.05, 0.05)
            fy += jitter.uniform(-0.05, 0.05)
            r *= jitter.uniform(0.9, 1.1)
        cx, cy = fx * size, fy * size
        color = COLORS[s["color"]]
        if s["shape"] == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif s["shape"] == "square":
            q = r * 0.85
            d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=color)
        else:
            d.polygon(_polygon(s["shape"], cx, cy, r), fill=color)
    return img


def scenes(seed: int, n: int) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n)]


# -- the model -----------------------------------------------------------------------------
def model_config(width: int = 128, layers: int = 3, heads: int = 4) -> dict:
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": layers, "width": width, "patch_size": 8,
                       "head_width": width // heads},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers},
    }


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    data = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(IMAGE_SIZE, IMAGE_SIZE, 3)
                        for im in images]).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (data - mean) / std


def encode_captions(model, tokens: torch.Tensor) -> torch.Tensor:
    """Text features from the first TEXT_POSITIONS positions, pooled at the end token."""
    ids = tokens[:, :TEXT_POSITIONS]
    x = model.token_embedding(ids) + model.positional_embedding[:TEXT_POSITIONS]
    x = model.transformer(x, attn_mask=model.attn_mask[:TEXT_POSITIONS, :TEXT_POSITIONS])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
    return x @ model.text_projection


@dataclass
class WorldReport:
    steps: int
    batch: int
    seed: int
    width: int
    layers: int
    final_loss: float
    heldout_top1: float  # image -> caption retrieval over a held-out batch of `heldout`
    heldout: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # every 50 steps
    logit_scale: float | None = None  # the trained model's exp(logit_scale) (None: a report from before it was kept)


def heldout_top1(model, tokenizer, n: int = 128, seed: int = 10_000) -> float:
    batch = scenes(seed, n)
    with torch.no_grad():
        img = F.normalize(model.encode_image(to_pixels([draw(s) for s in batch])), dim=-1)
        txt = F.normalize(encode_captions(model, tokenizer([s.caption for s in batch])), dim=-1)
    best = (img @ txt.T).argmax(dim=1).tolist()
    return sum(batch[i].caption == batch[j].caption for i, j in enumerate(best)) / n


# How a world CLIP's temperature is trained: "learned" (from CLIP's 1/0.07, clamped at 100; the
# tiny world models end near 18 and score captions near 0.95) or "fixed" at 100, where real CLIPs
# (OpenAI ViT-L/14, OpenCLIP ViT-H/14 and bigG) end: its cosines then spread like a real CLIP's.
LOGIT_SCALES = ("learned", "fixed")


def train(steps: int, batch: int, seed: int, width: int, layers: int, lr: float = 1e-3, log=None,
          captions: str = "fixed", logit_scale: str = "learned"):
    import open_clip

    torch.manual_seed(seed)
    cfg = model_config(width, layers)
    model = open_clip.model.CLIP(**cfg)
    if logit_scale == "fixed":
        model.logit_scale.data.fill_(math.log(100))
        model.logit_scale.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the real BPE vocabulary, 77 context
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = random.Random(seed)
    losses = []
    start = time.monotonic()
    model.train()
    for step in range(steps):
        batch_scenes = [random_scene(rng) for _ in range(batch)]
        pixels = to_pixels([draw(s, jitter=rng) for s in batch_scenes])
        texts = [s.caption if captions == "fixed" else varied_caption(s, rng) for s in batch_scenes]
        tokens = tokenizer(texts)
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(encode_captions(model, tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # Scenes with the same caption are positives of each other.
        same = torch.tensor([[a.caption == b.caption for b in batch_scenes] for a in batch_scenes], dtype=torch.float)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(float(loss), 4))
            if log:
                log(f"step {step}/{steps} loss {float(loss):.4f} ({time.monotonic() - start:.0f}s)")
    model.eval()
    top1 = heldout_top1(model, tokenizer)
    report = WorldReport(steps, batch, seed, width, layers, losses[-1], top1, 128, time.monotonic() - start, losses,
                         round(float(model.logit_scale.exp()), 3))
    return model, cfg, report


def cache_key(steps, batch, seed, width, layers, captions="fixed", logit_scale="learned") -> str:
    key = {"v": 1, "steps": steps, "batch": batch, "seed": seed, "width": width, "layers": layers,
           "image": IMAGE_SIZE, "positions": TEXT_POSITIONS}
    if captions != "fixed":  # models trained before caption styles existed keep their keys
        key["captions"] = captions
    if logit_scale != "learned":  # and so do models trained before the fixed scale existed
        key["logit_scale"] = logit_scale
    text = json.dumps(key)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


DEFAULT_CACHE = Path.home() / ".cache" / "pez-bench"


def world_model(steps=1500, batch=128, seed=0, width=128, layers=3, cache: Path = DEFAULT_CACHE, log=None,
                captions="fixed", logit_scale="learned"):
    """The trained world model's `local-dir:` folder and report, trained once and cached."""
    from pez_cli.models import save_local_dir

    folder = Path(cache) / f"world-{cache_key(steps, batch, seed, width, layers, captions, logit_scale)}"
    report_path = folder / "world.json"
    if report_path.is_file():
        return folder, WorldReport(**json.loads(report_path.read_text()))
    model, cfg, report = train(steps, batch, seed, width, layers, log=log, captions=captions, logit_scale=logit_scale)
    save_local_dir(model, cfg, {"mean": list(MEAN), "std": list(STD)}, folder)
    report_path.write_text(json.dumps(asdict(report), indent=2))  # written last: marks the cache complete
    return folder, report


# -- the language model --------------------------------------------------------------------
# Scenes whose captions train the language model are drawn from seeds this far from the CLIPs'.
LM_SEED_OFFSET = 50_000
LM_TEXTS = 20_000  # texts the language model is trained on
# What a world language model reads: "captions" (only the world's captions: it knows their
# grammar exactly) or "mixed" (everyday sentences that use the captions' words, with the
# captions a minority, as in a real language model's data: it likes fluent text whether or not
# it describes a scene).
LM_CORPORA = ("captions", "mixed")
MIXED_CAPTION_SHARE = 0.2  # captions among a mixed corpus's texts

# Everyday words of the mixed corpus, beside the captions' own.
NOUNS = ("car", "house", "dog", "cat", "book", "table", "hat", "door", "box", "ball", "cup", "bag", "chair", "bird",
         "tree", "flower", "window", "wall", "shirt", "coat", "dress", "bike", "boat", "lamp", "kite", "plate", "bowl",
         "bottle", "shoe", "scarf", "flag", "sign", "picture", "painting", "photo", "sky", "sea", "hill", "train", "bus")
PLACES = ("house", "room", "street", "page", "screen", "picture", "photo", "shelf", "garden", "stairs", "hill", "road",
          "map", "list", "stage", "bridge", "table", "wall")
PEOPLE = ("she", "he", "we", "they", "i", "my sister", "the boy", "the girl", "my friend", "the old man", "a woman",
          "the teacher", "our neighbour")
VERBS = ("saw", "bought", "found", "painted", "drew", "carried", "picked", "wanted", "liked", "lost", "made", "had",
         "wore", "sold", "kept")
ADJECTIVES = ("old", "new", "big", "little", "tiny", "huge", "bright", "dark", "pretty", "nice", "long", "short")
# Phrases that use the captions' words in other senses: things (said after a verb too), then others.
THINGS = ("the star of the show", "a diamond ring", "a circle of friends", "a square meal", "the red cross",
          "the green light", "a white lie", "the yellow pages", "a large crowd")
IDIOMS = (*THINGS, "a black cat crossed the road", "once in a blue moon", "a small world", "on the other hand",
          "at the end of the day", "in the middle of the night")
POSITION_SIDES = {"on the left": "on the left side of the", "on the right": "on the right side of the",
                  "at the top": "at the top of the", "at the bottom": "at the bottom of the", "in the center": "in the center of the"}


def everyday_sentence(rng: random.Random) -> str:
    """A sentence of everyday English that shares the captions' words (colours, sizes, shapes in
    other senses, positions, "a ... and a ...", "background") without describing a scene."""
    c = lambda: rng.choice(list(COLORS))  # noqa: E731
    n = lambda: rng.choice(NOUNS)  # noqa: E731
    adj = lambda: rng.choice(list(SIZES) + list(ADJECTIVES) + list(COLORS))  # noqa: E731
    person, verb, place = rng.choice(PEOPLE), rng.choice(VERBS), rng.choice(PLACES)
    position = rng.choice(list(ONE_POSITIONS))
    forms = (
        lambda: f"{person} {verb} a {rng.choice(list(SIZES))} {c()} {n()}",
        lambda: f"{person} {verb} a {c()} {n()} and a {adj()} {n()}",
        lambda: f"the {c()} {n()} {position}",
        lambda: f"there is a {adj()} {n()} {POSITION_SIDES[position]} {place}",
        lambda: f"a {adj()} {n()} with a {c()} {n()}",
        lambda: f"{person} {verb} the {n()} {position}",
        lambda: f"{person} drew a {c()} {rng.choice(SHAPES)} {POSITION_SIDES[position]} {place}",
        lambda: f"a photo of a {n()} on a {c()} background",
        lambda: f"{person} stood in the background with a {c()} {n()}",
        lambda: f"the {n()} in the center of the {place} is {c()}",
        lambda: f"{rng.choice(IDIOMS)}",
        lambda: f"{person} {verb} {rng.choice(THINGS)}",
        lambda: f"{person} {verb} a {adj()} {n()} , and {rng.choice(PEOPLE)} {rng.choice(VERBS)} a {c()} one",
        lambda: f"a {rng.choice(list(SIZES))} {c()} {n()} {position} of the {place}",
        lambda: f"{person} {verb} a {c()} {rng.choice(SHAPES)} on the {n()}",
    )
    return rng.choice(forms)()


def everyday_words() -> list[str]:
    words = set(NOUNS) | set(PLACES) | set(VERBS) | set(ADJECTIVES)
    for text in (*PEOPLE, *IDIOMS, *POSITION_SIDES.values(), "there is with of the one is stood drew in"):
        words.update(text.split())
    return sorted(words)


def caption_words(corpus: str = "captions") -> list[str]:
    """Every word (and the comma) a caption of either style can hold; with the mixed corpus, also
    the everyday sentences' words."""
    words = {"a", "and", "on", "background", "with", ","} | set(COLORS) | set(SHAPES) | set(SIZES)
    for position in ONE_POSITIONS:
        words.update(position.split())
    if corpus == "mixed":
        words.update(everyday_words())
    return sorted(words)


def lm_captions(seed: int, n: int, captions: str = "fixed", corpus: str = "captions") -> list[str]:
    """Texts for a world language model: captions of n scenes drawn from `seed`, phrased as the
    CLIPs of that world were trained; with the mixed corpus, most of them everyday sentences."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if corpus == "mixed" and rng.random() >= MIXED_CAPTION_SHARE:
            out.append(everyday_sentence(rng))
            continue
        scene = random_scene(rng)
        out.append(scene.caption if captions == "fixed" else varied_caption(scene, rng))
    return out


@dataclass
class LMReport:
    steps: int
    seed: int
    width: int
    layers: int
    final_loss: float
    caption_fluency: float  # mean log-probability per token (end included) of held-out true captions
    shuffled_fluency: float  # the same captions, words shuffled
    seconds: float
    corpus: str = "captions"
    everyday_fluency: float | None = None  # held-out everyday sentences (mixed corpus)


def mean_logprob(model, tokenizer, texts: list[str]) -> float:
    """Mean over texts of the log-probability per token of [BOS] text [EOS] (end included)."""
    total = 0.0
    with torch.no_grad():
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            seq = torch.tensor([[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]])
            logp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), dim=-1)
            total += float(logp[torch.arange(seq.shape[1] - 1), seq[0, 1:]].mean())
    return total / len(texts)


def lm_cache_key(steps, seed, width, layers, captions, corpus="captions") -> str:
    key = {"v": 1, "kind": "lm", "steps": steps, "seed": seed, "width": width, "layers": layers, "captions": captions,
           "texts": LM_TEXTS, "words": caption_words(corpus)}
    if corpus != "captions":  # language models trained before the mixed corpus keep their keys
        key["corpus"] = corpus
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]


def world_lm(steps=1500, seed=0, width=64, layers=2, captions="fixed", cache: Path = DEFAULT_CACHE, log=None,
             corpus="captions"):
    """The world language model's folder (save_pretrained) and report, trained once and cached."""
    from pez_cli.testing import save_lm, tiny_gpt2, train_lm, word_tokenizer

    folder = Path(cache) / f"lm-{lm_cache_key(steps, seed, width, layers, captions, corpus)}"
    report_path = folder / "world_lm.json"
    if report_path.is_file():
        return folder, LMReport(**json.loads(report_path.read_text()))
    start = time.monotonic()
    tokenizer = word_tokenizer(caption_words(corpus))
    model = tiny_gpt2(tokenizer, seed, width=width, layers=layers, heads=2, positions=48)
    texts = lm_captions(LM_SEED_OFFSET + seed, LM_TEXTS, captions, corpus)
    losses = train_lm(model, tokenizer, texts, steps, batch=64, seed=seed, log=log)
    heldout = [s.caption for s in scenes(LM_SEED_OFFSET + seed + 1, 256)]
    rng = random.Random(seed)
    shuffled = [" ".join(rng.sample(c.split(), len(c.split()))) for c in heldout]
    everyday = None
    if corpus == "mixed":
        other = random.Random(LM_SEED_OFFSET + seed + 2)
        everyday = round(mean_logprob(model, tokenizer, [everyday_sentence(other) for _ in range(256)]), 4)
    report = LMReport(steps, seed, width, layers, round(losses[-1], 4), round(mean_logprob(model, tokenizer, heldout), 4),
                      round(mean_logprob(model, tokenizer, shuffled), 4), round(time.monotonic() - start, 1), corpus,
                      everyday)
    save_lm(model, tokenizer, folder)
    report_path.write_text(json.dumps(asdict(report), indent=2))  # written last: marks the cache complete
    return folder, report


# Scenes shipped with `pez demo` are drawn from this seed: neither model saw them.
DEMO_SEED = 30_000
DEMO_SCENES = 4


def export_demo(dest: Path, clip_folder: Path, lm_folder: Path, n: int = DEMO_SCENES) -> Path:
    """Write pez's offline demo world (pez_cli/demo_world): the CLIP in fp16 safetensors
    (`local-dir:` layout), the language model, and n held-out scenes with their captions."""
    import shutil

    from safetensors.torch import load_file, save_file

    dest = Path(dest)
    (dest / "clip").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(clip_folder / "open_clip_config.json", dest / "clip" / "open_clip_config.json")
    state = load_file(str(clip_folder / "open_clip_model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
              str(dest / "clip" / "open_clip_model.safetensors"))
    if (dest / "lm").exists():
        shutil.rmtree(dest / "lm")
    shutil.copytree(lm_folder, dest / "lm", ignore=shutil.ignore_patterns("world_lm.json"))
    (dest / "scenes").mkdir(exist_ok=True)
    listing = []
    drawn = scenes(DEMO_SEED, 200)
    chosen, seen = [], set()
    for scene in drawn:  # varied: one shape in n - 1 different places, then two shapes
        position = scene.shapes[0]["position"]
        if len(scene.shapes) == 1 and position not in seen and len(chosen) < n - 1:
            seen.add(position)
            chosen.append(scene)
    chosen.append(next(scene for scene in drawn if len(scene.shapes) == 2))
    for i, scene in enumerate(chosen):
        name = f"scenes/scene{i}.png"
        draw(scene).save(dest / name)
        listing.append({"image": name, "caption": scene.caption})
    (dest / "scenes.json").write_text(json.dumps(listing, indent=2) + "\n")
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--captions", choices=CAPTION_STYLES, default="fixed",
                    help="train on one caption template (fixed) or on varied phrasings of the same facts")
    ap.add_argument("--logit-scale", choices=LOGIT_SCALES, default="learned",
                    help="the CLIP's temperature: learned (as the first world models) or fixed at 100, as real CLIPs end")
    ap.add_argument("--lm-corpus", choices=LM_CORPORA, default="captions",
                    help="with --lm: train on captions only, or on everyday sentences with the captions a minority")
    ap.add_argument("--lm-width", type=int, default=64)
    ap.add_argument("--lm-layers", type=int, default=2)
    ap.add_argument("--lm-steps", type=int, default=1500)
    ap.add_argument("--samples", type=Path, help="also write a few example scenes (PNG + captions) here")
    ap.add_argument("--lm", action="store_true", help="train (or reuse) the world's language model instead")
    ap.add_argument("--export-demo", type=Path, metavar="DIR",
                    help="write pez's offline demo world (pez_cli/demo_world) from this world's CLIP and language model")
    args = ap.parse_args(argv)
    if args.export_demo:
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        clip, _ = world_model(args.steps, args.batch, args.seed, args.width, args.layers, args.cache, log=log,
                              captions=args.captions)
        lm, _ = world_lm(seed=args.seed, captions=args.captions, cache=args.cache, log=log)
        print(export_demo(args.export_demo, clip, lm))
        return
    if args.lm:
        folder, lm_report = world_lm(args.lm_steps, seed=args.seed, width=args.lm_width, layers=args.lm_layers,
                                     captions=args.captions, cache=args.cache,
                                     log=lambda m: print(m, file=sys.stderr, flush=True), corpus=args.lm_corpus)
        print(json.dumps({"lm": str(folder), **asdict(lm_report)}, indent=2))
        return
    folder, report = world_model(args.steps, args.batch, args.seed, args.width, args.layers, args.cache,
                                 log=lambda m: print(m, file=sys.stderr, flush=True), captions=args.captions,
                                 logit_scale=args.logit_scale)
    print(json.dumps({"model": f"local-dir:{folder}", **{k: v for k, v in asdict(report).items() if k != "losses"}}, indent=2))
    if args.samples:
        args.samples.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(scenes(10_000, 8)):
            draw(s).resize((256, 256), Image.NEAREST).save(args.samples / f"scene{i}.png")
            (args.samples / f"scene{i}.txt").write_text(s.caption + "\n")


if __name__ == "__main__":
    main()

"""--lm: a causal language model (a tiny GPT-2 with a word-level tokenizer of its own, built in
tmp_path) in the objective and the search; --init; --vocab FILE."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import LM_WORDS as WORDS
from helpers import assert_one_line_error, fast, make_image, rows_of, run, unreachable_hub_env
from pez_cli.api import Pez
from pez_cli.config import Settings

FAST = fast(steps=12, prompt_len=5)


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "x.png", (200, 30, 30))


def invert(*args):
    result = run("invert", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# -- loading ---------------------------------------------------------------------------------
def test_a_folder_loads_and_reads_text_with_its_own_tokenizer(lm_dir, load_tiny):
    from pez_cli.lm import Fluency, WordMap, load_lm

    lm = load_lm(str(lm_dir), torch.device("cpu"))
    assert lm.tokenizer.bos_token == "[BOS]" and lm.end_id == lm.tokenizer.eos_token_id
    pez = Pez(Settings(model=load_tiny().name, device="cpu"), model=load_tiny())
    words = WordMap.build(lm, pez.vocab)
    reader = Fluency(lm, words)
    trained, shuffled, unknown = reader.of(["a red cat on the mat", "mat the on cat red a", "zebra quantum"])
    assert trained > shuffled > unknown
    # Proposals are CLIP whole-word ids for the LM's words, the likeliest first.
    [after] = reader.next_words(["a red cat on the"], 3)
    texts = [pez.vocab.texts[i] for i, _ in after]
    assert texts[0] == "mat" and all(t in WORDS for t in texts)
    assert [lp for _, lp in after] == sorted((lp for _, lp in after), reverse=True)
    # Each distinct text is read once per run.
    calls = []
    original = reader._read_batch
    reader._read_batch = lambda texts, seqs: (calls.append(len(texts)), original(texts, seqs))
    reader.of(["a red cat on the mat", "a blue dog", "a blue dog"])
    assert calls == [1]


def test_the_language_model_reads_in_bf16_where_the_cpu_computes_it(lm_dir, load_tiny, monkeypatch):
    """On a CPU with native bf16 (oneDNN says) the language model loads in bf16, which reads
    text as fp32 does to bf16's precision; on one without, it stays fp32 (bf16 is emulated there)."""
    from pez_cli.lm import Fluency, WordMap, load_lm

    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    lm = load_lm(str(lm_dir), torch.device("cpu"))
    assert next(lm.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    with monkeypatch.context() as patched:
        patched.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        full = load_lm(str(lm_dir), torch.device("cpu"))
    assert next(full.model.parameters()).dtype == torch.float32
    words = WordMap.build(lm, Pez(Settings(model=load_tiny().name, device="cpu"), model=load_tiny()).vocab)
    texts = ["a red cat on the mat", "mat the on cat red a", "a blue dog"]
    assert Fluency(lm, words).of(texts) == pytest.approx(Fluency(full, words).of(texts), abs=0.05)


def test_code_in_a_model_folder_is_refused_and_never_run(lm_dir, tiny_model, image, tmp_path):
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(lm_dir, folder)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    result = run("invert", image, "--model", tiny_model, "--lm", folder, *FAST)
    assert_one_line_error(result, 1, r"asks to run code from its files \(auto_map in config.json\); pez never does")
    assert not marker.exists()


def test_missing_malformed_and_offline_models_fail_in_one_line(tiny_model, image, tmp_path):
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--lm", tmp_path / "nope", *FAST), 1,
                          r"language model folder not found: .*nope")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--lm", tmp_path / "empty", *FAST), 1,
                          r"language model folder .*empty has no config.json \(write it with save_pretrained\)")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--lm", broken, *FAST), 1,
                          r"could not load language model .*broken")
    # HF_HUB_OFFLINE=1 (set for every test): a hub id that is not cached.
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--lm", "gpt2", *FAST), 1,
                          r"language model 'gpt2' is not in the local cache and offline mode is on \(HF_HUB_OFFLINE\); "
                          r"point --lm at a local copy \(where there is network: pez export MODEL DIR --lm gpt2")


def test_the_language_model_reads_words_by_the_vocabularys_one_rule(load_tiny):
    """What counts as a whole word has one owner (vocab.word_shape): the language model's word
    map takes a token as a word exactly when the vocabulary's rule does (with --vocab all too: a
    superscript digit was a word to the language model's rule and not to the vocabulary's)."""
    from pez_cli.lm import _is_word
    from pez_cli.vocab import word_shape

    model = load_tiny()
    vocab = Pez(Settings(model=model.name, device="cpu", vocab="all", lm="none"), model=model).vocab
    ends = [i for i, piece in sorted(vocab.tokenizer.decoder.items()) if piece.endswith("</w>")]
    tokens = {vocab.texts[i]: i for i in ends}  # a word's own token (not the piece that starts a longer one)
    for text, expected in (("cat", True), ("7", True), (",", True), ("!", False), ("\u00b2", False)):
        token = tokens[text]  # "\u00b2" (superscript two) is a digit to Python, not a word to CLIP's printing
        assert _is_word(vocab, token) == word_shape(vocab.tokenizer, token, text) == expected, text


@pytest.mark.parametrize("start", ["", "a red cat"])
def test_growing_texts_read_as_the_whole_texts_do(lm_dir, load_tiny, start):
    """The beam's reader (lm.Growing) reads each grown text from its parent's kept keys and
    values: the same log-probabilities, end-of-text probability and proposals as reading the
    whole text, also where two texts grow from one parent; and so when the texts start from a
    given text (--t5-prompt's search starts from the printed prompt), that text included."""
    from pez_cli.lm import Fluency, Growing, WordMap, load_lm

    lm = load_lm(str(lm_dir), torch.device("cpu"))
    model = load_tiny()
    vocab = Pez(Settings(model=model.name, device="cpu", lm="none"), model=model).vocab
    words = WordMap.build(lm, vocab)
    growing, whole = Growing(Fluency(lm, words), 2, start), Fluency(lm, words)
    ids: list[list[int]] = [vocab.tokenizer.encode(start)] * 2
    for parents, picks in ((None, None), ([0, 0], [0, 1]), ([0, 1], [0, 0]), ([1, 0], [2, 0]), ([0, 1], [0, 1])):
        if parents is not None:
            readings = growing.readings([vocab.decode(i) for i in ids])
            chosen = [readings[p].next[k][0] for p, k in zip(parents, picks)]
            growing.grow(parents, chosen)
            ids = [ids[p] + [w] for p, w in zip(parents, chosen)]
        texts = [vocab.decode(i) for i in ids]
        if not start and parents is None:
            continue  # two empty texts: nothing to read whole
        for got, want in zip(growing.readings(texts), whole.read(texts)):
            assert got.count == want.count and got.total == pytest.approx(want.total, abs=1e-4)
            assert got.end == pytest.approx(want.end, abs=1e-4)
            assert [w for w, _ in got.next[:3]] == [w for w, _ in want.next[:3]]
    assert len(set(texts)) == 2 and all(t.startswith(start) and len(t.split()) == len(start.split()) + 4 for t in texts)


@pytest.mark.slow
def test_an_unreachable_hub_fails_at_once_for_a_language_model(tiny_model, image, tmp_path):
    env = unreachable_hub_env(tmp_path / "hf")
    done = subprocess.run([sys.executable, "-m", "pez_cli", "invert", str(image), "--model", tiny_model, "--lm",
                           "HuggingFaceTB/SmolLM2-135M", *FAST], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be reached" in lines[0] and "--lm" in lines[0], done.stderr


def test_without_transformers_the_error_gives_the_pip_command(tiny_model, image, lm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--lm", lm_dir, *FAST), 1,
                          r"--lm needs transformers; install it with: pip install 'pez-cli\[lm\]'")


# -- the default language model -------------------------------------------------------------
def test_the_default_language_model_is_used_when_it_is_in_the_hub_cache(tiny_model, image, lm_dir):
    """--lm auto (the default) finds the preset's language model in the Hugging Face cache, as a
    download leaves it (planted there, offline, no mocking), and records it with its revision."""
    from pez_cli.config import DEFAULT_LM
    from pez_cli.testing import plant_in_hub_cache

    plant_in_hub_cache(lm_dir, DEFAULT_LM, revision="1" * 40)
    result = run("invert", image, "--model", tiny_model, *FAST, "--json")
    assert result.exit_code == 0 and "note" not in result.stderr, result.stderr
    data = json.loads(result.stdout)
    assert (data["lm"], data["lm_revision"]) == (DEFAULT_LM, "1" * 40) and data["fluency"] is not None
    named = invert(image, "--model", tiny_model, "--lm", DEFAULT_LM, *FAST)  # naming it is the same job
    assert (named["prompt"], named["settings_id"]) == (data["prompt"], data["settings_id"])
    for off in (["--no-lm"], ["--lm", "none"], ["--preset", "paper", "--vocab", "words", "--refine", "3"]):
        plain = invert(image, "--model", tiny_model, *off, *FAST)
        assert plain["lm"] is None and plain["fluency"] is None and "lm_revision" not in plain, off


def test_without_the_default_language_model_one_line_says_so_and_the_run_goes_on(tiny_model, image):
    from pez_cli.config import DEFAULT_LM

    result = run("invert", image, "--model", tiny_model, *FAST, "--json")  # an empty cache, offline
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: no language model") and DEFAULT_LM in lines[0], lines
    assert "HF_HUB_OFFLINE" in lines[0] and "--lm none" in lines[0] and len(lines[0]) < 300
    data = json.loads(result.stdout)
    plain = invert(image, "--model", tiny_model, "--no-lm", *FAST)  # what it did: plain PEZ, the same job
    assert (data["prompt"], data["settings_id"], data["lm"]) == (plain["prompt"], plain["settings_id"], None)
    assert run("invert", image, "--model", tiny_model, "--no-lm", *FAST).stderr == ""
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--lm", DEFAULT_LM, *FAST), 1,
                          f"language model '{DEFAULT_LM}' is not in the local cache and offline mode is on")


def test_the_loop_runs_plain_pez_steps_when_no_language_model_is_found(tiny_model, lm_dir):
    from pez_cli.config import DEFAULT_LM
    from pez_cli.testing import plant_in_hub_cache

    alone = Pez(Settings(model=tiny_model, device="cpu"))  # --lm auto, offline, nothing cached
    assert (alone.settings.lm, alone.settings.steps, alone.settings.identity()["steps"]) == ("none", 1000, 1000)
    plant_in_hub_cache(lm_dir, DEFAULT_LM)
    found = Pez(Settings(model=tiny_model, device="cpu"))
    assert (found.settings.lm, found.settings.steps, found.settings.identity()["steps"]) == (DEFAULT_LM, 100, 100)


def test_export_copies_the_language_model_for_a_machine_without_network(tiny_model, image, lm_dir, tmp_path):
    from pez_cli.config import DEFAULT_LM
    from pez_cli.testing import plant_in_hub_cache

    plant_in_hub_cache(lm_dir, DEFAULT_LM)
    done = run("export", tiny_model, tmp_path / "out", "--lm", "auto")
    assert done.exit_code == 0, done.stderr
    model, lm = done.stdout.splitlines()
    assert model == f"local-dir:{(tmp_path / 'out').resolve()}" and lm == str((tmp_path / "out" / "lm").resolve())
    assert sorted(p.name for p in (tmp_path / "out" / "lm").iterdir()) == sorted(p.name for p in lm_dir.iterdir())
    copied = invert(image, "--model", model, "--lm", lm, *FAST)
    assert copied["prompt"] == invert(image, "--model", tiny_model, *FAST)["prompt"] and copied["lm"] == lm


def test_rows_made_without_the_default_language_model_are_redone_once_it_is_there(tiny_model, images, lm_dir, tmp_path):
    from pez_cli.config import DEFAULT_LM
    from pez_cli.testing import plant_in_hub_cache

    out = tmp_path / "rows.jsonl"
    first = run("batch", *images[:2], "--out", out, "--model", tiny_model, *FAST)
    assert first.exit_code == 0 and "2 done" in first.stderr and "note: no language model" in first.stderr, first.stderr
    assert [r["lm"] for r in rows_of(out)] == [None, None]
    plant_in_hub_cache(lm_dir, DEFAULT_LM)
    second = run("batch", *images[:2], "--out", out, "--model", tiny_model, *FAST)
    assert second.exit_code == 0 and "2 done, 0 already done" in second.stderr and "note" not in second.stderr
    assert sorted(r["lm"] or "" for r in rows_of(out)) == ["", "", DEFAULT_LM, DEFAULT_LM]
    third = run("batch", *images[:2], "--out", out, "--model", tiny_model, *FAST)
    assert "0 done, 2 already done" in third.stderr, third.stderr


def test_an_lm_folder_is_one_job_under_any_spelling_and_retrained_weights_redo_its_rows(
        tiny_model, images, lm_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.chdir(tmp_path)
    shutil.copytree(lm_dir, tmp_path / "lm")
    out = tmp_path / "rows.jsonl"
    first = run("batch", *images[:2], "--out", out, "--model", tiny_model, *FAST, "--lm", "./lm")
    assert first.exit_code == 0 and "2 done" in first.stderr, first.stderr
    for spelling in ("lm/", tmp_path / "lm", f"{tmp_path}/./lm/"):
        again = run("batch", *images[:2], "--out", out, "--model", tiny_model, *FAST, "--lm", spelling)
        assert "0 done, 2 already done" in again.stderr, (spelling, again.stderr)
    assert len(rows_of(out)) == 2 and {r["lm"] for r in rows_of(out)} == {str(tmp_path / "lm")}
    weights = tmp_path / "lm" / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("wte.weight"))
    state[name] = state[name] * 1.5  # retrained in the same folder
    save_file(state, weights, metadata={"format": "pt"})
    redone = run("batch", *images[:2], "--out", out, "--model", tiny_model, *FAST, "--lm", "lm")
    assert "2 done, 0 already done" in redone.stderr, redone.stderr
    assert "2 rows in --out made with an older language model" in redone.stderr


def test_the_objective_is_in_units_that_carry_across_clips():
    """CLIP's part of the objective is its logit scale times the cosine: a CLIP whose cosines
    spread 100/18 times wider at a logit scale of 18 (a toy world's CLIP) ranks texts with the
    same fluencies exactly as one at 100 (a real CLIP) does. In raw cosines the same weight
    picks differently in the two, which is what this guards against."""
    from pez_cli.objective import Objective, Space

    cosines = torch.tensor([0.300, 0.312, 0.288])  # a real CLIP: better texts are better by about 0.01
    fluency = [-3.0, -6.5, -2.5]  # nats per token: fluent, broken, fluent

    class Reader:
        def of(self, texts):
            return [fluency[int(t)] for t in texts]

    def choice(scale: float, cos: torch.Tensor, raw: bool = False) -> int:
        target = torch.tensor([[1.0, 0.0]])
        feats = torch.stack([cos, (1 - cos ** 2).sqrt()], dim=-1)  # unit vectors with these cosines to the target
        space = Space(None, None, 1.0, 0, 0, lambda texts: feats[[int(t) for t in texts]], None, 1.0 if raw else scale)
        objective = Objective([space], [target[None]], torch.ones(1, 1), 1.0, Reader(), 1.0 if not raw else 0.1)
        values = [s.value for s in objective.score([0, 0, 0], ["0", "1", "2"])]
        return max(range(3), key=values.__getitem__)

    toy = 0.9 + (cosines - 0.3) * 100 / 18  # the same texts on a toy CLIP: cosines near 0.9, 100/18 wider
    assert choice(100.0, cosines) == choice(18.0, toy) == 0
    assert choice(100.0, cosines, raw=True) != choice(18.0, toy, raw=True)  # raw cosines: the choice moves


def test_the_best_shown_during_a_run_never_falls(tiny_model, load_tiny, lm_dir, image):
    """Progress shows the best prompt by the objective that chooses it, which never falls; the
    result's objective is at least the last one shown (the search after the loop only adds)."""
    from pez_cli.cli.display import best_text
    from pez_cli.lm import load_lm

    model, lm = load_tiny(), load_lm(str(lm_dir), torch.device("cpu"))
    target = model.encode_images([__import__("PIL").Image.open(image).convert("RGB")])
    pez = Pez(Settings(model=model.name, device="cpu", steps=60, prompt_len=5, lm=str(lm_dir), lm_weight=0.5), model=model, lm=lm)
    shown = []
    [r] = pez.solve([target], on_progress=lambda p: shown.append(p.best()[0]))
    objectives = [b.objective for b in shown]
    assert len(shown) == 60 and objectives == sorted(objectives) and r.objective >= objectives[-1]
    assert len({b.printed for b in shown}) > 1  # the similarity shown moved (it may fall; the objective may not)
    assert best_text(shown[-1]).startswith(f"objective {shown[-1].objective:.2f} (similarity ")


def test_the_loop_leaves_its_candidates_to_the_language_model_until_the_best_is_asked_for(tiny_model, load_tiny, lm_dir,
                                                                                           image, monkeypatch):
    """The language model reads the loop's candidates only when someone asks for the best (a
    progress line, the end of the loop), and then only those still among each problem's LM_POOL
    best by CLIP: a batch run reads at most LM_POOL texts per image from its whole loop."""
    from pez_cli import optimize
    from pez_cli.lm import Fluency, load_lm

    model, lm = load_tiny(), load_lm(str(lm_dir), torch.device("cpu"))
    target = model.encode_images([__import__("PIL").Image.open(image).convert("RGB")])
    reads: list[list[str]] = []
    monkeypatch.setattr(Fluency, "_read", lambda self, texts, real=Fluency._read: (reads.append(list(texts)), real(self, texts))[1])
    pez = Pez(Settings(model=model.name, device="cpu", steps=40, prompt_len=5, lm=str(lm_dir), refine=0, beam=0), model=model, lm=lm)
    opt = optimize.PromptOptimizer(pez.spaces(), [pez.split(target)] * 2, pez.settings.for_target("image"), pez.fluency())
    while not opt.finished():
        opt.step()
    assert reads == [] and len(opt.scored[0]) > optimize.LM_POOL  # 40 steps, more candidates than the pool holds
    bests = opt.best()
    read = [t for batch in reads for t in batch]
    assert 0 < len(read) <= 2 * optimize.LM_POOL
    each = opt.objective.similarities([0], [bests[0].prompt])[0]
    assert bests[0].objective == pytest.approx(opt.objective.value(each, opt.objective.fluency.of([bests[0].prompt])[0]), abs=1e-4)
    opt.best()
    assert sum(len(batch) for batch in reads) == len(read)  # nothing new: nothing read again


# -- what it does ----------------------------------------------------------------------------
def test_lm_weight_0_is_exactly_a_run_without_lm(tiny_model, image, lm_dir):
    plain = invert(image, "--model", tiny_model, *FAST)
    off = invert(image, "--model", tiny_model, "--lm", lm_dir, "--lm-weight", "0", *FAST)
    assert (off["prompt"], off["token_ids"], off["similarity"]) == (plain["prompt"], plain["token_ids"], plain["similarity"])
    assert plain["fluency"] is None and off["fluency"] is None
    # Neither used a language model, so both record none and are one job (one settings id).
    assert plain["lm"] is None and off["lm"] is None and "lm_weight" not in off and "lm_revision" not in off
    assert plain["settings_id"] == off["settings_id"]


def test_the_lm_makes_the_prompt_read_as_its_text_and_reports_clip_alone(tiny_model, image, lm_dir, load_tiny):
    from pez_cli.lm import Fluency, WordMap, load_lm

    plain = invert(image, "--model", tiny_model, *FAST)
    # The tiny random CLIP's logit scale is its initial 1/0.07 (14.3): a weight of 15 lets fluency decide.
    fluent = invert(image, "--model", tiny_model, "--lm", lm_dir, "--lm-weight", "15", *FAST)
    assert all(w in WORDS for w in fluent["prompt"].split()), fluent["prompt"]
    assert fluent["round_trip"] is True
    model = load_tiny()
    lm = load_lm(str(lm_dir), torch.device("cpu"))
    reader = Fluency(lm, WordMap.build(lm, Pez(Settings(model=model.name, device="cpu"), model=model).vocab))
    assert fluent["fluency"] == pytest.approx(reader.of([fluent["prompt"]])[0], abs=1e-5)
    assert fluent["fluency"] > reader.of([plain["prompt"]])[0] + 1
    # The similarity reported is CLIP's score of the printed prompt, the LM's term left out.
    target = model.encode_images([__import__("PIL").Image.open(image).convert("RGB")])
    printed = model.encode_texts([fluent["prompt"]])
    assert fluent["similarity"] == pytest.approx(float(printed[0] @ target[0]), abs=1e-5)
    assert fluent["similarities"] == {tiny_model: fluent["similarity"]}


def test_one_reading_along_a_text_gives_each_prefix_and_estimates_its_edits(lm_dir, load_tiny):
    """Refinement reads a prompt once (Fluency.along): its total is the whole text's reading, the
    rows after each word propose what reading that prefix alone proposes, and an edit's estimated
    fluency is exact where nothing after the edit changes but the end of text (the last word
    deleted; the last word swapped or one added, with the end of text's log-probability kept)."""
    from pez_cli.lm import Fluency, WordMap, load_lm
    from pez_cli.refine import Edit, estimated_fluency

    lm = load_lm(str(lm_dir), torch.device("cpu"))
    model = load_tiny()
    vocab = Pez(Settings(model=model.name, device="cpu", lm="none"), model=model).vocab
    words = WordMap.build(lm, vocab)
    ids = vocab.tokenizer.encode("a red cat on the")
    prefixes = [vocab.decode(ids[:k]) for k in range(len(ids) + 1)]
    [along] = Fluency(lm, words).along([prefixes])
    fresh = Fluency(lm, words)
    whole = fresh.read([prefixes[-1]])[0]
    assert along.reading.count == whole.count == len(ids)
    assert along.reading.total == pytest.approx(whole.total, abs=1e-4) == pytest.approx(sum(along.word_logp), abs=1e-4)
    for k, prefix in enumerate(prefixes[1:], start=1):  # what the language model proposes after each prefix
        got, want = fresh.proposals(along.after[k:k + 1], [False])[0][:3], fresh.read([prefix])[0].next[:3]
        assert [w for w, _ in got] == [w for w, _ in want] and [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-4)
    mat, dog = (vocab.tokenizer.encode(w)[0] for w in ("mat", "dog"))
    edits = [Edit("swap", len(ids) - 1, dog), Edit("delete", len(ids) - 1), Edit("insert", len(ids), mat)]
    assert [vocab.decode(e.apply(ids)) for e in edits] == ["a red cat on dog", "a red cat on", "a red cat on the mat"]
    guesses = estimated_fluency(along, ids, edits, words, lm.end_id)
    swapped, deleted, added = fresh.read([vocab.decode(e.apply(ids)) for e in edits])
    assert guesses[1] == pytest.approx(fresh.of([vocab.decode(edits[1].apply(ids))])[0], abs=1e-4)
    for guess, exact in ((guesses[0], swapped), (guesses[2], added)):  # the end of text is after the edit: kept
        assert guess == pytest.approx((exact.total + whole.end) / (exact.count + 1), abs=1e-4)


def _read_along(lm_dir, load_tiny, text: str):
    """The tiny language model, the tiny CLIP's vocabulary, the word map between them, `text`'s
    CLIP ids and the language model's one reading along it (refinement's Fluency.along)."""
    from pez_cli.lm import Fluency, WordMap, load_lm

    lm = load_lm(str(lm_dir), torch.device("cpu"))
    model = load_tiny()
    vocab = Pez(Settings(model=model.name, device="cpu", lm="none"), model=model).vocab
    words = WordMap.build(lm, vocab)
    ids = vocab.tokenizer.encode(text)
    [along] = Fluency(lm, words).along([[vocab.decode(ids[:k]) for k in range(len(ids) + 1)]])
    return lm, vocab, words, ids, along


def test_refinement_cuts_a_run_of_words_or_the_tail_at_once(lm_dir, load_tiny):
    """A broken tail ("... the mat the red") cannot be dropped word by word when every step between
    reads worse: refinement also deletes runs of 2 to CUT_WORDS words and cuts the text short after
    each word, with the fluency estimated as for one deletion: exact for a text cut short, and for a
    run deleted the next word's log-probability exact and the words after it keeping theirs."""
    from pez_cli.lm import Fluency
    from pez_cli.refine import CUT_WORDS, cuts, estimated_fluency

    lm, vocab, words, ids, along = _read_along(lm_dir, load_tiny, "a red cat on the mat the red cat on")
    edits = cuts(ids)
    texts = [e.apply(ids) for e in edits]
    assert vocab.tokenizer.encode("a red cat on the mat") in texts  # the tail cut off
    assert vocab.tokenizer.encode("a red cat on the mat on") in texts  # a run of three deleted
    for e, t in zip(edits, texts):  # a run of 2 to CUT_WORDS neighbouring words gone, or the tail; one word kept at least
        assert e.kind == "delete" and t == ids[:e.pos] + ids[e.end:] and len(t) >= 1
        assert e.end == len(ids) or 2 <= e.end - e.pos <= CUT_WORDS
    guesses = estimated_fluency(along, ids, edits, words, lm.end_id)
    fresh = Fluency(lm, words)
    for e, t, guess in zip(edits, texts, guesses):
        if e.end == len(ids):  # cut short: exact
            assert guess == pytest.approx(fresh.of([vocab.decode(t)])[0], abs=1e-4)
        elif e.pos == 2:  # the next word read after the words before the run, the rest kept
            [cut] = fresh.along([[vocab.decode(t[:k]) for k in range(len(t) + 1)]])
            total = sum(along.word_logp[:e.pos]) + cut.word_logp[e.pos] + sum(along.word_logp[e.end + 1:])
            assert guess == pytest.approx((total + along.reading.end) / (len(t) + 1), abs=1e-4)


def test_refinement_turns_a_prompt_around_joined_by_a_word_the_lm_proposes(lm_dir, load_tiny):
    """One-word edits cannot move a phrase: refinement also tries the prompt turned around at a
    split (its later words first, with or without the split's first word), joined by nothing or by
    a word the language model proposes after the new opening."""
    from pez_cli.lm import Fluency
    from pez_cli.refine import GLUE, ROTATIONS, rotations

    lm, vocab, words, ids, along = _read_along(lm_dir, load_tiny, "the mat , a red cat")
    turned = [vocab.decode(c) for c in rotations(Fluency(lm, words), along, ids, vocab.decode)]
    assert "a red cat on the mat" in turned  # ", " dropped at the split, "on" proposed after "a red cat"
    assert "a red cat the mat" in turned  # and with no joining word
    assert len(turned) == len(set(turned)) <= ROTATIONS * (1 + GLUE)
    for text in turned:  # the prompt's words in another order, and at most one word more
        extra = text.split()
        for w in "the mat , a red cat".split():
            if w in extra:
                extra.remove(w)
        assert len(extra) <= 1, text


def test_branches_read_as_the_whole_prefix(lm_dir):
    """Fluency.branches reads each row (a text's first tokens, then new ones) from the text's kept
    keys and values: the next token's log-probabilities are those of reading the row whole, for
    GPT-2 and for a Llama (rotary positions, grouped keys and values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pez_cli.lm import Fluency, LanguageModel, load_lm
    from pez_cli.testing import word_tokenizer

    gpt2 = load_lm(str(lm_dir), torch.device("cpu"))
    tok = word_tokenizer(WORDS)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llama = LanguageModel("tiny llama", LlamaForCausalLM(config).eval(), tok, torch.device("cpu"), tok.bos_token_id,
                          tok.eos_token_id, 64)
    for lm in (gpt2, llama):
        fluency = Fluency(lm)
        texts = lm.encode(["a red cat on the mat", "the dog"])
        blue, dog, mat = (lm.encode([w])[0][0] for w in ("blue", "dog", "mat"))
        for rows in ([(0, 1, [blue]), (0, 0, [dog]), (1, 2, [mat]), (0, 6, [dog])], [(0, 3, [blue, dog]), (1, 1, [dog, mat])]):
            got = fluency.branches(texts, rows)
            assert got.shape[0] == len(rows)
            for (i, at, tokens), row in zip(rows, got):
                whole = lm.model(input_ids=torch.tensor([[lm.start_id, *texts[i][:at], *tokens]])).logits[0, -1]
                assert torch.allclose(row, torch.log_softmax(whole.float(), -1), atol=1e-5), (lm.name, i, at, tokens)


def test_refinement_grows_a_phrase_in_place_of_one(lm_dir, load_tiny):
    """One-word edits cannot change "red cat" to "blue dog" when every step between reads worse:
    refinement also replaces a phrase of two or three words with one the language model grows in
    its place (its likeliest first words, then its likeliest next), with its fluency estimated:
    the new words' log-probabilities and the next word's after them exact, the words after that
    keeping theirs (the next word given the old phrase ranked "a red background with on the
    left" above the phrase that was wanted)."""
    from pez_cli.lm import Fluency, WordMap, load_lm
    from pez_cli.refine import phrases

    lm = load_lm(str(lm_dir), torch.device("cpu"))
    model = load_tiny()
    vocab = Pez(Settings(model=model.name, device="cpu", lm="none"), model=model).vocab
    fluency = Fluency(lm, WordMap.build(lm, vocab))
    ids = vocab.tokenizer.encode("a red cat on the mat")
    [along] = fluency.along([[vocab.decode(ids[:k]) for k in range(len(ids) + 1)]])
    [found] = phrases(fluency, [(along, ids)], len(ids) + 1)
    texts = {vocab.decode(c): guess for c, guess in found}
    assert "a blue dog on the mat" in texts
    assert len(texts) == len(found)
    assert {len(c) for c, _ in found} == {len(ids) - 1, len(ids), len(ids) + 1}
    at_end = 0
    for c, _ in found:  # two or three words grown in place of as many, one fewer or one more; the rest kept
        head = next((k for k, (a, b) in enumerate(zip(c, ids)) if a != b), min(len(c), len(ids)))
        tail = 0
        while tail < min(len(c), len(ids)) - head and c[-1 - tail] == ids[-1 - tail]:
            tail += 1
        assert abs(len(c) - len(ids)) <= 1 and len(c) - head - tail <= 3 and len(ids) - head - tail <= 4
        if tail == 0:  # grown at the end: every word and the end of text read exactly
            at_end += 1
            assert texts[vocab.decode(c)] == pytest.approx(Fluency(lm).of([vocab.decode(c)])[0], abs=1e-4)
    assert at_end
    assert all(len(c) <= len(ids) for c, _ in phrases(fluency, [(along, ids)], len(ids))[0])  # never longer than allowed
    new = vocab.tokenizer.encode("a blue dog on the mat")
    [grown] = Fluency(lm, fluency.words).along([[vocab.decode(new[:k]) for k in range(len(new) + 1)]])
    total = sum(grown.word_logp[:4]) + sum(along.word_logp[4:])  # the phrase and the word after it read exactly, the rest kept
    assert texts["a blue dog on the mat"] == pytest.approx((total + along.reading.end) / (len(ids) + 1), abs=1e-4)


def test_rephrasing_starts_from_a_later_phrase_and_completes_with_the_words_before(lm_dir, load_tiny):
    """A left-to-right search commits to the phrase CLIP likes named first: rephrase searches again
    from the best text's later phrase and completes its beams with the words before it, joined by
    a word the language model proposes. Aiming at "a red cat on the mat", the printed "the mat , a
    red cat" becomes it; the objective never falls."""
    from pez_cli import optimize
    from pez_cli.beam import rephrase
    from pez_cli.lm import load_lm

    model, lm = load_tiny(), load_lm(str(lm_dir), torch.device("cpu"))
    goal, printed = "a red cat on the mat", "the mat , a red cat"
    pez = Pez(Settings(model=model.name, device="cpu", prompt_len=8, lm=str(lm_dir), lm_weight=0.01), model=model, lm=lm)
    opt = optimize.PromptOptimizer(pez.spaces(), [pez.split(model.encode_texts([goal]))], pez.settings.for_target("text"),
                                   pez.fluency())
    [score] = opt.objective.score([0], [printed])
    bests = [optimize.Best.scored(pez.vocab.tokenizer.encode(printed), score.similarity, 0, printed, score)]
    rephrase(opt, bests, 8)
    assert bests[0].prompt == goal and bests[0].objective > score.value
    [again] = opt.objective.score([0], [goal])
    assert bests[0].objective == pytest.approx(again.value, abs=1e-6)  # scored as printed text
    unchanged = [optimize.Best.scored(pez.vocab.tokenizer.encode(goal), again.similarity, 0, goal, again)]
    rephrase(opt, unchanged, 8)
    assert unchanged[0].prompt == goal  # nothing beats the goal's own features


def test_rephrasing_ranks_a_beam_by_its_completion(lm_dir, load_tiny):
    """A rephrasing search ranks each grown beam by CLIP's term of the beam followed by its
    problem's last tail, where that is higher than the beam's own ("a small orange circle" loses to
    "a green background with" as a finished text, not once "a green background" follows it): the
    same similarities as encoding the completed text whole. And a beam keeps to the best text's
    phrase: "a" + "red" is kept when the phrase is "a red cat"."""
    from pez_cli import optimize
    from pez_cli.beam import Tail, Turn, _ahead, _Beams, _keeps_to
    from pez_cli.lm import load_lm

    model, lm = load_tiny(), load_lm(str(lm_dir), torch.device("cpu"))
    pez = Pez(Settings(model=model.name, device="cpu", prompt_len=8, lm=str(lm_dir), lm_weight=0.01), model=model, lm=lm)
    opt = optimize.PromptOptimizer(pez.spaces(), [pez.split(model.encode_texts(["a red cat on the mat"]))],
                                   pez.settings.for_target("text"), pez.fluency())
    space, objective, encode = opt.spaces[0], opt.objective, pez.vocab.tokenizer.encode
    opening = space.tokenize("a red")[:-1]
    beams = _Beams([0], [opening[1:]], [[]], [space.tower.prefix_states(torch.tensor([opening]))])
    words = [encode(w)[0] for w in ("cat", "dog", "mat", "on")]
    grid = torch.tensor([words])
    feats, _ = space.tower.grow(beams.states[0], grid)
    flat = torch.arange(len(words))
    per_text = objective.similarities_of([feats[0]], [0] * len(words))
    tail = encode("on the mat")
    ranked = _ahead(opt, beams, grid, flat, per_text, {0: Turn(opening[1:], [Tail(encode("x"), 0.0, 1), Tail(tail, 0.0, 3)], True)})
    for w, own, got in zip(words, per_text, ranked):
        whole = objective.similarities([0], [pez.vocab.decode(opening[1:] + [w] + tail)])[0]
        want = max(own, whole, key=objective.clip_value)
        assert got == pytest.approx(want, abs=1e-5)
    assert any(objective.clip_value(g) > objective.clip_value(o) + 1e-6 for g, o in zip(ranked, per_text))
    assert _ahead(opt, beams, grid, flat, per_text, {}) == per_text  # no turn: the beams' own
    phrase = encode("a red cat")
    assert _keeps_to(encode("a red"), phrase) and not _keeps_to(encode("a blue"), phrase)
    assert not _keeps_to(encode("a red cat on"), phrase)


def test_a_text_that_says_three_words_twice_is_ruled_out_and_never_grown():
    """With a language model no printed text says the same REPEAT_WORDS words twice: such a text
    loses to any other even where CLIP and the language model both like it better (a phrase said
    again is predictable, and CLIP likes a word said twice), and the beam never proposes the word
    that would make one."""
    from types import SimpleNamespace

    from pez_cli.beam import _unrepeated
    from pez_cli.objective import REPEAT_WORDS, Objective, repeats

    assert REPEAT_WORDS == 3
    assert repeats("a red star on the left , a blue star on the left".split())
    assert not repeats("a red star on the left and a blue cross on the right".split())
    assert repeats("a red star on the left and a blue star on the right".split())  # "star on the": the rule's price
    assert not repeats("on the the left".split()) and repeats("a a a a".split())
    texts = ["a red star on the left , on the left", "a red star on the left"]
    fluency = {texts[0]: -1.0, texts[1]: -2.0}  # the repeated clause reads as more fluent
    reader = SimpleNamespace(of=lambda ts: [fluency[t] for t in ts])
    sims = {texts[0]: 0.9, texts[1]: 0.8}  # and CLIP likes it better too
    space = SimpleNamespace(weight=1.0, logit_scale=10.0, score_texts=None)
    objective = Objective([space], [torch.zeros(1, 1, 2)], torch.ones(1, 1), 1.0, fluency=reader, lm_weight=1.0)
    scores = objective.finish(texts, [[sims[t]] for t in texts])
    assert scores[1].value == pytest.approx(8.0 - 2.0) and scores[0].value < scores[1].value
    assert scores[0].fluency == -1.0 and scores[0].similarity == 0.9  # its terms are reported as they are
    plain = Objective([space], [torch.zeros(1, 1, 2)], torch.ones(1, 1), 1.0)  # no language model: CLIP alone decides
    assert plain.finish(texts, [[sims[t]] for t in texts])[0].value == pytest.approx(9.0)
    spelled = ["a", "red", "star", "on", "the", "left", ","]
    proposed = [(5, -0.1), (0, -0.5), (3, -1.0)]  # "left" would say "on the left" again
    assert _unrepeated("a red star on the left , on the", proposed, spelled) == [(0, -0.5), (3, -1.0)]
    assert _unrepeated("on the", proposed, spelled) == proposed


def test_the_search_never_lowers_the_objective(tiny_model, load_tiny, lm_dir, image):
    from pez_cli.lm import load_lm

    model, lm = load_tiny(), load_lm(str(lm_dir), torch.device("cpu"))
    target = model.encode_images([__import__("PIL").Image.open(image).convert("RGB")])
    base = dict(model=model.name, device="cpu", steps=12, prompt_len=5, lm=str(lm_dir), lm_weight=0.2)
    objectives = []
    for beam, refine in ((0, 0), (4, 0), (4, 3)):
        pez = Pez(Settings(**base, beam=beam, refine=refine), model=model, lm=lm)
        [r] = pez.solve([target])
        reader = pez.fluency()
        # The objective: CLIP's logit (its scale times the cosine) plus the weight times the fluency.
        assert r.objective == pytest.approx(model.logit_scale * r.similarity + 0.2 * reader.of([r.prompt])[0], abs=1e-4)
        objectives.append(r.objective)
        assert r.fluency == pytest.approx(reader.of([r.prompt])[0], abs=1e-6)
    assert objectives[0] <= objectives[1] + 1e-9 <= objectives[2] + 2e-9


def test_stop_during_the_search_keeps_what_it_chose(tiny_model, load_tiny, lm_dir, image):
    """A front end's Stop (the page's) ends the beam or refinement as Ctrl-C does: the result is
    the best chosen so far by the objective, marked interrupted, never the raw loop's prompt
    when the beam had already chosen another."""
    import threading

    from pez_cli.lm import load_lm

    model, lm = load_tiny(), load_lm(str(lm_dir), torch.device("cpu"))
    target = model.encode_images([__import__("PIL").Image.open(image).convert("RGB")])
    base = dict(model=model.name, device="cpu", steps=12, prompt_len=5, lm=str(lm_dir), lm_weight=15)  # fluency decides

    def solve(beam, refine, stop_at=None):
        stop = threading.Event()
        stages = []

        def stage(text):
            stages.append(text)
            if stop_at and text.startswith(stop_at):
                stop.set()

        [r] = Pez(Settings(**base, beam=beam, refine=refine), model=model, lm=lm).solve([target], on_stage=stage, stop=stop)
        return r, stages

    loop, _ = solve(0, 0)
    beamed, _ = solve(4, 0)
    assert not loop.interrupted and not beamed.interrupted and beamed.objective > loop.objective  # the beam chose another
    in_beam, stages = solve(4, 3, stop_at="Writing")
    assert in_beam.interrupted and len(stages) == 1  # refinement never started
    assert (in_beam.prompt, in_beam.objective) == (loop.prompt, loop.objective)
    in_refinement, stages = solve(4, 3, stop_at="Refining")
    assert in_refinement.interrupted and in_refinement.steps_done == 12
    assert (in_refinement.prompt, in_refinement.objective) == (beamed.prompt, beamed.objective)  # the beam's choice kept


def test_lm_through_style_distill_batch_and_two_clips(tiny_model, second_model, lm_dir, images, tmp_path):
    lm = ["--lm", lm_dir, "--lm-weight", "0.5"]
    styled = run("style", *images, "--model", tiny_model, *lm, *FAST, "--template", "a tiger in the style of {}",
                 "--t5-prompt", "8")
    assert styled.exit_code == 0, styled.stderr
    prompt, filled, t5 = styled.stdout.splitlines()  # --t5-prompt's line last
    assert filled == f"a tiger in the style of {prompt}" and t5.startswith(prompt)
    distilled = run("distill", "a red cat on the mat", "--model", tiny_model, *lm, *FAST, "--json")
    assert distilled.exit_code == 0 and json.loads(distilled.stdout)["fluency"] is not None
    joint = invert(images[0], "--model", tiny_model, "--model", second_model, *lm, *FAST)
    assert set(joint["similarities"]) == {tiny_model, second_model} and joint["fluency"] is not None
    out = tmp_path / "rows.jsonl"
    lm += ["--t5-prompt", "8"]
    done = run("batch", *images[:2], "--out", out, "--model", tiny_model, *lm, *FAST)
    assert done.exit_code == 0, done.stderr
    rows = rows_of(out)
    assert [r["settings"]["lm"] for r in rows] == [str(lm_dir)] * 2
    assert [r["settings"]["t5_tokens"] for r in rows] == [8] * 2
    for row, path in zip(rows, images[:2]):  # each image's row is what `pez invert` gives it alone
        alone = invert(path, "--model", tiny_model, *lm, *FAST)
        assert (row["prompt"], row["fluency"], row["t5_prompt"]) == (alone["prompt"], alone["fluency"], alone["t5_prompt"])
        assert row["t5_prompt"].startswith(row["prompt"])


def test_lm_from_the_environment_and_a_config_file(tiny_model, lm_dir, image, tmp_path):
    from_env = run("invert", image, "--model", tiny_model, *FAST, "--json", env={"PEZ_LM": str(lm_dir)})
    assert from_env.exit_code == 0 and json.loads(from_env.stdout)["lm"] == str(lm_dir)
    config = tmp_path / "lm.toml"
    config.write_text(f'lm = "{lm_dir}"\nlm_weight = 0.3\nbeam = 2\n')
    data = invert(image, "--model", tiny_model, "--config", config, *FAST)
    assert (data["lm"], data["lm_weight"], data["beam"]) == (str(lm_dir), 0.3, 2)
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--lm-weight", "-1"), 1,
                          "lm_weight must be 0 or more, got -1.0")


# -- --init ----------------------------------------------------------------------------------
def test_init_starts_from_the_text_and_never_prints_worse(tiny_model, load_tiny, image):
    model = load_tiny()
    target = model.encode_images([__import__("PIL").Image.open(image).convert("RGB")])
    draft = "a red cat"
    drafted = Pez(Settings(model=model.name, device="cpu", steps=1, prompt_len=5, init=draft, refine=0), model=model)
    [r] = drafted.solve([target])
    ids = model.tokenizer.encode(draft)
    assert r.steps_done == 1
    # After one step the prompt is at worst the draft itself, and the draft's tokens lead the first projection.
    assert r.similarity >= float(model.encode_texts([draft])[0] @ target[0]) - 1e-6
    seen = []
    Pez(Settings(model=model.name, device="cpu", steps=1, prompt_len=5, init=draft, refine=0), model=model).solve(
        [target], on_progress=lambda p: seen.append(p.last_ids[0, :len(ids)].tolist()))
    assert seen == [ids]
    whole = Pez(Settings(model=model.name, device="cpu", steps=1, prompt_len=3, init=draft, refine=0), model=model)
    [exact] = whole.solve([target])
    assert exact.prompt == draft or exact.similarity > float(model.encode_texts([draft])[0] @ target[0])


def test_init_errors(tiny_model, image):
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--prompt-len", "2", "--init", "a red cat"), 1,
                          r"--init 'a red cat' is 3 tokens long; the prompt holds 2 \(--prompt-len\)")
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--init", " "), 1, "init must not be empty")


# -- --vocab FILE ----------------------------------------------------------------------------
def test_a_word_list_file_is_the_vocabulary(tiny_model, image, tmp_path, caplog):
    words = tmp_path / "words.txt"
    words.write_text("# my tags\nred\nBlue\nred hair\nlong_hair\nxqzvbnw\n\ncat, dog\n", encoding="utf-8")
    data = invert(image, "--model", tiny_model, "--vocab", words, "--block", "o", *FAST)
    assert set(data["prompt"].split()) <= {"red", "blue", "hair", "long", "cat"}
    assert data["round_trip"] is True and data["vocab"] == str(words)
    verbose = run("invert", image, "--model", tiny_model, "--vocab", words, *FAST, "--verbose")
    assert verbose.exit_code == 0 and "xqzvbnw" in verbose.stderr and "not one whole-word token" in verbose.stderr
    ascii_only = invert(image, "--model", tiny_model, "--vocab", words, "--ascii-only", *FAST)
    assert set(ascii_only["prompt"].split()) <= {"red", "blue", "hair", "long", "cat", "dog"}


def test_word_list_errors(tiny_model, image, tmp_path):
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--vocab", tmp_path / "none.txt"), 1,
                          r"vocab must be words, all or a word-list file; there is no file '.*none.txt'")
    junk = tmp_path / "junk.txt"
    junk.write_text("xqzvbnw\nqqqqjjjj\n")
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--vocab", junk, *FAST), 1,
                          r"no word in .*junk.txt is one whole-word token of this model's vocabulary")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00red")
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--vocab", binary, *FAST), 1,
                          r"word list .*binary.txt is not UTF-8 text")
    only_blocked = tmp_path / "red.txt"
    only_blocked.write_text("red\n")
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--vocab", only_blocked, "--block", "re", *FAST), 1,
                          "the blocklist and filters leave no token to choose from")


def test_the_beam_ranks_its_shares_with_heavier_fluency_and_the_objective_decides():
    """The beams go on in shares ranked with the fluency weighted FLUENCY_TIERS times --lm-weight
    (heaviest first); the last share, and every finished text, by the objective itself."""
    from types import SimpleNamespace

    from pez_cli import beam
    from pez_cli.objective import Objective

    assert beam._shares(64) == [21, 42, 64] and beam._shares(2) == [0, 1, 2] and beam._shares(1)[-1] == 1
    assert beam.FLUENCY_TIERS[-1] == 1.0 and list(beam.FLUENCY_TIERS) == sorted(beam.FLUENCY_TIERS, reverse=True)
    space = SimpleNamespace(weight=1.0, logit_scale=10.0)
    objective = Objective([space], [torch.zeros(1, 1, 2)], torch.ones(1, 1), 1.0, fluency=object(), lm_weight=2.0)
    assert objective.value([0.5], -2.0) == 5.0 - 4.0 and objective.value([0.5], -2.0, 3.0) == 5.0 - 12.0
    plain = Objective([space], [torch.zeros(1, 1, 2)], torch.ones(1, 1), 1.0)  # no language model: CLIP alone
    assert plain.value([0.5], -2.0, 3.0) == 5.0


# -- --t5-prompt ------------------------------------------------------------------------------
def test_the_t5_prompt_continues_the_prompt_where_the_objective_prefers_it():
    """On the demo world, with CLIP's prompt cut short (8 tokens), the T5 prompt is that prompt
    continued (every word kept, at most --t5-prompt tokens) to a text the objective scores higher;
    without --t5-prompt there is none."""
    import dataclasses

    from pez_cli.demo import demo_settings, scenes

    settings = dataclasses.replace(demo_settings(device="cpu"), prompt_len=8, t5_tokens=24).validate()
    pez = Pez(settings)
    target = pez.image_features([scenes()[1].image])  # its description does not fit 8 tokens
    [r] = pez.solve([target])
    reader = pez.fluency()
    t5_similarity = float((pez.text_features([r.t5_prompt]) @ target.T).mean())
    t5_objective = pez.model.logit_scale * t5_similarity + settings.lm_weight * reader.of([r.t5_prompt])[0]
    assert r.t5_prompt.startswith(r.prompt + " "), (r.prompt, r.t5_prompt)
    assert len(pez.model.tokenize(r.prompt)) - 2 <= 8 < len(pez.model.tokenize(r.t5_prompt)) - 2 <= 24
    assert t5_objective > r.objective, (r.prompt, r.t5_prompt)
    plain = Pez(dataclasses.replace(settings, t5_tokens=None), model=pez.models, lm=pez.lm)
    assert plain.solve([target])[0].t5_prompt is None


def test_t5_prompt_errors(tiny_model, image, lm_dir, sd_dir):
    """--t5-prompt without the language model, no longer than the prompt or longer than CLIP
    reads, or for a Stable Diffusion model without T5: one line, before any optimizing."""
    assert_one_line_error(run("invert", image, "--model", tiny_model, "--lm", "none", "--t5-prompt", "8"),
                          1, r"--t5-prompt 8 needs the language model, which is off here \(--lm none")
    base = ["invert", image, "--model", tiny_model, "--lm", lm_dir, *FAST]
    assert_one_line_error(run(*base, "--t5-prompt", "5"), 1, r"--t5-prompt must be more than --prompt-len \(5\)")
    assert_one_line_error(run(*base, "--t5-prompt", "500"), 1, r"at most \d+ for this model, got 500")
    pytest.importorskip("diffusers")
    assert_one_line_error(run(*base, "--t5-prompt", "8", "--render", "--sd-model", sd_dir), 1,
                          r"--t5-prompt is for FLUX.1 and SD3 .*has no T5 encoder")

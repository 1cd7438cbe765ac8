import pytest
import torch

from helpers import EmulatedCapture
from pez_cli.api import Pez
from pez_cli.config import Settings
from pez_cli.errors import ConfigError

SECRET = "a red cat sitting"


@pytest.fixture
def pez_factory(tiny_model, load_tiny):
    model = load_tiny()

    def make(**kw):
        kw.setdefault("model", tiny_model)
        kw.setdefault("device", "cpu")
        kw.setdefault("vocab", "all")  # the paper's loop, which these tests are about
        kw.setdefault("refine", 0)
        return Pez(Settings(**kw), model=model)

    return make


def _score(pez, ids, target):
    tok = pez.model.tokenizer
    feats = pez.model.text.encode_ids([[tok.sot_token_id, *ids, tok.eot_token_id]])
    return float(feats[0] @ target[0])


@pytest.mark.parametrize("vocab", ["words", "all"])
def test_a_text_that_reads_as_its_ids_is_not_encoded_again(pez_factory, monkeypatch, vocab):
    """The loop already has the features of a candidate whose printed text re-tokenizes to its
    ids; only the other texts are encoded to score them as printed."""
    pez = pez_factory(vocab=vocab, prompt_len=4, steps=24)
    target = pez.text_features([SECRET])
    encode = pez.model.encode_texts
    encoded: list[str] = []
    monkeypatch.setattr(pez.model, "encode_texts", lambda texts: (encoded.extend(texts), encode(texts))[1])
    [result] = pez.solve([target])
    if vocab == "words":  # every whole-word candidate reads as its ids
        assert result.round_trip and encoded == []
    else:  # any token: many candidates print as text that tokenizes otherwise, and are encoded
        assert encoded
    # Either way the printed score is the printed text's own.
    assert result.similarity == pytest.approx(float(encode([result.prompt])[0] @ target[0]), abs=1e-5)


@pytest.mark.slow
def test_known_target_is_recovered(pez_factory):
    """Target = text features of a secret prompt; PEZ finds a prompt very close to it."""
    probe = pez_factory(steps=1)
    n_tokens = len(probe.model.tokenizer.encode(SECRET))
    pez = pez_factory(prompt_len=n_tokens, steps=300)
    target = pez.text_features([SECRET])
    # Random prompts of that length sit far below (mean about 0.4 on this model).
    random_ids = pez.vocab.random_ids((20, n_tokens), torch.Generator().manual_seed(1))
    random_best = max(_score(pez, r, target) for r in random_ids.tolist())
    result = pez.distill(SECRET)
    assert result.optimized_similarity > 0.85
    assert result.optimized_similarity > random_best + 0.1
    assert result.best_step > 1


def test_best_prompt_is_kept_not_the_last(pez_factory):
    pez = pez_factory(prompt_len=4, steps=40)
    target = pez.text_features([SECRET])
    history = []
    [result] = pez.solve([target], on_progress=lambda p: history.append(p.best()[0].similarity))
    assert len(history) == 40
    assert all(b >= a for a, b in zip(history, history[1:]))
    assert history[-1] > history[0]
    assert result.optimized_similarity == pytest.approx(max(history))
    # The reported score is the score of the reported ids.
    assert _score(pez, result.token_ids, target) == pytest.approx(result.optimized_similarity, abs=1e-5)


def test_progress_every_n_steps_and_early_results(pez_factory):
    pez = pez_factory(prompt_len=4, steps=25)
    target = pez.text_features([SECRET])
    seen, snapshot = [], {}

    def on_progress(p):
        seen.append(p.step)
        if p.step == 10:
            [snapshot["r"]] = p.results()

    [final] = pez.solve([target], on_progress=on_progress, every=10)
    assert seen == [10, 20, 25]  # every 10 steps and after the last
    [short] = pez.solve([target], steps=10)
    assert snapshot["r"].token_ids == short.token_ids and snapshot["r"].steps_done == short.steps_done == 10
    assert final.steps_done == 25


def test_ctrl_c_returns_the_best_so_far(pez_factory):
    pez = pez_factory(prompt_len=4, steps=100)
    target = pez.text_features([SECRET])

    def stop_at_7(p):
        if p.step == 7:
            raise KeyboardInterrupt

    [result] = pez.solve([target], on_progress=stop_at_7)
    assert result.interrupted and result.steps_done == 7 and result.prompt
    [whole] = pez.solve([target], steps=7)
    assert whole.token_ids == result.token_ids and not whole.interrupted


def test_same_seed_same_prompt_other_seed_differs(pez_factory):
    a = pez_factory(prompt_len=6, steps=30, seed=3).distill(SECRET)
    b = pez_factory(prompt_len=6, steps=30, seed=3).distill(SECRET)
    c = pez_factory(prompt_len=6, steps=30, seed=4).distill(SECRET)
    assert a.token_ids == b.token_ids and a.prompt == b.prompt
    assert c.token_ids != a.token_ids


def test_negative_finds_a_prompt_unlike_the_target(pez_factory):
    pos = pez_factory(prompt_len=4, steps=60).distill(SECRET)
    neg = pez_factory(prompt_len=4, steps=60, negative=True).distill(SECRET)
    start = pez_factory(prompt_len=4, steps=60)
    target = start.text_features([SECRET])
    initial_ids = start.vocab.random_ids((1, 4), torch.Generator().manual_seed(0))[0].tolist()  # seed 0's first prompt
    initial = _score(start, initial_ids, target)
    assert neg.optimized_similarity < initial < pos.optimized_similarity
    assert neg.optimized_similarity < pos.optimized_similarity - 0.3


def test_blocked_and_non_ascii_tokens_are_never_chosen(pez_factory):
    pez = pez_factory(prompt_len=8, steps=40, restarts=2, block=["a", "e"], ascii_only=True)
    result = pez.distill("an aerial photo of a seaside estate")
    texts = [pez.vocab.texts[i] for i in result.token_ids]
    assert all("a" not in t and "e" not in t for t in texts)
    assert all(all(33 <= ord(ch) <= 126 for ch in t) for t in texts)


def test_several_targets_with_sampling(pez_factory):
    pez = pez_factory(prompt_len=4, steps=30, batch_size=1)
    targets = pez.text_features(["a red cat", "a blue dog", "a green bird"])
    sampled = []
    [result] = pez.solve([targets], on_progress=lambda p: sampled.append(p._optimizer.sampled))
    assert sampled[0] == [True]
    ids = result.token_ids
    tok = pez.model.tokenizer
    feats = pez.model.text.encode_ids([[tok.sot_token_id, *ids, tok.eot_token_id]])
    assert float((targets @ feats[0]).mean()) == pytest.approx(result.optimized_similarity, abs=1e-5)


def test_distill_defaults_to_8_tokens_and_images_to_16(pez_factory):
    pez = pez_factory(steps=1)
    assert len(pez.distill(SECRET).token_ids) == 8
    assert len(pez.solve([pez.text_features([SECRET])], "image")[0].token_ids) == 16
    assert len(pez_factory(steps=1, prompt_len=5).distill(SECRET).token_ids) == 5


def test_prompt_len_must_fit_the_context(pez_factory):
    with pytest.raises(ConfigError, match="prompt_len must be between 1 and 75"):
        pez_factory(prompt_len=76)
    assert pez_factory(prompt_len=75, steps=1).distill("x").token_ids.__len__() == 75


def test_bf16_precision_keeps_weights_in_bf16_and_prompts_in_fp32(tiny_model, load_tiny):
    model = load_tiny()
    pez = Pez(Settings(model=tiny_model, device="cpu", precision="bf16", prompt_len=4, steps=20), model=model)
    assert model.text.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert pez.vocab.embeddings.dtype == torch.float32
    dtypes = []
    result = pez.distill(SECRET, on_progress=lambda p: dtypes.append(p._optimizer.prompt.dtype))
    assert set(dtypes) == {torch.float32}
    assert 0.0 < result.optimized_similarity <= 1.0


def test_fp16_on_cpu_is_refused(pez_factory):
    with pytest.raises(ConfigError, match="fp16.*not supported on the CPU"):
        pez_factory(precision="fp16")


def test_compile_is_ignored_off_cuda_with_a_note(pez_factory, monkeypatch, caplog):
    """--compile applies on CUDA only (benchmarks/gpu_check.py checks it gives the same prompt
    there); on the CPU it is never called and the run is the plain one."""
    import logging

    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile was called on the CPU")

    eager = pez_factory(prompt_len=4, steps=5).distill(SECRET)
    monkeypatch.setattr(torch, "compile", refuse)
    with caplog.at_level(logging.INFO, logger="pez"):
        compiled = pez_factory(prompt_len=4, steps=5, compile=True).distill(SECRET)
    assert compiled.token_ids == eager.token_ids
    assert "--compile applies on CUDA only" in caplog.text


def test_a_step_keeps_its_state_in_place_so_it_can_be_a_cuda_graph(pez_factory):
    """A CUDA graph replays kernels on fixed addresses: every tensor a step carries to the next
    (prompts, AdamW state, bests, the step number) must be updated in place, also with sampled
    targets and two restarts. Checked on the CPU, where the graph itself is never used."""
    pez = pez_factory(prompt_len=4, steps=12, batch_size=1, restarts=2)
    targets = pez.text_features(["a red cat", "a blue dog", "a green bird"])
    seen = []

    def addresses(progress):
        opt = progress._optimizer
        state = [t for s in opt.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        carried = [*opt.prompts, opt.ids_score, opt.ids_best, opt.ids_step, opt.step_number, *state]
        seen.append((opt.graph, [t.data_ptr() for t in carried], int(opt.step_number)))

    pez.solve([targets], on_progress=addresses)
    assert all(graph is None for graph, _, _ in seen)  # no graph on the CPU
    assert [n for _, _, n in seen] == list(range(1, 13))
    assert all(ptrs == seen[1][1] for _, ptrs, _ in seen[1:])  # AdamW's state exists from step 1 on


def test_graphed_loop_picks_the_eager_ids_with_an_emulated_capture(pez_factory, monkeypatch):
    """The graphed control flow (warm-up, capture, replays, capturing again when prompts
    leave) run on the CPU with EmulatedCapture: the same ids at every step as the eager loop,
    for one target, sampled targets with restarts, and problems leaving the batch."""
    from pez_cli import optimize

    monkeypatch.setattr(optimize, "can_graph", lambda device: True)
    monkeypatch.setattr(optimize, "GraphedStep", EmulatedCapture)
    probe = pez_factory(steps=1)
    texts = ["a red cat", "a blue dog", "a green bird", "a tall tree"]
    for name, kw, problems in [("one", {}, [texts[:1]]), ("sampled", dict(batch_size=1, restarts=2), [texts]),
                               ("leaving", dict(patience=8), [texts[:1], texts[1:3], texts[3:]])]:
        targets = [probe.text_features(t) for t in problems]
        runs = {}
        for graph in (False, True):
            pez = pez_factory(prompt_len=4, steps=30, seed=3, cuda_graph=graph, **kw)
            seen = []
            EmulatedCapture.captures = 0

            def record(p, seen=seen):
                seen.append((p.last_ids.tolist(), isinstance(p._optimizer.graph, EmulatedCapture)))

            results = pez.solve(targets, on_progress=record)
            runs[graph] = ([ids for ids, _ in seen], [(r.token_ids, r.best_step, r.steps_done) for r in results])
            if graph:
                assert [g for _, g in seen][:optimize.GRAPH_WARMUP] == [False] * (optimize.GRAPH_WARMUP - 1) + [True]
                assert EmulatedCapture.captures >= 1 and (seen[-1][1] or name == "leaving"), name
        assert runs[True] == runs[False], name
        if name == "leaving":
            assert len({r[2] for r in runs[True][1]}) > 1 and EmulatedCapture.captures >= 2  # left at different steps, captured again


def test_a_failed_capture_goes_on_eagerly_with_the_same_ids(pez_factory, monkeypatch, caplog):
    """A device or driver that cannot capture the step: the run goes on without the graph,
    and gives what the eager loop gives (the capture computed nothing)."""
    from pez_cli import optimize

    class FailingCapture(EmulatedCapture):
        def __init__(self, body, weights):
            super().__init__(body, weights)  # traced part of the step, then undone, as a capture would
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(optimize, "can_graph", lambda device: True)
    monkeypatch.setattr(optimize, "GraphedStep", FailingCapture)
    target = pez_factory(steps=1).text_features(["a red cat"])
    runs = []
    for graph in (False, True):
        seen = []
        pez = pez_factory(prompt_len=4, steps=12, seed=3, cuda_graph=graph)
        with caplog.at_level("INFO", logger="pez"):
            [result] = pez.solve([target], on_progress=lambda p, seen=seen: seen.append(p.last_ids.tolist()))
        runs.append((seen, result.token_ids, result.similarity))
    assert runs[1] == runs[0]
    assert "CUDA graph capture failed (operation not permitted" in caplog.text


def test_ctrl_c_during_a_capture_is_not_taken_for_a_failed_capture(pez_factory, monkeypatch):
    """Ending an interrupted capture can raise its own RuntimeError: Ctrl-C still stops the run
    with the best prompt so far."""
    from pez_cli import optimize

    class InterruptedCapture:
        def __init__(self, body, weights):
            try:
                raise KeyboardInterrupt
            finally:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(optimize, "can_graph", lambda device: True)
    monkeypatch.setattr(optimize, "GraphedStep", InterruptedCapture)
    pez = pez_factory(prompt_len=4, steps=50, cuda_graph=True)
    result = pez.distill(SECRET)
    assert result.interrupted and result.prompt
    assert result.steps_done == optimize.GRAPH_WARMUP - 1  # the step that was capturing is not counted


def test_cuda_graph_is_a_no_op_off_cuda(pez_factory):
    plain = pez_factory(prompt_len=4, steps=10).distill(SECRET)
    graphed = pez_factory(prompt_len=4, steps=10, cuda_graph=True).distill(SECRET)
    assert graphed.token_ids == plain.token_ids and graphed.similarity == pytest.approx(plain.similarity, abs=1e-6)
    assert "cuda_graph" not in graphed.to_dict()["settings"]  # how it ran, not what it computed

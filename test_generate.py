"""Tests for generate.py: the sampler against transformers and full recomputation, the data pipeline's rules,
resume and sharding. To be merged into test_longpo.py.

    python -m pytest -q test_generate.py
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from test_longpo import HERE, make_model, torchrun, words  # noqa: F401  (make_tokenizer, make_records: longpo's)

import generate as G  # noqa: E402
import longpo  # noqa: E402


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    out = {}
    for family in ("llama", "qwen2"):
        path = make_model(str(d / family), family=family, heads=4, kv_heads=2, layers=2, hidden=32, seed=1)
        out[family] = path
    return out


def load(path, dtype=torch.float32):
    model, tok = longpo.load_model(path, dtype, attn="sdpa")
    return model.eval(), tok


def prompts_of(tok, lengths, seed=0):
    rng = random.Random(seed)
    return [longpo.render_chat(tok, [words(rng, n)])[0] for n in lengths]


def hf_generate(model, tok, prompts, eos, n):
    """transformers' own greedy generate on a left-padded batch: the independent reference."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id)[:, L:].tolist()
    res = []
    for row in out:  # generate pads finished rows after their EOS; cut at the first EOS
        cut = next((j for j, t in enumerate(row) if t in eos), None)
        res.append((row[:cut] if cut is not None else row, cut is not None))
    return res


# -----------------------------------------------------------------------------
# sampler


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_equals_transformers_generate(tiny_models, family):
    model, tok = load(tiny_models[family])
    prompts = prompts_of(tok, (5, 31, 12, 2))
    # single prompts, with the model's real EOS (a random model rarely emits it: rows run to max_new_tokens)
    for p in prompts:
        eos = [tok.eos_token_id]
        assert G.generate_tokens(model, [p], eos, 24) == hf_generate(model, tok, [p], eos, 24)
    # a padded batch with a frequent token as EOS, so that rows stop at different steps
    free = G.generate_tokens(model, prompts, [tok.eos_token_id], 24)
    eos = [free[0][0][5]]
    ours = G.generate_tokens(model, prompts, eos, 24, prefill_chunk=7)
    assert ours == hf_generate(model, tok, prompts, eos, 24)
    assert any(f for _, f in ours) and len({len(t) for t, _ in ours}) > 1  # the per-row stops were exercised
    for t, f in ours:
        assert eos[0] not in t and (f or len(t) == 24)


def test_cached_decoding_equals_full_recomputation(tiny_models):
    """Every decode step's logits equal one full forward over [prompt; tokens so far] (float64), per row of a
    left-padded batch, with a chunked prefill."""
    model, tok = load(tiny_models["llama"], torch.float64)
    prompts = prompts_of(tok, (9, 20), seed=3)
    steps = []
    orig = G.decode_one_token

    def spy(model_, token, cache, position_ids, attention_mask=None):
        logits = orig(model_, token, cache, position_ids, attention_mask)
        steps.append(logits)
        return logits

    G.decode_one_token = spy
    try:
        res = G.generate_tokens(model, prompts, [], 6, prefill_chunk=4)
    finally:
        G.decode_one_token = orig
    assert len(steps) == 5
    for b, (p, (toks, _)) in enumerate(zip(prompts, res)):
        full = torch.tensor([p + toks])
        with torch.no_grad():
            logits = model(full).logits[0]  # (T, V)
        for k, step_logits in enumerate(steps):  # step k fed toks[k]; its logits predict toks[k + 1]
            torch.testing.assert_close(step_logits[b].double(), logits[len(p) + k], rtol=1e-9, atol=1e-9)


def test_prefix_cache_reuse_equals_fresh_prefills(tiny_models):
    model, tok = load(tiny_models["llama"])
    rng = random.Random(5)
    doc = words(rng, 150)
    questions = ("what is it", "where", "who sat on the mat then")
    prompts = [longpo.render_chat(tok, [doc + "\n\n" + q])[0] for q in questions]
    fresh = [G.generate_tokens(model, [p], [], 10)[0] for p in prompts]
    p = G.common_prefix_len(prompts)
    assert p > 100 and all(len(q) > p for q in prompts)
    for group in (1, 2, 3):
        G.STATS.clear()
        reused = G.generate_with_prefix_cache(model, prompts, [], 10, group=group, prefill_chunk=32)
        assert reused == fresh
        assert G.STATS["prefill_tokens"] == p + sum(len(q) - p for q in prompts)  # the prefix once, not 3 times
    # rows that stop early leave the batch; the cache is still cropped back to a clean one-row prefix
    eos = [fresh[1][0][3]]
    fresh = [G.generate_tokens(model, [p], eos, 10)[0] for p in prompts]
    assert any(f for _, f in fresh)
    assert G.generate_with_prefix_cache(model, prompts + prompts[:1], eos, 10, group=2) == fresh + fresh[:1]


def test_nucleus_kept_set_equals_transformers_top_p():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 200, generator=g) * 3
    for temperature, top_p in ((1.0, 0.9), (0.7, 0.9), (1.3, 0.5), (0.7, 0.05)):
        probs_sort, idx = G.nucleus(logits, temperature, top_p)
        ours = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, probs_sort > 0)
        ref = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        assert torch.equal(ours, ref > -float("inf"))
        assert 1 <= ours.sum(1).min() and ours.sum(1).max() < 200
        # draws never leave the nucleus
        draws = torch.stack([G.sample(logits, temperature, top_p, g) for _ in range(300)], 1)  # (16, 300)
        assert ours.gather(1, draws).all()


def test_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (7, 7, 8))
    a = torch.stack([G.sample(logits, 0.7, 0.9, g1) for _ in range(20)])
    b = torch.stack([G.sample(logits, 0.7, 0.9, g2) for _ in range(20)])
    c = torch.stack([G.sample(logits, 0.7, 0.9, g3) for _ in range(20)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(G.sample(logits, 0.0, 0.9, g1), logits.argmax(-1))


# -----------------------------------------------------------------------------
# data rules


def test_chunks_cover_the_document_in_token_bounded_spans(tiny_models):
    _, tok = load(tiny_models["llama"])
    text = words(random.Random(2), 400)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n = len(offsets)
    spans = G.chunk_spans(offsets, text, 64)
    assert len(spans) == -(-n // 64)
    # consecutive, nothing lost or doubled: only whitespace lies between neighbouring spans
    edges = [0] + [x for span in spans for x in span] + [len(text)]
    assert all(edges[j] <= edges[j + 1] for j in range(len(edges) - 1))
    assert all(not text[edges[j]:edges[j + 1]].strip() for j in range(0, len(edges), 2))
    for s, e in spans:
        assert len(tok(text[s:e], add_special_tokens=False)["input_ids"]) <= 64 + 1
        assert text[s:e] == text[s:e].strip()
    tail = n - (len(spans) - 1) * 64
    assert len(G.chunk_spans(offsets, text, 64, min_tokens=tail + 1)) == len(spans) - 1  # short tail not sampled
    rng1, rng2 = random.Random(3), random.Random(3)
    picked = G.sample_chunks(spans, 4, rng1)
    assert picked == G.sample_chunks(spans, 4, rng2) and picked == sorted(picked) and len(picked) == 4
    assert len({tuple(s) for s in picked}) == 4 and all(s in spans for s in picked)
    assert G.sample_chunks(spans[:2], 4, rng1) == spans[:2]


def test_length_filter_boundaries():
    assert [G.in_length_range(n, 100) for n in (49, 50, 51, 100, 101)] == [False, False, True, True, False]


def test_filter_rules():
    cfg = G.GenConfig()
    assert G.reject_reason("  \n", True, cfg) == "empty"
    assert G.reject_reason("The answer is 42", False, cfg) == "cut_off"
    assert G.reject_reason("I'm sorry, but I cannot help with that.", True, cfg) == "refusal"
    assert G.reject_reason("As an AI language model, I do not know.", True, cfg) == "refusal"
    assert G.reject_reason("the crate was red and " * 10, True, cfg) == "repetitive"
    ok = "Ada Quill counted 382 crates of copper in the grey warehouse on day 12 of the spring season."
    assert G.reject_reason(ok, True, cfg) is None


def test_parse_pool():
    text = ("Here are four questions:\n1. What did Ada count in the warehouse?\n2) Who repaired the red bridge?\n"
            "- Who repaired the red bridge?\n3. Why was the road closed? 4. How much did the copper cost at the fair?\n"
            "ok\n5. When did the ferry captain")
    assert G.parse_pool(text) == ["What did Ada count in the warehouse?", "Who repaired the red bridge?",
                                  "Why was the road closed?", "How much did the copper cost at the fair?",
                                  "When did the ferry captain"]
    assert G.parse_pool(text, finished=False)[-1] == "How much did the copper cost at the fair?"
    assert G.parse_pool("") == [] and G.parse_pool("Sure!\nok") == []


def test_synthetic_corpus_lengths(tiny_models):
    _, tok = load(tiny_models["llama"])
    docs = G.synthetic_corpus(tok, 3, 600, 900, seed=1)
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for _, t in docs]
    assert all(600 < n <= 900 for n in lengths) and len({t for _, t in docs}) == 3
    assert G.synthetic_corpus(tok, 3, 600, 900, seed=1) == docs


def test_bad_corpus_messages(tmp_path, tiny_models):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SystemExit, match="empty.txt: empty file"):
        G.read_corpus(str(empty))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"long text \xff\xfe more")
    with pytest.raises(SystemExit, match=r"bad.txt: not UTF-8 text: byte 0xff at offset 10"):
        G.read_corpus(str(bad))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text")
    (folder / "b.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n')
    with pytest.raises(SystemExit, match=r"b.jsonl:2: expected a JSON object with a string field 'text'"):
        G.read_corpus(str(folder))
    with pytest.raises(SystemExit, match="no such file or folder"):
        G.read_corpus(str(tmp_path / "missing"))
    short = tmp_path / "short.txt"
    short.write_text(words(random.Random(0), 30))
    with pytest.raises(SystemExit, match=r"short.txt: no document has a token length in \(256, 512\]"):
        G.main(["--model", tiny_models["llama"], "--corpus", str(short), "--max_len", "512",
                "--out", str(tmp_path / "o.jsonl")])


# -----------------------------------------------------------------------------
# the pipeline end to end: reference log-probs, resume, sharding


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_models):
    """A tiny model whose generation config lists frequent tokens as EOS (a random model never says <|im_end|>),
    and a JSONL corpus of five documents, one of them outside the length range."""
    from transformers import GenerationConfig
    d = tmp_path_factory.mktemp("pipe")
    path = make_model(str(d / "model"), family="llama", seed=4)
    model, tok = load(path)
    free = G.generate_tokens(model, prompts_of(tok, (8, 20, 30, 14), seed=9), [tok.eos_token_id], 30)
    common = sorted({t for toks, _ in free for t in toks}, key=lambda t: -sum(x.count(t) for x, _ in free))
    gc = GenerationConfig.from_pretrained(path)
    gc.eos_token_id = [tok.eos_token_id] + common[:6]
    gc.save_pretrained(path)
    rng = random.Random(1)
    corpus = d / "corpus.jsonl"
    with open(corpus, "w") as f:
        for n in (250, 300, 40, 280, 260):
            f.write(json.dumps({"text": words(rng, n)}) + "\n")
    args = ["--model", path, "--corpus", str(corpus), "--max_len", "640", "--chunk_tokens", "96",
            "--min_chunk_tokens", "16", "--chunks_per_doc", "3", "--pool_max_new_tokens", "24",
            "--max_new_tokens", "24", "--rep_max", "0.9", "--long_group", "2"]
    return d, path, args


def run_generate(*args):
    p = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), *map(str, args)], capture_output=True,
                       text=True, timeout=300, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_pipeline_records_and_reference_logps(pipeline):
    d, path, args = pipeline
    out = d / "a.jsonl"
    log = run_generate(*args, "--out", out)
    records = longpo.read_records(str(out))
    assert 1 <= len(records) <= 4 and "outside the length range: 1" in log
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    model, tok = load(path)
    n_turns = 0
    for rec in records:
        for t in rec["turns"]:
            s, e = t["chunk"]
            user = rec["document"][s:e] + "\n\n" + t["instruction"]
            prompt = longpo.render_chat(tok, [user])[0]
            for key in ("chosen", "rejected"):
                full = longpo.render_chat(tok, [user, t[key]])[0]
                assert full[:len(prompt)] == prompt
                with torch.no_grad():  # a plain forward with full logits: independent of response_logps' chunking
                    logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)  # (T, V)
                direct = sum(logp[j - 1, full[j]].item() for j in range(len(prompt), len(full)))
                assert abs(direct - t[f"ref_{key}_logp"]) < 1e-3 * max(1.0, abs(direct))
            n_turns += 1
    assert n_turns >= 2
    # the per-reason counts are printed and add up with the kept turns
    counts = {line.split(":")[-2].strip(): int(line.rsplit(":", 1)[1]) for line in log.splitlines()
              if line.startswith("  ")}
    assert counts["turns"] == n_turns + sum(v for k, v in counts.items() if k.startswith(("chosen", "rejected",
                                                                                          "identical")))


def test_resume_and_sharding_reproduce_the_file(pipeline):
    d, path, args = pipeline
    ref = d / "ref.jsonl"
    run_generate(*args, "--out", ref)
    # a crash after one document (with a torn half-written line appended), then a restart
    out = d / "resumed.jsonl"
    log = run_generate(*args, "--out", out, "--stop_after", "1")
    assert not out.exists() and "stopping without merging" in log
    with open(d / "resumed.jsonl.parts" / "rank-00000.jsonl", "a") as f:
        f.write('{"index": 3, "record": {"id": "doc-000')
    log = run_generate(*args, "--out", out)
    assert "1 already done" in log
    assert out.read_bytes() == ref.read_bytes()
    # a finished run rerun: nothing regenerated, same file
    run_generate(*args, "--out", out)
    assert out.read_bytes() == ref.read_bytes()
    # other settings on the same parts are refused
    p = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), *args, "--out", str(out), "--seed", "1"],
                       capture_output=True, text=True, cwd=HERE)
    assert p.returncode and "--seed" in p.stderr
    # two data-parallel ranks write the same merged file
    sharded = d / "sharded.jsonl"
    torchrun(2, "generate.py", *args, "--out", sharded)
    assert sharded.read_bytes() == ref.read_bytes()
    assert len(os.listdir(d / "sharded.jsonl.parts")) == 3  # config.json and one part per rank

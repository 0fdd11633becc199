"""Side-by-side measurements for the LongPO reference implementation (arXiv 2502.13922).

Each section runs one comparison, both sides in one run, and prints rows of figures; --json saves them.

    python bench.py                                    # every CPU section
    python bench.py --only prefix_sharing decode       # some sections
    python bench.py --only gpu --json gpu.json         # on a CUDA machine: packed vs unshared, tokens/s, MFU

Timings are wall-clock on whatever else the machine is running: the two sides of a comparison alternate, so a
burst of load elsewhere hits both; read the ratios, not the absolute numbers. Training measurements run in fresh
processes (torchrun for sp = 2) so that each one's peak memory is its own.
"""

import json
import os
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

import generate
import longpo
from longpo import flag


@dataclass
class BenchConfig:
    only: list = flag([], "section names (see SECTIONS); empty = every CPU section")
    json: str = flag("", "also write the figures here")
    model: str = flag("", 'generation: local HF directory; "" = embedded SmolLM2-135M-Instruct')
    repeats: int = flag(2, "generation: runs per side; the fastest counts")
    steps: int = flag(2, "training: timed optimizer steps per measurement (after one warm-up step)")
    shape: str = flag("small", "training on CPU: random model shape (small | smollm2 | 1b)")
    tokenizer: str = flag("", "training: tokenizer directory; \"\" = the embedded model's")
    tokens: int = flag(8192, "sequence_parallel: length of the packed record")
    stages_doc: int = flag(2, "generation_stages: document of the embedded corpus (2: the first whose record keeps 2 "
                           "turns)")


def _best(fn, repeats):
    """(fastest wall time, result of the last run)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _load(model_dir, attn="longpo"):
    model, tokenizer = longpo.load_model(model_dir, torch.float32, attn=attn)
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# generation


def bench_decode(model_dir="", batch_sizes=(1, 4), new_tokens=32, repeats=2):
    """Greedy decode tokens/s of generate.generate_tokens against transformers' model.generate (its own attention
    and cache), same prompts, no EOS (every row decodes new_tokens). Decode time = time(new_tokens) - time(1
    token), so prefill is not counted."""
    from transformers import GenerationConfig
    model, tok = _load(model_dir)
    hf_model, _ = _load(model_dir, "sdpa")
    questions = ["What is the capital of France?", "Write a short poem about the sea.",
                 "Explain in two sentences why the sky is blue.", "List three uses of copper."]
    pad = tok.pad_token_id or 0
    hf_model.generation_config.eos_token_id = None  # else generate falls back to it and stops at EOS: unequal work
    figures = {}
    for B in batch_sizes:
        prompts = [longpo.render_chat(tok, [questions[b % len(questions)]])[0] for b in range(B)]
        L = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])

        def ours(n):
            return [t for t, _ in generate.generate_tokens(model, prompts, [], n)]

        def hf(n):  # eos_token_id=None: no stop, as on our side
            gc = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=pad, max_new_tokens=n)
            with torch.inference_mode():
                out = hf_model.generate(ids, attention_mask=mask, generation_config=gc)
            return out[:, L:].tolist()

        ours(2), hf(2)  # warm-up
        t, tokens = {}, {}
        for _ in range(repeats):  # the two sides alternate, so a burst of load elsewhere hits both
            for name, fn in (("ours", ours), ("hf", hf)):
                for n, key in ((1, name + "_1"), (new_tokens, name)):
                    t0 = time.perf_counter()
                    tokens[key] = fn(n)
                    t[key] = min(t.get(key, float("inf")), time.perf_counter() - t0)
        ours_tps = B * (new_tokens - 1) / (t["ours"] - t["ours_1"])
        hf_tps = B * (new_tokens - 1) / (t["hf"] - t["hf_1"])
        figures[f"B{B}_ours_decode_tok_s"] = round(ours_tps, 2)
        figures[f"B{B}_hf_generate_decode_tok_s"] = round(hf_tps, 2)
        figures[f"B{B}_ratio"] = round(ours_tps / hf_tps, 3)
        figures[f"B{B}_same_tokens"] = tokens["ours"] == tokens["hf"]
    print_row(figures)
    return figures


def _attention_calls():
    """A hook on torch's SDPA counting, per call, a materialised mask and K/V with more heads than the model's kv
    heads (copied out to the query heads). Returns (counts, undo)."""
    import torch.nn.functional as F
    real, counts = F.scaled_dot_product_attention, Counter()

    def spy(q, k, v, attn_mask=None, *args, **kw):
        counts["calls"] += 1
        counts["masks"] += isinstance(attn_mask, torch.Tensor)
        counts["kv_head_copies"] += k.shape[1] > counts.get("kv_heads", k.shape[1])
        return real(q, k, v, attn_mask, *args, **kw)
    F.scaled_dot_product_attention = spy
    return counts, lambda: setattr(F, "scaled_dot_product_attention", real)


def _old_prefill(model, ids, chunk=2048):
    """The prefill transformers' own attention makes: its SDPA attention over its DynamicCache, chunk
    tokens a forward (each chunk after the first gets a boolean mask and K/V copied out to every query head)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        for s in range(0, ids.shape[1], chunk):
            model.model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True)
    return cache


def bench_prefill(model_dir="", lengths=(4096, 8192), repeats=2):
    """A document's prefill: one forward through longpo's attention (no mask, no kv head copied; generate.fill)
    against transformers' SDPA attention over its DynamicCache in 2,048-token chunks: time, and
    the masks and kv head copies counted at torch's SDPA (the kv heads' count the model's)."""
    model, tok = _load(model_dir)
    hf_model, _ = _load(model_dir, "sdpa")
    rows = []
    for length in lengths:
        text = generate.synthetic_corpus(tok, 1, length - 64, length, seed=1)[0][1]
        ids = torch.tensor([longpo.render_chat(tok, [text])[0][:length]])
        best, counts = {}, {}
        for _ in range(repeats):  # the sides alternate
            for name in ("new", "old"):
                c, undo = _attention_calls()
                c["kv_heads"] = model.config.num_key_value_heads
                t0 = time.perf_counter()
                if name == "new":
                    generate.fill(model, generate.new_cache(model, 1, length + 1), ids)
                else:
                    _old_prefill(hf_model, ids)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
                undo()
                counts[name] = c
        row = {"tokens": ids.shape[1], "new_s": round(best["new"], 2), "old_s": round(best["old"], 2),
               "speedup": round(best["old"] / best["new"], 2)}
        for name in ("new", "old"):
            row.update({f"{name}_masks": counts[name]["masks"],
                        f"{name}_kv_head_copies": counts[name]["kv_head_copies"]})
        print_row(row)
        rows.append(row)
    return rows


def _shared_run(spec):
    """In a fresh process: `answers` greedy answers over one document of spec["tokens"] tokens, their rows reading
    one copy of its cache (shared) or each its own copy (copied): the peak RSS of the decoding above the model (the
    cache or caches included, the prefill's transients not: both sides fill the document alike), decode seconds."""
    model, tok = _load(spec["model"])
    text = generate.synthetic_corpus(tok, 1, spec["tokens"] - 64, spec["tokens"], seed=1)[0][1]
    questions = ["Who?", "Where was it?", "What was counted?", "Which town?"]
    prompts = [longpo.render_chat(tok, [text + "\n\n" + q])[0] for q in questions[:spec["answers"]]]
    p = generate.common_prefix_len(prompts)
    cache, cached = generate.prefill_prefixes(model, [prompts[0][:p]])
    held = sum(x.nbytes for x in cache.k + cache.v)  # the document's cache, then what the decoding adds to it
    base = current_rss()  # (after the prefill, whose freed memory the allocator may keep)
    _reset_hwm()
    generate.STATS.clear()
    tails = [q[p:] for q in prompts]
    if spec["mode"] == "shared":
        out = generate._generate_rows(model, cache, torch.ones(1, p, dtype=torch.bool), None, tails, [],
                                      spec["new_tokens"], 0.0, 1.0, None, None)
    else:  # a copy of the document's cache a row, as decoding a batch of rows over one cache does without sharing
        for kv in (cache.k, cache.v):
            for i, x in enumerate(kv):
                kv[i] = x.repeat(len(prompts), 1, 1, 1)  # (1, h, T, D) -> (B, h, T, D)
        out = generate._generate_rows(model, cache, torch.ones(len(prompts), p, dtype=torch.bool),
                                      list(range(len(prompts))), tails, [], spec["new_tokens"], 0.0, 1.0, None, None)
    return {"peak_mb": (held + _hwm() - base) / 2**20, "decode_s": generate.STATS["decode_s"],
            "tokens": [t for t, _ in out], "doc_tokens": p}


def bench_shared_decoding(model_dir="", lengths=(4096, 8192), answers=4, new_tokens=16):
    """4 answers of one document decoded together: their rows reading one copy of the document's KV cache (merged
    by log-sum-exps, generate_with_prefix_cache) against a copy a row; the decoding's peak memory, caches included,
    above the model (each side a fresh process) and decode time, the same tokens."""
    rows = []
    for length in lengths:
        got = {mode: _spawn({"kind": "shared", "mode": mode, "model": model_dir, "tokens": length, "answers": answers,
                             "new_tokens": new_tokens}) for mode in ("shared", "copied")}
        row = {"doc_tokens": got["shared"]["doc_tokens"], "answers": answers,
               "shared_mb": round(got["shared"]["peak_mb"], 1), "copied_mb": round(got["copied"]["peak_mb"], 1),
               "memory_ratio": round(got["shared"]["peak_mb"] / got["copied"]["peak_mb"], 3),
               "shared_decode_s": round(got["shared"]["decode_s"], 2),
               "copied_decode_s": round(got["copied"]["decode_s"], 2),
               "same_tokens": got["shared"]["tokens"] == got["copied"]["tokens"]}
        print_row(row)
        rows.append(row)
    return rows


def _sp_cache_run(spec):
    """Under torchrun (or one process): a document's cache filled over the ranks; this rank's cache bytes."""
    env = longpo.setup_distributed(spec["sp"])
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("llama", vocab_size=8192, max_position_embeddings=1 << 20, **spec["shape"])
    torch.manual_seed(0)
    longpo.register_attention()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="longpo").eval()
    cache = generate.new_cache(model, 1, spec["tokens"] + env.sp, env.sp_group)
    generate.fill(model, cache, torch.randint(0, 8192, (1, spec["tokens"]), generator=torch.Generator().manual_seed(0)))
    out = {"cache_mb": sum(x.nbytes for x in cache.k + cache.v) / 2**20}
    longpo.teardown_distributed()
    return out


def bench_sp_cache(tokens=8192):
    """A document's KV cache a rank, its prefill spread over 2 ranks against 1: a model whose kv heads split evenly
    (8 query / 2 kv heads) and SmolLM2's shape (9 / 3: a kv head on both ranks)."""
    rows = []
    for name, shape in (("small 8/2", SMALL), ("smollm2 9/3", dict(SMOLLM2, num_hidden_layers=4))):
        one, two = (_spawn({"kind": "sp_cache", "shape": shape, "tokens": tokens, "sp": sp}, nproc=sp)["cache_mb"]
                    for sp in (1, 2))
        rows.append({"model": name, "tokens": tokens, "sp1_cache_mb": round(one, 2), "sp2_cache_mb": round(two, 2),
                     "ratio": round(two / one, 3)})
        print_row(rows[-1])
    return rows


def bench_cache_reuse(model_dir="", doc_tokens=4096, n_instructions=4, new_tokens=8, repeats=1):
    """Answering n_instructions over one document of about doc_tokens tokens: the document's KV cache filled once
    and read by every answer (generate_with_prefix_cache) against a fresh prefill per prompt."""
    model, tok = _load(model_dir)
    _, doc = generate.synthetic_corpus(tok, 1, doc_tokens - 64, doc_tokens, seed=0)[0]
    instructions = ["Who repaired the bridge?", "What was counted in the warehouse?",
                    "How long was the road closed?", "What did the archivist record about copper prices?"]
    prompts = [longpo.render_chat(tok, [doc + "\n\n" + instructions[i % 4]])[0] for i in range(n_instructions)]

    def fresh():
        return [generate.generate_tokens(model, [p], [], new_tokens)[0] for p in prompts]

    def reuse():
        return generate.generate_with_prefix_cache(model, prompts, [], new_tokens)

    t_reuse, out_reuse = _best(reuse, repeats)
    t_fresh, out_fresh = _best(fresh, repeats)
    row = {"doc_tokens": len(prompts[0]), "instructions": n_instructions, "new_tokens": new_tokens,
           "reuse_s": round(t_reuse, 2), "fresh_s": round(t_fresh, 2), "speedup": round(t_fresh / t_reuse, 2),
           "same_tokens": out_reuse == out_fresh}
    print_row(row)
    return row


def unshared_record(cfg, model, tokenizer, eos_ids, index, source, text, offsets, model_name):
    """generate.build_record's recipe the plain way, with no cache shared between uses: every chunk prefilled afresh
    for its pool and again for its chosen answer, the document once for each rejected answer, each reference
    log-prob a full forward (longpo.response_logps). The same draws from the document's generators, so the same
    record (to float rounding); the test suite's oracle for build_record and bench's slow side. (record, counts)."""
    G = generate
    device = next(model.parameters()).device
    seed = G.doc_seed(cfg.seed, index)
    rng, gen, counts = random.Random(seed), torch.Generator(device=device).manual_seed(seed), Counter()
    specials = longpo.special_token_strings(tokenizer)
    window = model.config.max_position_embeddings
    render = lambda user: longpo.render_chat(tokenizer, [user])[0]  # noqa: E731
    answer = dict(eos_ids=eos_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.response_temperature,
                  top_p=cfg.response_top_p, generator=gen)

    def drop_reason(text_, finished, branch, user):
        reason = G.reject_reason(text_, finished, cfg, branch, specials)
        return reason or (None if G.fits_window(tokenizer, window, user, text_) else "over_window")

    t0 = time.time()
    spans = G.sample_chunks(G.chunk_spans(offsets, text, cfg.chunk_tokens, cfg.min_chunk_tokens), cfg.chunks_per_doc,
                            rng)
    counts["turns"] += len(spans)
    pools = G.generate_tokens(model, [render(text[s:e] + "\n\n" + G.POOL_PROMPT.format(n=cfg.pool_size))
                                      for s, e in spans], eos_ids, cfg.pool_max_new_tokens, cfg.pool_temperature,
                              cfg.pool_top_p, gen)
    asked = []
    for span, (toks, finished) in zip(spans, pools):
        pool = [p for p in G.parse_pool(tokenizer.decode(toks, skip_special_tokens=True), finished)
                if not longpo.special_in(p, specials)]
        if not pool and cfg.pool_fallback:
            counts["fallback_instruction"] += 1
            pool = [G.FALLBACK_INSTRUCTION]
        if pool:
            asked.append((span, rng.choice(pool)))
        else:
            counts["dropped: no instruction"] += 1
    stages = {"pool": time.time() - t0}
    t0 = time.time()
    kept = []
    shorts = [text[s:e] + "\n\n" + ins for (s, e), ins in asked]
    for ((s, e), ins), user, (toks, finished) in zip(asked, shorts, G.generate_tokens(
            model, [render(u) for u in shorts], **answer) if asked else []):
        y = tokenizer.decode(toks, skip_special_tokens=True).strip()
        reason = drop_reason(y, finished, "chosen", user)
        if reason:
            counts["dropped: chosen " + reason] += 1
        else:
            kept.append((dict(chunk=[s, e], instruction=ins, chosen=y), user))
    stages["chosen"] = time.time() - t0
    t0 = time.time()
    turns = []
    with G.rope_base(model, cfg.long_rope_theta):
        rejected = G.generate_tokens(model, [render(text + "\n\n" + t["instruction"]) for t, _ in kept],
                                     **answer) if kept else []
    for (t, user), (toks, finished) in zip(kept, rejected):
        t["rejected"] = tokenizer.decode(toks, skip_special_tokens=True).strip()
        reason = drop_reason(t["rejected"], finished, "rejected", user)
        reason = "rejected " + reason if reason else None
        if reason is None and t["rejected"] == t["chosen"]:
            reason = "identical"
        if reason:
            counts["dropped: " + reason] += 1
        else:
            turns.append((t, user))
    stages["rejected"] = time.time() - t0
    if not turns:
        counts["documents without a turn left"] += 1
        return None, counts, stages
    t0 = time.time()
    for t, user in turns:
        for key in ("chosen", "rejected"):
            t[f"ref_{key}_logp"] = longpo.response_logps(model, tokenizer, [user, t[key]])[0].item()
    stages["reference"] = time.time() - t0
    record = {"id": f"doc-{index:05d}", "document": text, "turns": [t for t, _ in turns],
              "meta": {"model": model_name, "source": source, "long_tokens": len(offsets), "seed": seed}}
    return record, counts, stages


def bench_generation_stages(model_dir="", repeats=1, doc=2):
    """One record of the embedded `python generate.py` (document `doc` of its corpus: about 4K tokens, 1K-token
    chunks, 2 turns) by build_record (each chunk filled once for its pool, answer and references, the document
    once for all its answers) against unshared_record (the plain recipe: fresh prefills for every use, a full
    forward a reference), by stage. Sides alternate; the fastest of `repeats` runs counts."""
    model, tok = _load(model_dir)
    cfg = generate.GenConfig(**generate.EMBEDDED)
    source, text = generate.synthetic_corpus(tok, doc + 1, cfg.max_len // 2, cfg.max_len * 9 // 16, cfg.seed)[doc]
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    eos_ids = generate.eos_token_ids(model, tok)
    best, records = {}, {}
    for _ in range(repeats):
        for side in ("old", "new"):
            generate.STATS.clear()
            t0 = time.perf_counter()
            if side == "new":
                records[side], counts = generate.build_record(cfg, model, tok, eos_ids, doc, source, text, offsets,
                                                              "bench")
                times = {k: generate.STATS[k + "_s"] for k in generate.STAGES}
            else:
                records[side], counts, times = unshared_record(cfg, model, tok, eos_ids, doc, source, text, offsets,
                                                               "bench")
            times["record"] = time.perf_counter() - t0
            best[side] = {k: min(v, best.get(side, times).get(k, v)) for k, v in times.items()}
    old, new = records["old"], records["new"]
    strip = [[{k: v for k, v in t.items() if not k.startswith("ref_")} for t in r["turns"]] if r else None
             for r in (old, new)]
    row = {"doc": doc, "doc_tokens": len(offsets), "chunk_tokens": cfg.chunk_tokens, "turns_sampled": counts["turns"],
           "turns_kept": len(new["turns"]) if new else 0}
    for k in (*generate.STAGES, "record"):
        row.update({f"old_{k}_s": round(best["old"].get(k, 0.0), 2), f"new_{k}_s": round(best["new"][k], 2),
                    f"{k}_speedup": round(best["old"].get(k, 0.0) / max(best["new"][k], 1e-9), 2)})
    row["same_answers"] = strip[0] == strip[1]
    if old and new and strip[0] == strip[1]:
        row["max_ref_diff"] = max(abs(a[k] - b[k]) for a, b in zip(old["turns"], new["turns"])
                                  for k in ("ref_chosen_logp", "ref_rejected_logp"))
    print_row(row)
    return [row]


# -----------------------------------------------------------------------------
# training: packed (prefix shared) against unshared, and sp = 1 against sp = 2
#
# Each measurement runs in a fresh process (torchrun for sp > 1), so that peak memory is its own: on CPU
# the peak RSS above the level reached after the model is built (glibc told to give large blocks back, so
# RSS follows live memory), on CUDA torch.cuda.max_memory_allocated. "Unshared" is the same trainer code
# fed the chosen and the rejected sequences as two separate packed sequences (the released code's way):
# the same kernels, chunked head and reduction, so only the sharing differs.

LIVE_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536"}
SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2)  # a small Llama for CPU figures
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3)  # SmolLM2-135M's shape
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4)  # TinyLlama-1.1B's shape


def synthetic_record(tokenizer, prefix_tokens, branch_tokens, seed=0):
    """A one-turn record whose document makes a prefix of about prefix_tokens and whose responses have about
    branch_tokens each (random words: the content does not matter for speed)."""
    rng = random.Random(seed)
    vocab = ("alpha beta gamma delta river stone blue red green key value note number house tree sun moon "
             "star one two three four five six seven eight nine ten").split()

    def text(n):
        ids = tokenizer(" ".join(rng.choice(vocab) for _ in range(n)), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:n])
    doc = text(prefix_tokens)
    return {"id": "bench", "document": doc, "turns": [{
        "chunk": [0, min(len(doc), 100)], "instruction": "Summarise the note.", "chosen": text(branch_tokens),
        "rejected": text(branch_tokens), "ref_chosen_logp": -50.0, "ref_rejected_logp": -60.0}]}


def _one_step_run(spec):
    """Entry of a fresh process (or of each torchrun rank) for one measurement."""
    env = longpo.setup_distributed(spec.get("sp", 0))
    out = _measure_step(spec, env)
    longpo.teardown_distributed()
    return out


def _measure_step(spec, env):
    """Build a random model of spec["shape"], then time spec["steps"] optimizer steps of one record, packed or
    unshared. Returns step time and peak memory (max over ranks)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    longpo.register_attention(env.sp_group)
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"] or longpo.default_model_dir())
    config = AutoConfig.for_model("llama", vocab_size=len(tok), max_position_embeddings=262144, **spec["shape"])
    torch.manual_seed(0)
    cfg = longpo.Config(grad_ckpt=True, logp_budget=spec.get("logp_budget", 128 * len(tok)), lr=1e-6)  # small chunks:
    # at these lengths a (1024, V) chunk of logits would outweigh the activations being compared
    param_dtype, _ = longpo._dtype_of(cfg, env.device)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with env.device:
        model = AutoModelForCausalLM.from_config(config, dtype=param_dtype, attn_implementation="longpo")
    policy = longpo.build_policy(cfg, env, model)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    rec = synthetic_record(tok, spec["prefix"], spec["branch"])
    if spec["mode"] == "packed":
        seqs = [longpo.pack_record(tok, rec)]
    else:
        seqs = [longpo.pack_record(tok, rec, ("chosen",)), longpo.pack_record(tok, rec, ("rejected",))]
    tokens = sum(s["input_ids"].numel() for s in seqs)

    def step():
        sums = [longpo.sequence_sums(policy, s, env) for s in seqs]
        n = seqs[0]["n"]
        a, b = (sums[0][0][:n], sums[0][0][n:]) if len(seqs) == 1 else (sums[0][0], sums[1][0])
        nll = sums[0][1] / int(seqs[0]["nll_mask"].sum())
        ref = torch.tensor([-50.0], device=env.device, dtype=a.dtype)
        loss = longpo.longpo_loss(a[None], b[None], ref[None], ref[None], torch.ones(1, n, dtype=torch.bool,
                                  device=env.device), nll[None])[0].sum()
        (loss * env.sp).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: the baseline below holds them

    def sync():
        if env.device.type == "cuda":
            torch.cuda.synchronize()
    step()  # warm-up: kernels, and the gradients and Adam state, which then stay allocated
    sync()
    # the baseline is what is live now (weights, gradients, optimizer state): the peak above it is activations
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    sync()
    dt = (time.perf_counter() - t0) / spec["steps"]
    if env.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    stats = torch.tensor([dt, peak], dtype=torch.float64, device=env.device)
    if dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    total = torch.cuda.max_memory_allocated() if env.device.type == "cuda" else 0
    return {"step_s": stats[0].item(), "peak_mb": stats[1].item() / 2**20, "tokens": tokens, "vocab": len(tok),
            "total_peak_gb": total / 2**30}


def _spawn(spec, nproc=1):
    """Runs _one_step_run(spec) in a fresh process (torchrun when nproc > 1); returns its result."""
    here = os.path.dirname(os.path.abspath(__file__))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(random.randint(20000, 60000))] if nproc > 1 else [sys.executable])
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    p = subprocess.run([*launcher, os.path.join(here, "bench.py"), "--_one", json.dumps(spec)], capture_output=True,
                       text=True, env={**os.environ, **LIVE_RSS, "OMP_NUM_THREADS": threads}, cwd=here)
    if p.returncode:
        raise RuntimeError(f"bench run {spec} failed:\n{p.stderr[-3000:]}")
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])


def bench_prefix_sharing(branch=128, ratios=(4, 16, 64), steps=2, shape="small", tokenizer=""):
    """Step time and peak memory, packed against unshared, at prefix:branch ratios; runs alternate."""
    rows = []
    for ratio in ratios:
        spec = {"shape": SHAPES[shape], "prefix": ratio * branch, "branch": branch, "steps": steps,
                "tokenizer": tokenizer}
        packed = _spawn({**spec, "mode": "packed"})
        unshared = _spawn({**spec, "mode": "unshared"})
        rows.append({"ratio": f"{ratio}:1", "prefix": ratio * branch, "branch": branch,
                     "packed_s": packed["step_s"], "unshared_s": unshared["step_s"],
                     "time_ratio": unshared["step_s"] / packed["step_s"],
                     "packed_mb": packed["peak_mb"], "unshared_mb": unshared["peak_mb"],
                     "mem_ratio": packed["peak_mb"] / max(unshared["peak_mb"], 1e-9),
                     "packed_tok_s": packed["tokens"] / packed["step_s"],
                     "unshared_tok_s": unshared["tokens"] / unshared["step_s"]})
        print_row(rows[-1])
    return rows


def bench_sequence_parallel(tokens=8192, branch=256, steps=2, shape="small", tokenizer=""):
    """The same packed record at sp = 1 and sp = 2, both as 2 processes under FSDP2 (sp = 1 is then dp = 2:
    each rank runs the whole record), so that FSDP's gathered parameters and unsharded gradients weigh the
    same on both sides and the per-rank peak compares activations. Time and tokens/s are per record."""
    spec = {"shape": SHAPES[shape], "prefix": tokens - 2 * branch, "branch": branch, "steps": steps,
            "mode": "packed", "tokenizer": tokenizer}
    one = _spawn({**spec, "sp": 1}, 2)
    two = _spawn({**spec, "sp": 2}, 2)
    row = {"tokens": one["tokens"], "sp1_s_per_record": one["step_s"] / 2, "sp2_s_per_record": two["step_s"],
           "sp1_mb": one["peak_mb"], "sp2_mb": two["peak_mb"], "mem_ratio": two["peak_mb"] / one["peak_mb"],
           "sp1_tok_s": 2 * one["tokens"] / one["step_s"], "sp2_tok_s": two["tokens"] / two["step_s"]}
    print_row(row)
    return [row]


def train_flops_per_step(shape, vocab, seqs):
    """Model FLOPs of one forward + backward (3x forward) over the given (query length, key span) attention
    calls and token count: 6 * params_matmul * tokens + causal attention 4 * D * H * (half the square, per call)."""
    h, L = shape["hidden_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_token = L * (2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"]) + h * vocab
    tokens = sum(t for t, _ in seqs)
    attn = sum(L * 4 * h * (tq * tk - tq * tq / 2) for tq, tk in seqs)  # QK^T and PV over the causal part
    return 3 * (2 * per_token * tokens + attn)


SHAPES = {"small": SMALL, "smollm2": SMOLLM2, "1b": ONE_B}


H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H200 SXM (NVIDIA's datasheet figure, without sparsity)


def bench_gpu(lengths=(16384, 32768, 65536), shapes=("smollm2", "1b"), steps=2, tokenizer="", peak=H200_BF16_PEAK):
    """On one GPU, bf16 (FSDP2 mixed precision over a one-rank group): packed against unshared at 16K-64K
    tokens, branches of T/32 each. tokens/s counts the chosen and the rejected sequence (2p + c + r, what an
    unshared trainer processes) for both, so the two are comparable; MFU counts each method's own executed
    FLOPs (matmuls 6 N per token, causal attention as the half square it computes, backward = 2x forward;
    activation recompute not counted)."""
    import gc
    env = longpo.setup_distributed()
    rows = []
    for shape in shapes:
        for T in lengths:
            b = T // 32
            p = T - 2 * b
            spec = {"shape": SHAPES[shape], "prefix": p, "branch": b, "steps": steps, "tokenizer": tokenizer,
                    "logp_budget": longpo.LOGP_BUDGET}
            res = {}
            for m in ("packed", "unshared"):  # in this process: CUDA's peak counter resets per measurement
                res[m] = _measure_step({**spec, "mode": m}, env)
                gc.collect()
                torch.cuda.empty_cache()
            vocab = res["packed"].get("vocab", 49152)
            pair_tokens = res["unshared"]["tokens"]
            flops = {"packed": train_flops_per_step(SHAPES[shape], vocab, [(p + b, p + b), (b, p + b)]),
                     "unshared": train_flops_per_step(SHAPES[shape], vocab, [(p + b, p + b), (p + b, p + b)])}
            row = {"shape": shape, "tokens": T}
            for m in ("packed", "unshared"):
                row[f"{m}_s"] = res[m]["step_s"]
                row[f"{m}_tok_s"] = pair_tokens / res[m]["step_s"]
                row[f"{m}_mfu"] = flops[m] / res[m]["step_s"] / peak
                row[f"{m}_gb"] = res[m]["peak_mb"] / 1024
            row["speedup"] = res["unshared"]["step_s"] / res["packed"]["step_s"]
            print_row(row)
            rows.append(row)
    longpo.teardown_distributed()
    return rows


def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _logits_step(h, w, y, mode, budget):
    """Forward + backward of the log-probs of T tokens over a V vocabulary, chunked or through full (T, V) logits."""
    if mode == "chunked":
        lp = longpo.chunked_logps(h, w, y, budget)
    else:
        lp = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None])[:, 0]
    lp.sum().backward()
    h.grad = w.grad = None


def _logits_run(spec):
    """In a fresh process: mode "full" or "chunked" returns the peak RSS of one step above the level before;
    mode "time" returns both sides' step times, alternating, and the median of their pairwise ratios."""
    T, V, d = spec["T"], spec["V"], spec["d"]
    torch.manual_seed(0)
    h = torch.randn(T, d, requires_grad=True)
    # logits of std 3, a trained model's scale; plain randn's (std sqrt(d)) underflow to subnormal probabilities,
    # which a CPU computes tens of times slower than normal floats, and time that instead of the head
    w = (torch.randn(V, d) * 3 / d ** 0.5).requires_grad_()
    y = torch.randint(0, V, (T,))
    _logits_step(h[:8].detach().requires_grad_(), w[:16].detach().requires_grad_(), y[:8] % 16, "chunked",
                 spec["budget"])  # warm-up: the math libraries' own buffers
    if spec["mode"] != "time":
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _logits_step(h, w, y, spec["mode"], spec["budget"])
        return {"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}
    times = {"full": [], "chunked": []}
    for r in range(spec["repeats"] + 1):  # round 0 warms both sides up and is not counted
        for mode in (("full", "chunked") if r % 2 else ("chunked", "full")):  # the order alternates too
            t0 = time.perf_counter()
            _logits_step(h, w, y, mode, spec["budget"])
            if r:
                times[mode].append(time.perf_counter() - t0)
    ratios = sorted(c / f for c, f in zip(times["chunked"], times["full"]))
    return {"full_s": min(times["full"]), "chunked_s": min(times["chunked"]), "time_ratio": ratios[len(ratios) // 2]}


def logits_peak_mb(T, V, mode, d=64, budget=longpo.LOGP_BUDGET):
    return _spawn({"kind": "logits", "T": T, "V": V, "d": d, "mode": mode, "budget": budget})["peak_mb"]


def bench_logits_memory(T=8192, V=32768, d=576, budget=longpo.LOGP_BUDGET, repeats=3):
    """Forward + backward of the token log-probs, chunked LM head against full logits: peak memory (one fresh
    process a side) and time (both sides alternating in one process; time_ratio is chunked over full)."""
    full, chunked = logits_peak_mb(T, V, "full", d, budget), logits_peak_mb(T, V, "chunked", d, budget)
    times = _spawn({"kind": "logits", "T": T, "V": V, "d": d, "mode": "time", "budget": budget, "repeats": repeats})
    row = {"T": T, "V": V, "rows": max(1, budget // V), "full_mb": full, "chunked_mb": chunked,
           "ratio": chunked / full, "full_s": times["full_s"], "chunked_s": times["chunked_s"],
           "time_ratio": times["time_ratio"]}
    print_row(row)
    return [row]


# -----------------------------------------------------------------------------
# the memory plan against what the code allocates (CPU, fp32, one process: the element counts a GPU's plan scales)


def _hwm():
    """Peak RSS since the last _reset_hwm, in bytes (Linux: VmHWM, reset through clear_refs)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_above(fn):
    """Run fn; return (its peak RSS above the RSS before it, fn's result)."""
    base = current_rss()
    _reset_hwm()
    out = fn()
    return _hwm() - base, out


def _plan_run(spec):
    """In a fresh process (glibc told to give large blocks back, so RSS follows live tensors): a random Llama of
    spec["shape"], vocab spec["V"], float32 on the CPU, the same stage the plan counts. Returns measured bytes by
    the plan's term names: exact sums of tensors where a term is a set of tensors, peak RSS above the level before
    where it is a transient."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("llama", vocab_size=spec["V"], max_position_embeddings=1 << 20, **spec["shape"])
    torch.manual_seed(0)
    longpo.register_attention()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="longpo")
    T, out = spec["tokens"], {"weights": sum(p.nbytes for p in model.parameters())}
    if spec["stage"] == "generate":
        model.eval()
        ids = torch.randint(0, spec["V"], (1, T))
        generate.fill(model, generate.new_cache(model, 1, 65), ids[:, :64])  # warm-up: the libraries' own buffers
        cache = generate.new_cache(model, 1, T + 1)
        out["document cache"] = sum(x.nbytes for x in cache.k + cache.v)
        out["document prefill"] = _peak_above(lambda: generate.fill(model, cache, ids))[0]
        return out
    tok = longpo.load_tokenizer("")
    assert len(tok) == spec["V"], "train: V must be the embedded tokenizer's vocabulary (records are text)"
    cfg = longpo.Config(grad_ckpt=True, logp_budget=spec["budget"], loss=spec.get("loss", "longpo"))
    env = longpo.SimpleNamespace(sp=1, sp_rank=0, sp_group=None, device=torch.device("cpu"))
    policy = longpo.build_policy(cfg, env, model)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-6)
    packed = longpo.pack_record(tok, synthetic_record(tok, T - 2 * spec["branch"], spec["branch"]),
                                longpo._branches(cfg))
    longpo.record_loss(cfg, policy, packed, env)[0].backward()  # a step first: gradients and Adam state exist
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    out["gradients"] = sum(p.grad.nbytes for p in policy.parameters())
    out["optimizer state"] = sum(v.nbytes for st in optimizer.state.values() for v in st.values() if v.dim())
    params, saved = {p.untyped_storage().data_ptr() for p in policy.parameters()}, {}

    def keep(x):  # what the forward saves for the backward, parameters aside
        if x.untyped_storage().data_ptr() not in params:
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
        loss = longpo.record_loss(cfg, policy, packed, env)[0]
    out["checkpointed activations"] = sum(saved.values())
    out["backward transients"] = _peak_above(loss.backward)[0]  # above the forward's level: its saved tensors
    out["tokens"] = packed["input_ids"].numel()
    return out


def plan_against_measured(stage, shape, V, tokens, branch=128, budget=1 << 22, loss="longpo"):
    """Each plan term this CPU can measure, planned (memory_plan at sp 1 in float32) against measured (_plan_run,
    a fresh process): rows (term, planned bytes, measured bytes)."""
    got = _spawn({"kind": "plan", "stage": stage, "shape": shape, "V": V, "tokens": tokens, "branch": branch,
                  "budget": budget, "loss": loss})
    config = {"model_type": "llama", "vocab_size": V, **shape}
    planned = dict((name, b) for name, b, _ in longpo.memory_plan(
        config, stage, got.get("tokens", tokens), dtype="float32", budget=budget))
    return [(term, planned[term], got[term]) for term in got if term in planned]


def _host_load_run(spec):
    """Under torchrun: the model of spec["model"] loaded as longpo.py loads it (rank 0 reads the weights, the others
    build it on the meta device and receive their shards) and sharded; each rank's peak RSS then, in MB."""
    env = longpo.setup_distributed(1)
    cfg = longpo.Config(grad_ckpt=False)
    model, _ = longpo.load_model(spec["model"], torch.float32, "longpo", weights=env.master)
    longpo.build_policy(cfg, env, model)
    peaks = [None] * env.world
    dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    longpo.teardown_distributed()
    return {"rank_peak_mb": peaks}


def bench_host_load(model_dir=""):
    """A model's load under FSDP2 over 2 ranks: each rank's peak host memory once sharded. Rank 0 alone reads the
    weights (the whole fp32 model passes through its memory); rank 1 holds only what its shards and the libraries
    take. A random 113M-parameter Llama (SmolLM2's vocabulary) when no --model is given."""
    import tempfile
    from transformers import AutoConfig, AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        if not model_dir:
            tok = longpo.load_tokenizer("")
            config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=768, intermediate_size=2048,
                                          num_hidden_layers=6, num_attention_heads=12, num_key_value_heads=4)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            model_dir = tmp
        params = longpo.model_shape(AutoConfig.from_pretrained(model_dir)).params
        peaks = _spawn({"kind": "host_load", "model": model_dir}, nproc=2)["rank_peak_mb"]
    row = {"params_m": round(params / 1e6, 1), "fp32_mb": round(params * 4 / 2**20), "rank0_peak_mb": round(peaks[0]),
           "rank1_peak_mb": round(peaks[1]), "rank1_below_rank0_mb": round(peaks[0] - peaks[1])}
    print_row(row)
    return [row]


def bench_memory_plan(cfg):
    """The plan's terms against what the code allocates, a ~60M-parameter Llama (SmolLM2's vocabulary) at a few
    lengths: generation's document cache and prefill, training's weights, gradients, Adam state, checkpointed
    activations and backward transients."""
    shape = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2)
    rows = []
    for stage, tokens in (("generate", 2048), ("generate", 8192), ("train", 2048), ("train", 6144)):
        for term, planned, measured in plan_against_measured(stage, shape, 49152, tokens):
            rows.append({"stage": stage, "tokens": tokens, "term": term, "planned_mb": round(planned / 2**20, 2),
                         "measured_mb": round(measured / 2**20, 2), "ratio": round(planned / measured, 3)})
            print_row(rows[-1])
    return rows


# -----------------------------------------------------------------------------
# main


def print_row(row):
    print("  " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
          flush=True)


SECTIONS = {  # name -> run(cfg) returning a list of rows; "gpu" runs only when asked for
    "logits_memory": lambda c: bench_logits_memory(),
    "prefix_sharing": lambda c: bench_prefix_sharing(steps=c.steps, shape=c.shape, tokenizer=c.tokenizer),
    "sequence_parallel": lambda c: bench_sequence_parallel(c.tokens, steps=c.steps, shape=c.shape,
                                                           tokenizer=c.tokenizer),
    "decode": lambda c: [bench_decode(c.model, repeats=c.repeats)],
    "prefill": lambda c: bench_prefill(c.model, repeats=c.repeats),
    "shared_decoding": lambda c: bench_shared_decoding(c.model),
    "sp_cache": lambda c: bench_sp_cache(),
    "cache_reuse": lambda c: [bench_cache_reuse(c.model, repeats=c.repeats)],
    "generation_stages": lambda c: bench_generation_stages(c.model, repeats=c.repeats, doc=c.stages_doc),
    "memory_plan": bench_memory_plan,
    "host_load": lambda c: bench_host_load(c.model),
    "gpu": lambda c: bench_gpu(steps=c.steps, tokenizer=c.tokenizer),
}


def main(argv):
    cfg = longpo.parse_config(BenchConfig, argv)
    unknown = [s for s in cfg.only if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; valid: {list(SECTIONS)}")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    print(f"{results['date']} on {results['machine']}")
    for name in cfg.only or [s for s in SECTIONS if s != "gpu"]:
        t0 = time.time()
        print(f"{name}:", flush=True)
        results[name] = SECTIONS[name](cfg)
        print(f"{name}: done in {time.time() - t0:.0f}s", flush=True)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def machine():
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_one":  # a measurement in a fresh process (see _spawn)
        spec = json.loads(sys.argv[2])
        kind = spec.get("kind")
        runs = {"logits": _logits_run, "plan": _plan_run, "shared": _shared_run, "sp_cache": _sp_cache_run,
                "host_load": _host_load_run}
        result = runs.get(kind, _one_step_run)(spec)
        longpo.print0(json.dumps(result))  # rank 0 only: every rank holds the same (max-reduced) figures
    else:
        main(sys.argv[1:])

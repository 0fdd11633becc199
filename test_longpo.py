"""Tests for longpo.py, generate.py and eval.py: each hard part against an independent computation.

    python -m pytest -q test_longpo.py

CPU only; distributed paths run under torchrun with the gloo backend. Tiny randomly initialised Mistral /
Qwen2 / Llama models and a byte-level BPE tokenizer trained here stand in for real checkpoints.
"""

import dataclasses
import errno
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import eval as E  # noqa: E402
import generate as G  # noqa: E402
import longpo  # noqa: E402

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
WORDS = ("the cat dog sat on a mat by river stone blue red key value note says passkey is number what where "
         "why how who when then there here apple green house tree sun moon star one two three four five").split()


# -----------------------------------------------------------------------------
# fixtures: a tokenizer, tiny models, records


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_tokenizer(path):
    """A byte-level BPE (exact text round trip) with a ChatML template, trained on a few random sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([words(rng, 60) for _ in range(300)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def make_model(path, family="mistral", heads=4, kv_heads=2, layers=2, hidden=32, seed=0, tied=False, **extra):
    """A tiny random causal LM of a supported family, saved as a HF directory with the test tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tok = make_tokenizer(path)
    config = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  head_dim=hidden // heads, max_position_embeddings=4096, tie_word_embeddings=tied,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the init's, so that log-probs differ visibly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return path


def make_records(path, n=6, turns=(1, 3), doc_words=(120, 240), resp_words=(3, 20), seed=0):
    """Records in the JSONL schema of README.md, with random text and reference log-probs."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for k in range(n):
            doc = words(rng, rng.randint(*doc_words))
            ts = []
            for _ in range(rng.randint(*turns)):
                s = rng.randint(0, len(doc) // 2)
                ts.append(dict(chunk=[s, s + rng.randint(20, 100)], instruction="what " + words(rng, 5),
                               chosen=words(rng, rng.randint(*resp_words)),
                               rejected=words(rng, rng.randint(*resp_words)),
                               ref_chosen_logp=-rng.uniform(10, 80), ref_rejected_logp=-rng.uniform(10, 80)))
            f.write(json.dumps({"id": f"doc-{k:05d}", "document": doc, "turns": ts}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny Mistral, the same with its LM head tied to the embedding, and six records for them."""
    d = tmp_path_factory.mktemp("tiny")
    make_model(str(d / "model"))
    make_model(str(d / "tied"), tied=True)
    make_records(str(d / "data.jsonl"))
    return d


def examples(cfg, tok):
    """(record, packed) for every record of cfg.data that fits."""
    return [longpo.load_example(cfg, tok, e) for e in longpo.prepare_data(cfg, tok)]


def torchrun(nproc, *args, timeout=300):
    """Run a command under torchrun on CPU/gloo; returns stdout, raising with the output on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(random.randint(20000, 60000)), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    if p.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p.stdout


def exact_rmsnorm(monkeypatch=None):
    """The models' RMSNorm casts to float32 inside, even for float64 inputs; a float64 comparison between two
    computations would then see float32 rounding, so the float64 tests compute the norm in the input's dtype.
    With pytest's monkeypatch the change is undone after the test."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    for cls in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm):
        if monkeypatch is None:
            cls.forward = forward
        else:
            monkeypatch.setattr(cls, "forward", forward)


def oracle(model, tok, records, cfg):
    """The unshared single-process computation: chosen and rejected long sequences through separate plain
    forwards (transformers' own SDPA attention and causal mask), full logits, log_softmax. Returns the mean
    loss over records, per-record turn sums [(a, b)], and the NLLs."""
    losses, sums, nlls = [], [], []
    for rec in records:
        per = {}
        for branch in ("chosen", "rejected"):
            ids, turns = longpo.render_chat(tok, longpo.long_messages(rec, branch))
            x = torch.tensor(ids)[None]
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]
            t = torch.tensor(turns[1:])
            per[branch] = torch.stack([lp[t == i + 1].sum() for i in range(len(rec["turns"]))])
            if branch == "chosen":
                nll = -lp.mean()  # Eq. 14 over the whole chosen sequence
                sft = -lp[t > 0].sum() / (t > 0).sum()
        n = len(rec["turns"])
        if cfg.loss == "sft":
            loss = sft
        else:
            ref = torch.tensor([[t["ref_chosen_logp"] for t in rec["turns"]],
                                [t["ref_rejected_logp"] for t in rec["turns"]]], dtype=torch.float64)
            loss = longpo.longpo_loss(per["chosen"][None], per["rejected"][None], ref[None, 0], ref[None, 1],
                                      torch.ones(1, n, dtype=torch.bool), nll[None], cfg.beta, cfg.lam,
                                      cfg.nll_weight, cfg.turn_agg)[0][0]
        losses.append(loss)
        sums.append((per["chosen"].detach(), per["rejected"].detach()))
        nlls.append(nll.detach())
    return torch.stack(losses).mean(), sums, nlls


def not_saturated(rec, sums, beta=0.1):
    """Asserts that L_MT's sigmoid argument β·margin (Eq. 13) lies away from its flat tails: out there the loss and
    its gradients stop depending on the branches, and a comparison of them would check nothing."""
    refs = [torch.tensor([t[k] for t in rec["turns"]], dtype=torch.float64)
            for k in ("ref_chosen_logp", "ref_rejected_logp")]
    margin = (sums[0].logsumexp(0) - refs[0].logsumexp(0)) - (sums[1].logsumexp(0) - refs[1].logsumexp(0))
    assert abs(beta * margin.item()) < 15, f"record {rec['id']}: beta * margin = {beta * margin.item():.1f}"


def worker(spec_path):
    """Runs under torchrun: the distributed side of a comparison, described by a JSON spec; rank 0 saves."""
    spec = json.load(open(spec_path))
    exact_rmsnorm()
    torch.use_deterministic_algorithms(True)
    results = []
    for case in spec["cases"]:
        cfg = longpo.Config(**case["cfg"])
        env = longpo.setup_distributed(cfg.sp)
        longpo.register_attention(env.sp_group)
        # as the trainer loads it: rank 0 reads the weights, the other ranks build the model on the meta device
        model, tok = longpo.load_model(case["model"], torch.float64, "longpo", 0, 0,
                                       weights=case["mode"] == "sp" or env.master)
        data = longpo.prepare_data(cfg, tok, env)
        if case["mode"] == "sp":  # sequence parallel alone: sum the partial gradients by hand
            policy = longpo.TokenLogps(model, cfg.logp_budget)
            rec, packed = longpo.load_example(cfg, tok, data[case["record"]])
            loss, _ = longpo.record_loss(cfg, policy, packed, env)
            turn_sums, nll_sum = longpo.sequence_sums(policy, packed, env)
            loss.backward()
            grads = {}
            for name, p in policy.model.named_parameters():
                g = p.grad.clone()
                torch.distributed.all_reduce(g)  # partial gradients of the sp ranks add up to the whole
                grads[name] = g
            results.append({"loss": loss.detach(), "turn_sums": turn_sums.detach(), "grads": grads})
        else:  # the trainer's own path: FSDP2 sharding, loss scaling, gradient norm, one Adam step
            policy = longpo.build_policy(cfg, env, model)
            loaded = {n.removeprefix("model."): p.full_tensor().detach().clone() for n, p in policy.named_parameters()}
            rope = [None] * env.world
            torch.distributed.all_gather_object(rope, policy.model.model.rotary_emb.inv_freq.cpu())
            opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
            accum = cfg.global_batch // env.dp
            steps = longpo.schedule(len(data), cfg)
            batch = longpo.examples(cfg, tok, data, steps[0][env.dp_rank::env.dp])
            sums, _ = longpo.accumulate(cfg, env, policy, batch, accum)
            norm = torch.nn.utils.clip_grad_norm_(list(policy.parameters()), float("inf"))
            grads = {n.removeprefix("model."): p.grad.full_tensor() for n, p in policy.named_parameters()}
            opt.step()
            weights = {n.removeprefix("model."): p.full_tensor().detach() for n, p in policy.named_parameters()}
            results.append({"grads": grads, "weights": weights, "norm": norm.full_tensor(), "order": steps[0],
                            "loaded": loaded, "rope": rope})
    if env.rank == 0:
        torch.save(results, spec["out"])
    longpo.teardown_distributed()



# -----------------------------------------------------------------------------
# the loss against numbers computed by hand


def lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def test_loss_by_hand():
    a, b, c, d = [-12.0, -30.5, -7.25], [-9.0, -41.0, -15.5], [-14.0, -28.0, -8.0], [-20.0, -35.5, -6.0]
    nll, beta, lam = 2.75, 0.1, 0.01
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    mask = torch.ones(1, 3, dtype=torch.bool)
    for agg, f in (("eq13", lse), ("sum", sum)):
        h = beta * ((f(a) - f(c)) - (f(b) - f(d)))
        l_mt = math.log(1 + math.exp(-h))  # -log σ(h)
        loss, got_mt, rc, rr = longpo.longpo_loss(t(a), t(b), t(c), t(d), mask, t(nll)[0], beta, lam, 1.0, agg)
        assert got_mt.item() == pytest.approx(l_mt, rel=1e-12)
        assert loss.item() == pytest.approx(lam * l_mt + nll, rel=1e-12)
        assert rc.item() == pytest.approx(beta * (f(a) - f(c)), rel=1e-12)
        assert rr.item() == pytest.approx(beta * (f(b) - f(d)), rel=1e-12)
    # eq13 and sum are different objectives; one turn makes them equal
    one = torch.ones(1, 1, dtype=torch.bool)
    e = [longpo.longpo_loss(t(a[:1]), t(b[:1]), t(c[:1]), t(d[:1]), one, t(nll)[0], 0.1, 0.01, 1.0, agg)[0]
         for agg in ("eq13", "sum")]
    assert e[0].item() == pytest.approx(e[1].item(), rel=1e-14)
    # turns a record does not have are ignored by both aggregations
    pad = torch.tensor([[True, True, False]])
    for agg, f in (("eq13", lse), ("sum", sum)):
        got = longpo.aggregate_turns(torch.tensor([a], dtype=torch.float64), pad, agg).item()
        assert got == pytest.approx(f(a[:2]), rel=1e-14)
    # "w/o NLL" ablation and the SFT baseline
    loss = longpo.longpo_loss(t(a), t(b), t(c), t(d), mask, t(nll)[0], beta, lam, 0.0, "eq13")[0]
    assert loss.item() == pytest.approx(lam * math.log(1 + math.exp(-beta * ((lse(a) - lse(c)) - (lse(b) - lse(d))))))
    assert longpo.sft_loss(torch.tensor(-30.0), 12).item() == pytest.approx(2.5)
    # the gradient of Eq. 13 w.r.t. a_i is -β σ(-h) softmax(a)_i (by hand)
    av = torch.tensor([a], dtype=torch.float64, requires_grad=True)
    longpo.longpo_loss(av, t(b), t(c), t(d), mask, t(nll)[0], beta, 1.0, 0.0, "eq13")[0].sum().backward()
    h = beta * ((lse(a) - lse(c)) - (lse(b) - lse(d)))
    sig = 1 / (1 + math.exp(h))
    expect = [-beta * sig * math.exp(x - lse(a)) for x in a]
    assert av.grad[0].tolist() == pytest.approx(expect, rel=1e-12)


# -----------------------------------------------------------------------------
# packing, chunked log-probs, one process


def test_render_chat_masks_responses(tiny):
    tok = longpo.load_model(str(tiny / "model"), torch.float32, "sdpa")[1]
    rec = longpo.read_records(str(tiny / "data.jsonl"))[1]
    ids, turns = longpo.render_chat(tok, longpo.long_messages(rec, "chosen"))
    n = len(rec["turns"])
    assert max(turns) == n
    for i, t in enumerate(rec["turns"]):  # response i's tokens decode to the response and its end-of-turn marker,
        # not to the template's newline after it, which the sampler never produces
        text = tok.decode([x for x, k in zip(ids, turns) if k == i + 1])
        assert text == t["chosen"] + "<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>user\n" + rec["document"] + "\n\n" + rec["turns"][0]["instruction"])
    # the whole long chat of both branches, against the ChatML text written out by hand (the oracle of the gradient
    # tests renders through long_messages too, so this is where its assembly is checked): 3 turns
    rec = longpo.read_records(str(tiny / "data.jsonl"))[0]
    assert len(rec["turns"]) == 3
    for branch in ("chosen", "rejected"):
        ids, turns = longpo.render_chat(tok, longpo.long_messages(rec, branch))
        users = [rec["document"] + "\n\n" + rec["turns"][0]["instruction"]] + [t["instruction"] for t in rec["turns"][1:]]
        assert tok.decode(ids) == "".join(f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{t[branch]}"
                                          f"<|im_end|>\n" for u, t in zip(users, rec["turns"]))
        for i, t in enumerate(rec["turns"]):
            assert tok.decode([x for x, k in zip(ids, turns) if k == i + 1]) == t[branch] + "<|im_end|>"
    # a template that emits an end-of-turn token before the assistant's text is refused, not masked wrongly
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{'<|im_end|>' + m['content'] + "
                         "'<|im_end|>'}}{% else %}{{'<|im_start|>user\n' + m['content']}}{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="end-of-turn token before the assistant's text"):
        longpo.render_chat(tok, ["a question", "an answer"])


def test_chunked_logps_equal_full_logits():
    """Values and both gradients of the one-Function head against log_softmax + gather over full logits, in
    float64: chunks of budget // V = 8 rows, the last one short, a random upstream gradient of either sign."""
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    got = longpo.chunked_logps(h, w, y, budget=8 * 50 + 49)
    full = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None])[:, 0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, full, rtol=1e-13, atol=0)
    upstream = torch.randn(37, dtype=torch.float64)
    g1 = torch.autograd.grad((got * upstream).sum(), (h, w))
    g2 = torch.autograd.grad((full * upstream).sum(), (h, w))
    for x, z in zip(g1, g2):
        torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-12)
    a, b = h[:9].detach().requires_grad_(), w[:7].detach().requires_grad_()
    for budget in (1, 2 * 7, 10**6):  # one row a chunk, two, and everything in one chunk
        assert torch.autograd.gradcheck(lambda a, b: longpo.chunked_logps(a, b, y[:9] % 7, budget), (a, b))
    empty = longpo.chunked_logps(h[:0], w, y[:0])  # a rank with no targets still joins the backward, with zeros
    assert empty.shape == (0,) and torch.equal(torch.autograd.grad(empty.sum(), w)[0], torch.zeros_like(w))


def test_head_logits_are_not_rounded_to_bf16():
    """With bf16 parameters the head's log-probs are those of the fp32 product of the same bf16 values, to fp32
    rounding, where logits rounded to bf16 before the log-softmax are off by about a hundredth of a nat."""
    torch.manual_seed(0)
    h = torch.randn(300, 64).bfloat16().requires_grad_()
    w = (torch.randn(500, 64) * 0.4).bfloat16().requires_grad_()  # logits of std 3, a trained model's scale
    y = torch.randint(0, 500, (300,))
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = torch.log_softmax(hd @ wd.T, -1).gather(-1, y[:, None])[:, 0]  # float64 of the same bf16 values
    got = longpo.chunked_logps(h, w, y, budget=64 * 500)
    rounded = torch.log_softmax((h @ w.T).float(), -1).gather(-1, y[:, None])[:, 0]  # the old path
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() < 1e-4
    assert (rounded.double() - exact).abs().max() > 1e-2
    # the gradients come back in the parameters' dtype, equal to the exact ones to bf16 rounding
    gh, gw = torch.autograd.grad(got.sum(), (h, w))
    ref = torch.autograd.grad(exact.sum(), (hd, wd))
    assert gh.dtype == gw.dtype == torch.bfloat16
    for x, z in zip((gh, gw), ref):
        torch.testing.assert_close(x.double(), z, rtol=1e-2, atol=1e-2 * z.abs().max().item())


def test_chunked_logps_memory_does_not_grow_with_T_times_V():
    """Peak RSS added by forward + backward of the log-probs, measured in fresh processes."""
    V = 16384
    full = bench.logits_peak_mb(4096, V, "full")
    small = bench.logits_peak_mb(1024, V, "chunked", budget=256 * V)
    large = bench.logits_peak_mb(4096, V, "chunked", budget=256 * V)
    logits_mb = 4096 * V * 4 / 2**20  # 256 MB of fp32 logits at T = 4096
    assert full > logits_mb  # the full path holds at least one (T, V) tensor
    assert large < 0.25 * full  # the chunked path holds a few (256, V) tensors at a time
    assert large - small < 0.05 * logits_mb  # and does not grow with T x V (only with T x d)


def one_record_file(path, tok_dir, n_turns, resp=(3, 20), rej=None, seed=1):
    make_records(path, n=1, turns=(n_turns, n_turns), resp_words=resp, seed=seed)
    if rej:  # very different branch lengths: a long rejected response against a short chosen one
        rec = json.loads(open(path).read())
        rng = random.Random(seed)
        for t in rec["turns"]:
            t["chosen"], t["rejected"] = words(rng, 2), words(rng, rej)
            # references near what the tiny models give (about -12.4 a word), so that β·margin stays far from the
            # sigmoid's flat tails and the rejected branch's gradients are really compared (see not_saturated)
            t["ref_chosen_logp"], t["ref_rejected_logp"] = -45.0, -12.4 * rej
        open(path, "w").write(json.dumps(rec) + "\n")
    return path


def packed_against_oracle(model_dir, data, kind="longpo", before_sums=lambda: None):
    """Prefix sharing at P = 1 against the unshared oracle in float64: per-turn log-probs, NLL, loss and every
    gradient. before_sums runs just before the last forward (the per-turn sums). Returns (model, packed)."""
    exact_rmsnorm()
    cfg = longpo.Config(data=data, max_len=4096, logp_budget=7 * 320, loss=kind)  # 7-row chunks of the 320 vocabulary
    model, tok = longpo.load_model(model_dir, torch.float64, "longpo")
    ref_model = longpo.load_model(model_dir, torch.float64, "sdpa")[0]
    (rec, packed), = examples(cfg, tok)
    policy = longpo.TokenLogps(model, cfg.logp_budget)
    one = longpo.SimpleNamespace(sp=1, sp_rank=0, sp_group=None, device=torch.device("cpu"))  # one process
    loss, m = longpo.record_loss(cfg, policy, packed, one)
    loss.backward()
    want, sums, nlls = oracle(ref_model, tok, [rec], cfg)
    want.backward()
    before_sums()
    with torch.no_grad():
        turn_sums = longpo.sequence_sums(policy, packed, one)[0]
    if kind == "sft":  # only the chosen branch was packed
        torch.testing.assert_close(turn_sums[:packed["n"]], sums[0][0], rtol=1e-10, atol=0)
    else:
        torch.testing.assert_close(turn_sums, torch.cat(sums[0]), rtol=1e-10, atol=0)
        assert m["nll"] == pytest.approx(nlls[0].item(), rel=1e-10)
        not_saturated(rec, sums[0], cfg.beta)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)
    return model, packed


def test_packed_equals_unshared_one_process(tiny, tmp_path):
    """Prefix sharing at P = 1: per-turn log-probs, NLL, loss and every gradient equal the unshared oracle."""
    for n_turns, rej, kind in ((1, None, "longpo"), (4, None, "longpo"), (2, 150, "longpo"), (3, None, "sft")):
        data = one_record_file(str(tmp_path / "r.jsonl"), None, n_turns, rej=rej)
        packed_against_oracle(str(tiny / "model"), data, kind)


def fake_flash_attn_func(q, k, v, causal, softmax_scale, calls):
    """flash-attn's documented semantics in plain torch: (B, T, H, D) layout, GQA by passing fewer kv heads
    (query head h reads kv head h // (H / Hkv)), and a causal mask aligned to the bottom-right corner."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    assert causal and H % Hkv == 0 and Tq <= Tk
    calls.append((Tq, Tk, H, Hkv))
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * softmax_scale
    hidden = torch.arange(Tk)[None, :] > torch.arange(Tq)[:, None] + (Tk - Tq)  # key j after query i's diagonal
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(hidden, -math.inf).softmax(-1), v)


def test_flash_attn_path_equals_unshared(tiny, tmp_path, monkeypatch):
    """The flash-attn branch of the attention (CUDA only in real use) with a stand-in that follows flash-attn's
    documented semantics: the packed loss and its gradients still equal the unshared oracle in float64, which
    checks our layout, GQA and bottom-right causal conventions for both attention calls."""
    calls = []
    monkeypatch.setattr(longpo, "flash_attn_func",
                        lambda q, k, v, causal, softmax_scale: fake_flash_attn_func(q, k, v, causal, softmax_scale,
                                                                                    calls))
    monkeypatch.setattr(longpo, "flash_applies", lambda q: True)
    data = one_record_file(str(tmp_path / "r.jsonl"), None, 2, rej=150)
    model, packed = packed_against_oracle(str(tiny / "model"), data, before_sums=calls.clear)
    # in that last forward both calls of every layer went through it: [prefix | chosen] square, rejected over
    # prefix + itself, the GQA groups passed as they are
    layers = model.config.num_hidden_layers
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    assert len(calls) == 2 * layers
    p, c, r = packed["prefix_len"], packed["chosen_len"], packed["rejected_len"]
    assert {c_ for c_ in calls if c_[0] == c_[1]} == {(p + c,) * 2 + (heads, kv_heads)}
    assert {c_ for c_ in calls if c_[0] != c_[1]} == {(r, p + r, heads, kv_heads)}


# -----------------------------------------------------------------------------
# Ulysses sequence parallelism and FSDP2 against one process, float64


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Tiny models of the three families (Llama with SmolLM2's 9 query / 3 kv heads) and one-record files:
    1 turn, 4 turns, and branches of very different lengths."""
    d = tmp_path_factory.mktemp("families")
    models = {"mistral": make_model(str(d / "mistral"), "mistral", 4, 2, sliding_window=4096),
              "llama": make_model(str(d / "llama"), "llama", 9, 3, hidden=36),
              "qwen2": make_model(str(d / "qwen2"), "qwen2", 4, 2, seed=1)}
    records = {"1turn": one_record_file(str(d / "r1.jsonl"), None, 1, seed=3),
               "4turns": one_record_file(str(d / "r4.jsonl"), None, 4, seed=4),
               "uneven": one_record_file(str(d / "ru.jsonl"), None, 2, rej=150, seed=5)}
    return models, records


def run_worker(tmp_path, nproc, cases):
    spec = {"cases": cases, "out": str(tmp_path / f"result{nproc}.pt")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun(nproc, "test_longpo.py", "worker", str(tmp_path / "spec.json"))
    return torch.load(spec["out"])


@pytest.mark.parametrize("P", [2, 4])
def test_sequence_parallel_equals_one_process(families, tmp_path, P):
    exact_rmsnorm()
    models, records = families
    combos = [("mistral", "1turn"), ("llama", "4turns"), ("qwen2", "uneven"), ("llama", "uneven")]
    cases = [{"mode": "sp", "model": models[m], "record": 0,
              "cfg": {"data": records[r], "max_len": 4096, "logp_budget": 7 * 320, "sp": P, "dtype": "float64"}}
             for m, r in combos]
    results = run_worker(tmp_path, P, cases)
    lengths = []
    for (m, r), case, got in zip(combos, cases, results):
        cfg = longpo.Config(**case["cfg"])
        ref_model, tok = longpo.load_model(models[m], torch.float64, "sdpa")
        (rec, packed), = examples(cfg, tok)
        lengths.append(packed["input_ids"].numel())
        want, sums, _ = oracle(ref_model, tok, [rec], cfg)
        want.backward()
        torch.testing.assert_close(got["turn_sums"], torch.cat(sums[0]), rtol=1e-10, atol=0)
        not_saturated(rec, sums[0], cfg.beta)
        assert got["loss"].item() == pytest.approx(want.item(), rel=1e-10), (m, r)
        for name, p in ref_model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-7, atol=1e-11, msg=f"{m} {r} {name}")
    assert any(t % P for t in lengths)  # a length that P does not divide was among them


@pytest.mark.parametrize("nproc,sp", [(2, 1), (4, 2)])
def test_fsdp_equals_one_process(tiny, tmp_path, nproc, sp):
    """dp = 2, and dp = 2 x sp = 2, the model read by rank 0 alone (the others built on the meta device): the
    weights each rank starts from, FSDP2 gradients (sum over sp, mean over dp), their norm, and the weights after
    one Adam step equal one process's; also with the LM head tied to the embedding, whose gradient then sums the
    head's and the embedding's."""
    exact_rmsnorm()
    cfgd = {"data": str(tiny / "data.jsonl"), "max_len": 4096, "logp_budget": 64 * 320, "sp": sp,
            "dtype": "float64", "global_batch": 4, "lr": 1e-3}
    names = ("model", "tied")
    results = run_worker(tmp_path, nproc, [{"mode": "fsdp", "model": str(tiny / m), "cfg": cfgd} for m in names])
    for m, got in zip(names, results):
        cfg = longpo.Config(**cfgd)
        ref_model, tok = longpo.load_model(str(tiny / m), torch.float64, "sdpa")
        assert (ref_model.lm_head.weight is ref_model.model.embed_tokens.weight) == (m == "tied")
        # loaded once, by rank 0, and sent in shards: bitwise the weights of a plain load, and the
        # RoPE frequencies (a buffer no state dict holds) rebuilt on every rank
        assert got["loaded"].keys() == dict(ref_model.named_parameters()).keys()
        assert all(torch.equal(got["loaded"][n], p) for n, p in ref_model.named_parameters())
        assert all(torch.equal(r, ref_model.model.rotary_emb.inv_freq) for r in got["rope"])
        records = [r for r, _ in examples(cfg, tok)]
        want, _, _ = oracle(ref_model, tok, [records[i] for i in got["order"]], cfg)
        want.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), float("inf"))
        assert got["norm"].item() == pytest.approx(norm.item(), rel=1e-8)
        assert got["grads"].keys() == dict(ref_model.named_parameters()).keys()
        for name, p in ref_model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-7, atol=1e-11, msg=name)
        torch.optim.Adam(ref_model.parameters(), lr=1e-3).step()
        for name, p in ref_model.named_parameters():
            torch.testing.assert_close(got["weights"][name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)


# -----------------------------------------------------------------------------
# the trainer end to end: checkpoints, resume


def train_args(tiny, out, *extra):
    return ["longpo.py", "--data", tiny / "data.jsonl", "--model", tiny / "model", "--out", out, "--max_len", 4096,
            "--global_batch", 2, "--epochs", 2, "--lr", 1e-3, "--logp_budget", 64 * 320, *extra]


def load_weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def test_checkpoint_and_resume(tiny, tmp_path):
    """torchrun at sp = 2: an HF directory that transformers loads with no code of ours, and a run interrupted
    after step 2 and resumed ends with the same weights and logged metrics as one that was not (steps 3 and 4
    after the resume depend on the restored Adam state, so it is checked through them)."""
    from transformers import AutoModelForCausalLM
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(2, *train_args(tiny, full, "--max_steps", 4, "--save_every", 2))
    torchrun(2, *train_args(tiny, cut, "--max_steps", 2))
    out = torchrun(2, *train_args(tiny, cut, "--max_steps", 4, "--save_every", 2, "--resume"))
    assert "resumed from" in out and "at step 2" in out
    assert sorted(os.listdir(full)) == sorted(os.listdir(cut))
    a, b = load_weights(full / "step-000004"), load_weights(cut / "step-000004")
    init = load_weights(tiny / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8, msg=k)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training moved the weights
    m1 = [json.loads(x) for x in open(full / "metrics.jsonl")]
    m2 = [json.loads(x) for x in open(cut / "metrics.jsonl")]
    assert [m["step"] for m in m2] == [1, 2, 3, 4]
    for x, y in zip(m1, m2):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    for m in m1:  # every logged field is there and finite
        for k in ("loss", "l_mt", "nll", "reward_chosen", "reward_rejected", "reward_margin", "accuracy",
                  "grad_norm", "tokens_per_s", "peak_mem_gb", "lr"):
            assert math.isfinite(m[k]), k
    model = AutoModelForCausalLM.from_pretrained(str(full / "step-000004"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, a[k], msg=k)
    assert model.config.rope_parameters["rope_theta"] == 1e7 and model.config.max_position_embeddings == 4096
    saved = json.load(open(full / "step-000004" / "longpo_config.json"))
    assert saved["step"] == 4 and saved["beta"] == 0.1
    assert not [p for p in os.listdir(full) if p.startswith(".tmp")]


KILLER = """import os, runpy, shutil, signal, sys
point, victim = sys.argv[1], ".trash-" + sys.argv[2]
real_replace, real_rmtree = os.replace, shutil.rmtree
def replace(src, dst, *a, **k):  # point "before": killed as the old checkpoint is about to be renamed
    if point == "before" and str(dst).endswith(victim):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **k)
def rmtree(path, *a, **k):  # "after": renamed, not yet deleted; "during": one file of it deleted
    if str(path).endswith(victim) and point in ("after", "during"):
        if point == "during":
            os.remove(next(os.path.join(d, f) for d, _, files in os.walk(path) for f in files))
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *a, **k)
os.replace, shutil.rmtree = replace, rmtree
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_keep_last_removes_old_checkpoints_and_survives_kill_9_at_each_point(tiny, tmp_path):
    """--keep_last 2 over 5 saves leaves the newest 2, and a kill -9 at each point of a removal (before the old
    checkpoint's rename, after it, halfway through its deletion) leaves a run that --resume finishes with bitwise
    the weights of an uninterrupted one, the leftover removed."""
    order = tmp_path / "order"
    for step in (999999, 1000000, 42):  # newest last, by step number (not by name)
        (order / f"step-{step:06d}").mkdir(parents=True)
    assert [os.path.basename(c) for c in longpo.checkpoints(str(order))] == ["step-000042", "step-999999",
                                                                               "step-1000000"]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    args = [*map(str, train_args(tiny, tmp_path / "cut", "--max_steps", 5, "--save_every", 1, "--keep_last", 2))]
    full = tmp_path / "full"
    args_full = [*map(str, train_args(tiny, full, "--max_steps", 5, "--save_every", 1, "--keep_last", 2))]
    p = subprocess.run([sys.executable, *args_full], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [os.path.basename(c) for c in longpo.checkpoints(str(full))] == ["step-000004", "step-000005"]
    assert p.stdout.count("removed ") == 3 and "GiB on disk" in p.stdout
    for point, victim, left in (("before", "step-000001", ["step-000001", "step-000002", "step-000003"]),
                                ("after", "step-000002", ["step-000003", "step-000004"]),
                                ("during", "step-000003", ["step-000004", "step-000005"])):
        p = subprocess.run([sys.executable, killer, point, victim, *args, "--resume"], capture_output=True,
                           text=True, cwd=HERE, timeout=300)
        assert p.returncode == -9, (point, p.stderr[-2000:])
        assert [os.path.basename(c) for c in longpo.checkpoints(str(tmp_path / "cut"))] == left, point
    p = subprocess.run([sys.executable, *args, "--resume"], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert p.returncode == 0 and "removed " in p.stdout and "nothing left to train" in p.stdout, p.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "cut")) == sorted(os.listdir(full))  # the leftover .trash gone
    a, b = load_weights(full / "step-000005"), load_weights(tmp_path / "cut" / "step-000005")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_and_dpo_run(tiny, tmp_path):
    """The baselines through the trainer: SFT in one process; DPO under torchrun at dp = 2 with an odd record
    count (every dp group must make the same number of reference forwards). Losses finite; DPO's reference is
    stored once, and equals the policy at the first step, so the first rewards are zero."""
    out = tmp_path / "sft"
    args = train_args(tiny, out, "--loss", "sft", "--max_steps", 1)
    del args[args.index("--lr"):args.index("--lr") + 2]  # no --lr: the paper's for SFT (B.3)
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(open(out / "metrics.jsonl").readline())
    assert math.isfinite(m["loss"]) and m["lr"] == 2e-5
    three = tmp_path / "three.jsonl"
    three.write_text("".join(open(tiny / "data.jsonl").readlines()[:3]))
    out = tmp_path / "dpo"
    args = train_args(tiny, out, "--loss", "dpo", "--max_steps", 1, "--sp", 1)
    args[args.index("--data") + 1] = three
    torchrun(2, *args)
    m = json.loads(open(out / "metrics.jsonl").readline())
    assert math.isfinite(m["loss"]) and len(json.load(open(out / "dpo_reference.json"))) == 3
    assert abs(m["reward_chosen"]) < 1e-5 and abs(m["reward_margin"]) < 1e-5


def test_dpo_resume_without_its_reference_recomputes_it_from_the_initial_weights(tiny, tmp_path):
    """dpo_reference.json lost between a crash and --resume: the reference is recomputed from --model's weights
    (before the checkpoint loads), equal to the file the first run wrote, not from the trained weights."""
    out = tmp_path / "dpo"
    three = tmp_path / "three.jsonl"
    three.write_text("".join(open(tiny / "data.jsonl").readlines()[:3]))
    args = train_args(tiny, out, "--loss", "dpo", "--save_every", 1, "--sp", 1)
    args[args.index("--data") + 1] = three
    p = subprocess.run([sys.executable, *map(str, args), "--max_steps", "1"], capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0, p.stderr[-3000:]
    first = json.load(open(out / "dpo_reference.json"))
    os.remove(out / "dpo_reference.json")
    p = subprocess.run([sys.executable, *map(str, args), "--resume"], capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "dpo_reference.json is missing; recomputing DPO's reference from --model's initial weights" in p.stdout
    assert "resumed from" in p.stdout and json.load(open(out / "dpo_reference.json")) == first


def test_one_run_at_a_time_into_out(tiny, tmp_path):
    """A second run into an --out in use is refused in one line naming the holder; a lock left by a dead process
    (a pid in the file, no flock held) is taken over with a message."""
    out = tmp_path / "out"
    lock, note = longpo.lock_dir(str(out))
    assert lock is not None and note is None and open(out / ".lock").read() == f"{os.getpid()}\n"
    p = subprocess.run([sys.executable, *map(str, train_args(tiny, out, "--max_steps", 1))], capture_output=True,
                       text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (f"--out {out} is in use by another run (pid {os.getpid()} holds "
                                                 f"{out / '.lock'}); wait for it to end, or choose another --out")
    assert longpo.lock_dir(str(out)) == (None, p.stderr.strip().splitlines()[-1])  # the same refusal in-process
    longpo.unlock_dir(lock)
    assert open(out / ".lock").read() == ""  # released: free, no stale pid
    (out / ".lock").write_text("4194999\n")  # a killed run's pid, no flock held
    lock, note = longpo.lock_dir(str(out))
    assert lock is not None and note == f"taking over {out / '.lock'}: its holder (pid 4194999) is gone"
    longpo.unlock_dir(lock)


def test_disk_full_on_rank_0_alone_stops_every_rank(tiny, tmp_path):
    """Rank 0 alone writes the HF copy of a checkpoint; a full disk there must stop both ranks with the one
    message (rank 1 must not walk on into the next step's collectives with a dead peer)."""
    wrap = tmp_path / "wrap.py"
    wrap.write_text("import errno, runpy, sys, transformers\n"
                    "def full(*a, **k):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
                    "transformers.PreTrainedModel.save_pretrained = full\n"
                    f"sys.argv = ['longpo.py', *sys.argv[1:]]\nrunpy.run_path({os.path.join(HERE, 'longpo.py')!r}, "
                    "run_name='__main__')\n")
    out = tmp_path / "out"
    with pytest.raises(AssertionError) as failed:
        torchrun(2, wrap, *train_args(tiny, out, "--save_every", 1, "--sp", 1)[1:], timeout=180)
    log = str(failed.value)
    assert log.count(f"saving step 1 failed: the disk under --out {out} is full") == 1
    assert "step 2/" not in log and "Connection closed" not in log and "_fsdp_collectives" not in log
    assert longpo.checkpoints(str(out)) == [] and not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_disk_full_while_saving_says_so(tiny, tmp_path, monkeypatch):
    """torch reports a full disk in a checkpoint write as "unexpected pos ..." (a CheckpointException, a
    BaseException): the run says the disk under --out is full, removes the half-written directory, exit 2.
    For real on a 600 KiB tmpfs where this machine may mount one; in-process with a faked full disk always."""
    from torch.distributed.checkpoint.api import CheckpointException
    model, tok = longpo.load_model(str(tiny / "model"), torch.float32, "sdpa")
    policy = longpo.TokenLogps(model, 64)
    env = longpo.SimpleNamespace(master=True, device=torch.device("cpu"))
    cfg = longpo.Config(out=str(tmp_path / "o"))
    os.makedirs(cfg.out)

    def full_disk(*args):
        os.makedirs(args[-1], exist_ok=True)
        raise CheckpointException("ranks:dict_keys([0])", {0: RuntimeError("unexpected pos 704 vs 598")})
    monkeypatch.setattr(longpo, "_write_checkpoint", full_disk)
    monkeypatch.setattr(longpo.shutil, "disk_usage", lambda p: longpo.SimpleNamespace(free=4096))
    with pytest.raises(SystemExit, match=f"saving step 3 failed: the disk under --out {cfg.out} is full"):
        longpo.save_checkpoint(cfg, env, policy, None, tok, 3, torch.float32, "ab", 10)
    assert os.listdir(cfg.out) == []
    monkeypatch.undo()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        return  # no permission to mount here: the in-process case above stands
    try:
        p = subprocess.run([sys.executable, *map(str, train_args(tiny, mnt / "out", "--save_every", 1))],
                           capture_output=True, text=True, cwd=HERE, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert p.stderr.strip().splitlines()[-1].startswith(f"saving step 1 failed: the disk under --out "
                                                            f"{mnt / 'out'} is full")
        assert not [f for f in os.listdir(mnt / "out") if f.startswith((".tmp", "step"))]
    finally:
        subprocess.run(["umount", str(mnt)])


# -----------------------------------------------------------------------------
# configuration, model loading, bad input


def test_config_flags(monkeypatch):
    cfg = longpo.parse_config(longpo.Config, ["--beta", "0.01", "--turn_agg=sum", "--resume", "--sp", "2"])
    assert (cfg.beta, cfg.turn_agg, cfg.resume, cfg.sp) == (0.01, "sum", True, 2)
    with pytest.raises(SystemExit, match=r"unknown flag --betta; valid flags: .*--beta"):
        longpo.parse_config(longpo.Config, ["--betta", "0.1"])
    with pytest.raises(SystemExit, match="--sp takes a int"):
        longpo.parse_config(longpo.Config, ["--sp", "two"])
    with pytest.raises(SystemExit, match="--sp takes a int, got '1.5e0'"):
        longpo.parse_config(longpo.Config, ["--sp", "1.5e0"])
    assert longpo.parse_config(longpo.Config, ["--max_len", "1.31072e5"]).max_len == 131072
    with pytest.raises(SystemExit, match="--beta= has an empty value"):
        longpo.parse_config(longpo.Config, ["--beta=", "--lam", "0.1"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit, match="--sp 3 does not divide the world size 4"):
        longpo.setup_distributed(3)


def test_flag_forms_and_old_checkpoints(tiny, tmp_path):
    """Dashed flag names, a missing value naming its flag, negative values; check_resumable on a checkpoint
    written before the data's sha256 and the schedule flags were recorded (their defaults count, the data path
    is compared); a cosine schedule's length change refused."""
    assert longpo.parse_config(longpo.Config, ["--max-len", "4096", "--lr=-0"]).max_len == 4096
    with pytest.raises(SystemExit, match="^--out: expected one argument$"):
        longpo.parse_config(longpo.Config, ["--out"])
    with pytest.raises(SystemExit, match=r"^--lr -0.001 is out of range$"):
        longpo.parse_config(longpo.Config, ["--lr", "-1e-3"])
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(longpo.Config)}  # --help's text, as flag() keeps it
    assert "cosine to 0 over the run's steps" in helps["lr_schedule"]
    import eval as E  # a list flag takes every value up to the next --flag, one starting with "-" too
    cfg = longpo.parse_config(E.EvalConfig, ["--lengths", "-1K", "2K", "--tasks=vt", "-x", "--samples", "2"])
    assert (cfg.lengths, cfg.tasks, cfg.samples) == (["-1K", "2K"], ["vt", "-x"], 2)
    assert longpo.parse_config(E.EvalConfig, ["--lengths", "--samples", "2"]).lengths == []
    with pytest.raises(SystemExit, match=r"^--samples -3 is out of range$"):  # eval's limits are field metadata too
        longpo.parse_config(E.EvalConfig, ["--samples", "-3"])
    ckpt = tmp_path / "step-000002"
    ckpt.mkdir()
    old = {k: v for k, v in dataclasses.asdict(longpo.Config(data="d/a.jsonl")).items()
           if k not in ("lr_schedule", "warmup_ratio")}
    (ckpt / "longpo_config.json").write_text(json.dumps({**old, "step": 2}))
    longpo.check_resumable(longpo.Config(data="d/../d/a.jsonl"), str(ckpt), "ab", 10)
    with pytest.raises(SystemExit, match="--data 'd/a.jsonl' -> 'd/b.jsonl'"):
        longpo.check_resumable(longpo.Config(data="d/b.jsonl"), str(ckpt), "ab", 10)
    cos = dict(lr_schedule="cosine", warmup_ratio=0.1)
    (ckpt / "longpo_config.json").write_text(json.dumps({**dataclasses.asdict(longpo.Config(**cos)), "step": 2,
                                                         "data_sha256": "ab", "total_steps": 10}))
    longpo.check_resumable(longpo.Config(**cos), str(ckpt), "ab", 10)
    with pytest.raises(SystemExit, match="the schedule's length 10 -> 20 steps"):
        longpo.check_resumable(longpo.Config(**cos), str(ckpt), "ab", 20)
    # the baselines read no stored reference: null ones are no error for --loss sft (only LongPO validates them)
    rec = json.loads(open(tiny / "data.jsonl").readline())
    for t in rec["turns"]:
        t["ref_chosen_logp"], t["ref_rejected_logp"] = None, "n/a"
    tok = longpo.load_model(str(tiny / "model"), torch.float32, "sdpa")[1]
    assert longpo.pack_record(tok, rec)["ref"] is None


def test_learning_rate_schedules_by_hand():
    """constant and cosine after a linear warm-up, against values worked out by hand: lr 1e-4, 20 steps, the
    released recipe's 10% warm-up = 2 steps (lr/2, lr), then 0.5 (1 + cos(pi (s - 2) / 18))."""
    lr = lambda s, **k: longpo.learning_rate(longpo.Config(lr=1e-4, **k), s, 20)
    assert [lr(s) for s in (0, 7, 19)] == [1e-4] * 3
    assert [lr(s, warmup_steps=4) for s in (0, 1, 3, 4, 19)] == pytest.approx([2.5e-5, 5e-5, 1e-4, 1e-4, 1e-4])
    cos = dict(lr_schedule="cosine", warmup_ratio=0.1)
    assert [lr(s, **cos) for s in (0, 1, 2, 11, 19)] == pytest.approx(
        [5e-5, 1e-4, 1e-4, 0.5e-4, 1e-4 * 0.5 * (1 + math.cos(math.pi * 17 / 18))], rel=1e-12)
    assert lr(19, **cos) == pytest.approx(7.5961235e-7, rel=1e-6)  # 0.5 (1 + cos(170 deg)) = 0.0075961235
    assert lr(4, lr_schedule="cosine", warmup_steps=4) == pytest.approx(1e-4)  # the steps win over the ratio


def test_schedule_and_resume_settings(tmp_path):
    # 5 records, batches of 2, 3 epochs: 2 steps an epoch, none straddling two epochs (no record twice in a step)
    steps = longpo.schedule(5, longpo.Config(global_batch=2, epochs=3))
    assert len(steps) == 6 and all(len(set(s)) == 2 for s in steps)
    assert all(len(set(steps[2 * e] + steps[2 * e + 1])) == 4 for e in range(3))
    # a resume refuses a change of the objective or of the update, and names it
    ckpt = tmp_path / "step-000002"
    ckpt.mkdir()
    (ckpt / "longpo_config.json").write_text(json.dumps({**dataclasses.asdict(longpo.Config(lr=5e-7)), "step": 2}))
    longpo.check_resumable(longpo.Config(lr=5e-7, max_steps=10, save_every=3), str(ckpt), "ab", 10)  # free to change
    for flag, value in (("beta", 0.01), ("lam", 1.0), ("lr", 1e-6), ("grad_clip", 0.0)):
        with pytest.raises(SystemExit, match=f"--{flag} "):
            longpo.check_resumable(longpo.Config(**{"lr": 5e-7, flag: value}), str(ckpt), "ab", 10)
    # the data by content: the same bytes by another path resume, changed bytes at the same path do not
    (ckpt / "longpo_config.json").write_text(json.dumps({**dataclasses.asdict(longpo.Config(lr=5e-7)), "step": 2,
                                                         "data_sha256": "ab" * 32}))
    longpo.check_resumable(longpo.Config(lr=5e-7, data="elsewhere.jsonl"), str(ckpt), "ab" * 32, 10)
    with pytest.raises(SystemExit, match="--data data/longpo.jsonl: its contents changed"):
        longpo.check_resumable(longpo.Config(lr=5e-7), str(ckpt), "cd" * 32, 10)
    # data written by another model than the one trained: warned (the references must be πS's)
    rec = {"id": "a", "document": "some text", "turns": [{"chunk": [0, 4], "instruction": "what", "chosen": "x",
           "rejected": "y", "ref_chosen_logp": -1.0, "ref_rejected_logp": -2.0}], "meta": {"model": "/ckpt/A"}}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n")
    entry = {"offset": 0, "line": 1}
    cfg = longpo.Config(data=str(tmp_path / "d.jsonl"), model="/ckpt/B")
    assert "written by '/ckpt/A'" in longpo.writer_mismatch(cfg, entry)
    assert longpo.writer_mismatch(dataclasses.replace(cfg, model="/ckpt/A"), entry) is None
    assert longpo.writer_mismatch(dataclasses.replace(cfg, loss="sft"), entry) is None
    # a fresh run into an --out that holds checkpoints stops before loading anything
    p = subprocess.run([sys.executable, "longpo.py", "--out", str(tmp_path), "--data", "nowhere.jsonl"],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode != 0 and "holds checkpoints of an earlier run" in p.stderr and "--resume" in p.stderr


def test_model_settings_and_sliding_window(families):
    models, _ = families
    model, _ = longpo.load_model(models["mistral"], torch.float64, "longpo", rope_theta=1e7, max_len=8192)
    assert model.config.rope_parameters["rope_theta"] == 1e7 and model.config.max_position_embeddings == 8192
    d = model.config.head_dim
    want = 1.0 / (1e7 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), want, rtol=1e-6, atol=0)
    assert model.config.sliding_window is None  # was 4096 in the saved config
    # a window at least as long as the sequence changes nothing; a shorter one is refused, not silently applied
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    attn = model.model.layers[0].self_attn
    plain = longpo.ulysses_attention(attn, q, k, v, scaling=0.3)[0]
    torch.testing.assert_close(longpo.ulysses_attention(attn, q, k, v, scaling=0.3, sliding_window=10)[0], plain)
    with pytest.raises(ValueError, match="sliding_window=4 is shorter"):
        longpo.ulysses_attention(attn, q, k, v, scaling=0.3, sliding_window=4)


MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)


def test_memory_plan_against_what_the_code_allocates():
    """memory_plan's terms against the code on the CPU (float32, one process): a tiny model's exact terms (weights,
    gradients, Adam state, checkpointed activations, the KV cache, byte for byte), and a 61M-parameter model's
    transients (a document's prefill; the backward's peak above the forward's) within 15%; and the worked-out
    figures a 7B model's plan gives (the README's table)."""
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    mid = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2)
    exact = {"weights", "gradients", "optimizer state", "document cache"}
    for shape, stage, tokens in ((tiny, "generate", 1024), (tiny, "train", 1024), (mid, "generate", 2048),
                                 (mid, "train", 3072)):  # at 3,072 tokens the layers' backward outweighs the head's
        rows = bench.plan_against_measured(stage, shape, 49152, tokens)
        assert {t for t, _, _ in rows} >= ({"weights", "document cache", "document prefill"} if stage == "generate"
                                           else {"gradients", "checkpointed activations", "backward transients"})
        for term, planned, measured in rows:
            if term in exact:
                assert planned == measured, (shape, term)
            elif term == "checkpointed activations" or shape is mid:  # tensors saved; a transient's peak RSS
                assert abs(planned / measured - 1) < 0.15, (shape, stage, term, planned, measured)
    # a 7B model: KV 128 KiB a token, so 16 GiB at 128K; sharded weights, gradients and Adam over 8 GPUs
    gen = dict((n, b) for n, b, _ in longpo.memory_plan(MISTRAL_7B, "generate", 131072, chunk=32768, rows=4,
                                                        answer=1024))
    assert gen["document cache"] == (131072 + 1) * 128 * 1024 and gen["weights"] == 7_241_732_096 * 2
    train = dict((n, b) for n, b, _ in longpo.memory_plan(MISTRAL_7B, "train", 139264, sp=8))
    assert train["optimizer state"] == 2 * train["weights"] == 2 * 7_241_732_096 * 4 // 8
    assert 20 * 2**30 < train["peak"] < 35 * 2**30  # DESIGN's estimate: 25-30 GB a GPU at 128K, sp 8


def test_plan_flag_prints_a_run_of_the_papers_scale(tmp_path, capsys):
    """--plan on each script, from a config.json alone (Mistral-7B's; no weights, no GPU): the table of the run's
    own settings, its peak the one memory_plan gives, and nothing loaded or written."""
    model = tmp_path / "mistral-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**MISTRAL_7B, "max_position_embeddings": 32768}))
    code, out, _ = cli(train_main, ["--plan", "--model", model, "--sp", 8, "--max_len", 131072], capsys)
    peak = longpo.memory_plan(MISTRAL_7B, "train", 131072 + 8192, sp=8)[-1][1]
    line = next(x for x in out.splitlines() if x.split()[:1] == ["peak"])
    assert code == 0 and line.split()[1] == f"{peak / 2**30:.2f}"
    code, out, _ = cli(G.main, ["--plan", "--model", model, "--corpus", "c", "--max_len", 524288, "--sp", 4], capsys)
    assert code == 0 and "document cache" in out and "(a document of 524288 tokens over sp 4 rank(s)" in out
    code, out, _ = cli(eval_main, ["--plan", "--models", f"m={model}", "--lengths", "128K"], capsys)
    assert code == 0 and "prompt caches" in out and "16.00 GiB" in out  # 128 KiB a token
    assert sorted(os.listdir(tmp_path)) == ["mistral-7b"] and os.listdir(model) == ["config.json"]


def test_head_shares_keep_gqa_groups():
    q, kv, local = longpo.head_shares(9, 3, 2)
    assert [x.tolist() for x in q] == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert [x.tolist() for x in kv] == [[0, 1], [1, 2]]  # kv head 1 goes to both ranks, no other is copied
    assert [x.tolist() for x in local] == [[0, 0, 0, 1], [0, 0, 1, 1, 1]]
    q, kv, _ = longpo.head_shares(32, 8, 8)
    assert all(len(x) == 4 for x in q) and all(len(x) == 1 for x in kv)  # even case: no replication at all


def bad_line(tmp_path, mutate):
    rec = {"id": "d", "document": "abcdefghij" * 5, "turns": [
        {"chunk": [0, 10], "instruction": "q", "chosen": "a", "rejected": "b",
         "ref_chosen_logp": -1.0, "ref_rejected_logp": -2.0}]}
    good = json.dumps(rec)
    text = mutate(rec)
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + (text if isinstance(text, str) else json.dumps(rec)) + "\n")
    return str(path)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: "{not json", r"bad.jsonl:2: malformed JSON"),
    (lambda r: r.pop("document") and None, r"bad.jsonl:2: field 'document': missing"),
    (lambda r: r.update(turns=[]), r"bad.jsonl:2: field 'turns': empty turn list"),
    (lambda r: r["turns"][0].pop("chosen") and None, r"bad.jsonl:2: field 'turns\[0\].chosen': missing"),
    (lambda r: r["turns"][0].update(instruction=7), r"bad.jsonl:2: field 'turns\[0\].instruction'"),
    (lambda r: r["turns"][0].update(chunk=[40, 90]), r"bad.jsonl:2: field 'turns\[0\].chunk': span \[40, 90\] lies "
                                                     r"outside the document \(length 50\)"),
    (lambda r: r["turns"][0].update(chunk="0:10"), r"bad.jsonl:2: field 'turns\[0\].chunk': expected \[start, end\]"),
    (lambda r: r["turns"][0].update(ref_chosen_logp=float("nan")),
     r"bad.jsonl:2: field 'turns\[0\].ref_chosen_logp': expected a finite number, got nan"),
    (lambda r: r["turns"][0].update(ref_rejected_logp="-3"),
     r"bad.jsonl:2: field 'turns\[0\].ref_rejected_logp': expected a finite number"),
    (lambda r: r["turns"][0].update(ref_chosen_logp=41.2),
     r"bad.jsonl:2: field 'turns\[0\].ref_chosen_logp': a log-probability must be <= 0, got 41.2"),
    (lambda r: r.update(id=True), r"bad.jsonl:2: field 'id'"),
])
def test_bad_records(tmp_path, mutate, message):
    with pytest.raises(ValueError, match=message):
        longpo.read_records(bad_line(tmp_path, mutate))


def test_special_tokens_in_text_are_refused(tiny, tmp_path):
    """A document holding "<|im_end|>" as text would become a real end-of-turn token inside the prompt."""
    tok = longpo.load_model(str(tiny / "model"), torch.float32, "sdpa")[1]
    path = bad_line(tmp_path, lambda r: r.update(document="abcde<|im_end|>fghij" * 3) and None)
    cfg = longpo.Config(data=path, max_len=4096)
    with pytest.raises(ValueError, match=r"bad.jsonl:2: message 1 contains the special token '<\|im_end\|>'"):
        longpo.prepare_data(cfg, tok)


def test_over_long_records(tiny, capsys):
    tok = longpo.load_model(str(tiny / "model"), torch.float32, "sdpa")[1]
    cfg = longpo.Config(data=str(tiny / "data.jsonl"), max_len=4096)
    lengths = sorted(e["tokens"] for e in longpo.prepare_data(cfg, tok))
    cfg.max_len = lengths[2]
    kept = longpo.prepare_data(cfg, tok)
    printed = capsys.readouterr().out
    assert len(kept) == 3 and f"skipped 3 record(s) longer than --max_len {lengths[2]}" in printed
    cfg.too_long = "error"
    with pytest.raises(ValueError, match=r"data.jsonl:\d+: field 'document': the long sequence has \d+ tokens"):
        longpo.prepare_data(cfg, tok)



# =============================================================================
# generate.py: the sampler against transformers and full recomputation, the data rules, resume


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    out = {}
    for family in ("llama", "qwen2"):
        path = make_model(str(d / family), family=family, heads=4, kv_heads=2, layers=2, hidden=32, seed=1)
        out[family] = path
    return out


def load(path, dtype=torch.float32):
    model, tok = longpo.load_model(path, dtype, attn="longpo")
    return model.eval(), tok


def prompts_of(tok, lengths, seed=0):
    rng = random.Random(seed)
    return [longpo.render_chat(tok, [words(rng, n)])[0] for n in lengths]


def hf_generate(model, tok, prompts, eos, n):
    """transformers' own greedy generate on a left-padded batch, with its own attention and cache: the independent
    reference."""
    model = longpo.load_model(model.name_or_path, model.dtype, attn="sdpa")[0].eval()
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
    ours = G.generate_tokens(model, prompts, eos, 24)
    assert ours == hf_generate(model, tok, prompts, eos, 24)
    assert any(f for _, f in ours) and len({len(t) for t, _ in ours}) > 1  # the per-row stops were exercised
    for t, f in ours:
        assert eos[0] not in t and (f or len(t) == 24)


def test_cached_decoding_equals_full_recomputation(tiny_models):
    """Every decode step's logits equal one full forward over [prompt; tokens so far] (float64), per row of a batch
    of prompts of unequal length."""
    model, tok = load(tiny_models["llama"], torch.float64)
    prompts = prompts_of(tok, (9, 20), seed=3)
    steps = []
    orig = G.decode_one_token

    def spy(model_, cache, token, positions):
        logits = orig(model_, cache, token, positions)
        steps.append(logits)
        return logits

    G.decode_one_token = spy
    try:
        res = G.generate_tokens(model, prompts, [], 6)
    finally:
        G.decode_one_token = orig
    assert len(steps) == 5
    for b, (p, (toks, _)) in enumerate(zip(prompts, res)):
        full = torch.tensor([p + toks])
        with torch.no_grad():
            logits = model(full).logits[0]  # (T, V)
        for k, step_logits in enumerate(steps):  # step k fed toks[k]; its logits predict toks[k + 1]
            torch.testing.assert_close(step_logits[b].double(), logits[len(p) + k], rtol=1e-9, atol=1e-9)


def test_bf16_sampler_logits_are_not_rounded(tiny_models, monkeypatch):
    """With bf16 parameters the sampler's logits are the product of its bf16 hidden states and head weight in fp32,
    not rounded to bf16, and its greedy tokens are that product's argmax at every step (float64 as the oracle)."""
    model, tok = load(tiny_models["llama"], torch.bfloat16)
    seen, orig = [], G._logits

    def spy(model_, hidden):
        logits = orig(model_, hidden)
        seen.append((hidden, logits))
        return logits

    monkeypatch.setattr(G, "_logits", spy)
    res = G.generate_tokens(model, prompts_of(tok, (9, 20), seed=3), [], 8)
    assert len(seen) == 8  # the prefill's logits, then 7 decode steps'
    w = model.lm_head.weight.detach()
    for k, (hidden, logits) in enumerate(seen):  # step k's logits chose token k of every row
        exact = hidden.double() @ w.double().T  # (B, V)
        assert logits.dtype == torch.float32 and (logits.double() - exact).abs().max() < 1e-5
        assert [toks[k] for toks, _ in res] == exact.argmax(-1).tolist()
        with torch.no_grad():
            assert (model.lm_head(hidden).double() - exact).abs().max() > 1e-3  # what rounding to bf16 costs


def test_sampler_builds_no_autograd_graph(tiny_models):
    """Called outside any no_grad (as eval.py and generate.py call it), the sampler must not record a graph: one
    would keep every layer's activations of a long prompt alive through the KV cache."""
    model, tok = load(tiny_models["llama"])
    assert all(p.requires_grad for p in model.parameters())
    ids = torch.tensor([prompts_of(tok, (20,))[0]])
    cache = G.new_cache(model, 1, ids.shape[1] + 1)  # the prompt and one decoded token
    G.fill(model, cache, ids[:, :-1])
    logits = G.prefill(model, cache, ids[:, -1:], torch.tensor([[ids.shape[1] - 1]]))
    assert not logits.requires_grad and cache.n == ids.shape[1]
    assert not any(k.requires_grad or v.requires_grad for k, v in zip(cache.k, cache.v))
    logits = G.decode_one_token(model, cache, logits.argmax(-1), torch.tensor([cache.n]))
    assert not logits.requires_grad and not cache.k[0].requires_grad


def test_prefix_cache_reuse_equals_fresh_prefills(tiny_models):
    """Prompts sharing a document: the common prefix filled once into one row that every prompt's row reads (never
    copied), the prompts decoded together, give each prompt's tokens decoded alone; rows that stop early leave."""
    model, tok = load(tiny_models["llama"], torch.float64)
    rng = random.Random(5)
    doc = words(rng, 150)
    questions = ("what is it", "where", "who sat on the mat then")
    prompts = [longpo.render_chat(tok, [doc + "\n\n" + q])[0] for q in questions]
    fresh = [G.generate_tokens(model, [p], [], 10)[0] for p in prompts]
    p = G.common_prefix_len(prompts)
    assert p > 100 and all(len(q) > p for q in prompts)
    G.STATS.clear()
    reused = G.generate_with_prefix_cache(model, prompts, [], 10)
    assert reused == fresh
    assert G.STATS["prefill_tokens"] == p + sum(len(q) - p for q in prompts)  # the prefix once, not 3 times
    # rows that stop early leave the batch; the others decode on over the same prefix
    eos = [fresh[1][0][3]]
    fresh = [G.generate_tokens(model, [p], eos, 10)[0] for p in prompts]
    assert any(f for _, f in fresh) and not all(f for _, f in fresh)
    assert G.generate_with_prefix_cache(model, prompts + prompts[:1], eos, 10) == fresh + fresh[:1]


def plain_attention(q, k, v, visible):
    """The textbook softmax attention in float64, each query head reading its kv head (q_head // group); visible
    (B, Tq, Tk) bool."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)) * 0.3
    return scores.masked_fill(~visible[:, None], -math.inf).softmax(-1) @ v


def test_attention_over_a_prefix_merges_two_softmaxes_exactly():
    """attention_lse over a shared prefix row (rows' queries side by side), over per-row prefixes with padding,
    and over a causal suffix, in key blocks of every size, merged by merge_attention, equals one plain softmax
    attention over [prefix; suffix] (float64, 1e-12), for even and uneven GQA shares; a query that sees no key of a
    part gets weight 0 for it."""
    torch.manual_seed(0)
    B, Tp, Ts, D = 3, 11, 4, 8
    for h, hkv, q_to_kv in ((4, 2, torch.tensor([0, 0, 1, 1])), (3, 2, torch.tensor([0, 0, 1]))):
        q = torch.randn(B, h, Ts, D, dtype=torch.float64)
        pk, pv = torch.randn(B, hkv, Tp, D, dtype=torch.float64), torch.randn(B, hkv, Tp, D, dtype=torch.float64)
        sk, sv = torch.randn(B, hkv, Ts, D, dtype=torch.float64), torch.randn(B, hkv, Ts, D, dtype=torch.float64)
        pre_valid = torch.arange(Tp)[None] < torch.tensor([11, 6, 0])[:, None]  # row 2 reads no prefix key
        causal = longpo._lower_right(Ts, Ts, "cpu")[None].expand(B, Ts, Ts)
        # kv heads as plain_attention reads them: an uneven share maps its query heads itself
        expand = (lambda x: x.index_select(1, q_to_kv)) if h % hkv else (lambda x: x)
        want = plain_attention(q, expand(torch.cat([pk, sk], 2)), expand(torch.cat([pv, sv], 2)),
                               torch.cat([pre_valid[:, None].expand(B, Ts, Tp), causal], 2))
        for budget in (1, 7, 1 << 20):  # key blocks of one key, a few keys, all keys
            out, lse = longpo.attention_lse(q, pk, pv, q_to_kv, 0.3, pre_valid, causal=False, budget=budget)
            assert torch.isinf(lse[2]).all() and (out[2] == 0).all()
            merged, _ = longpo.merge_attention(out, lse, *longpo.attention_lse(q, sk, sv, q_to_kv, 0.3, None,
                                                                                causal=True, budget=budget))
            torch.testing.assert_close(merged, want, rtol=1e-12, atol=1e-12)
        # one prefix row shared by every row: read once, the rows' queries side by side
        want = plain_attention(q, expand(pk[:1].expand(B, -1, -1, -1)), expand(pv[:1].expand(B, -1, -1, -1)),
                               torch.ones(B, Ts, Tp, dtype=torch.bool))
        out, _ = longpo.attention_lse(q, pk[:1], pv[:1], q_to_kv, 0.3, None, causal=False, budget=5)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # a NaN in a key (an overflow in the model) stays a NaN, not a weight of 0: the sampler's check then sees it
    pk[0, 0, 3, 0] = math.nan
    out, lse = longpo.attention_lse(q, pk, pv, q_to_kv, 0.3, pre_valid, causal=False, budget=7)
    assert torch.isnan(out[0]).any() and torch.isnan(lse[0]).any()


def test_generation_over_chunk_prefixes_equals_fresh_prefills(tiny_models):
    """generate_tokens over a prefill_prefixes cache (rows of uneven length; one row's cached tokens reaching past
    what its prompt shares, so masked) gives the tokens of fresh prefills (float64: no near-tie can flip), rows
    stopping at their EOS, and leaves the cache as it was."""
    model, tok = load(tiny_models["llama"], torch.float64)
    rng = random.Random(8)
    chunks = [words(rng, n) for n in (25, 90, 60)]
    prompts = [longpo.render_chat(tok, [c + "\n\n" + q])[0] for c, q in zip(chunks, ("what is it", "who", "where"))]
    alone = longpo.render_chat(tok, [chunks[0]])[0]  # as build_record: what the prompt shares with the chunk alone
    prefixes = [prompts[0][:G.common_prefix_len([prompts[0], alone])], longpo.render_chat(tok, [chunks[1]])[0],
                longpo.render_chat(tok, [chunks[2] + "\n\nRead the text"])[0][:-1]]
    cache, cached = G.prefill_prefixes(model, prefixes)
    past_mask, _ = G.read_prefixes(cached, prompts)
    assert (past_mask.sum(1) < torch.tensor([len(c) for c in cached])).tolist() == [False, True, True]  # masked
    keys = [k.clone() for k in cache.k]
    fresh = [G.generate_tokens(model, [p], [], 10)[0] for p in prompts]
    for eos in ([], [fresh[1][0][2]]):
        fresh = [G.generate_tokens(model, [p], eos, 10)[0] for p in prompts]
        assert G.generate_tokens(model, prompts, eos, 10, cache=cache, cached=cached) == fresh
    assert any(f for _, f in fresh) and not all(f for _, f in fresh)  # a row stopped early, another did not
    assert all(torch.equal(k, k2) for k, k2 in zip(cache.k, keys))  # the cache as it was: only read


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


def gen_cfg(**overrides):
    """A GenConfig for build_record on a tiny random model: small budgets, and the repetition rule off (a random
    model's answers repeat its few words)."""
    return G.GenConfig(**{**dict(chunk_tokens=64, min_chunk_tokens=16, chunks_per_doc=3, pool_max_new_tokens=16,
                                 max_new_tokens=12, rep_ratio_chosen=1.0, rep_ratio_rejected=1.0), **overrides})


def record_of(cfg, model, tok, text, index=0, **kw):
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return G.build_record(cfg, model, tok, [tok.eos_token_id], index, "test", text, offsets, "tiny", **kw)


def same_turns(a, b, tol=1e-4):
    """Equal turns, the reference log-probs to a relative tol (batched over other turns, float32 rounds them)."""
    def text(t):
        return {k: v for k, v in t.items() if not k.startswith("ref_")}
    return len(a) == len(b) and all(text(x) == text(y) and all(
        abs(x[k] - y[k]) <= tol * max(1.0, abs(y[k])) for k in ("ref_chosen_logp", "ref_rejected_logp"))
        for x, y in zip(a, b))


def answers(record):
    return [(t["chosen"], t["rejected"]) for t in record["turns"]]


def test_response_sampling_is_reproducible_under_a_seed(tiny_models):
    model, tok = load(tiny_models["llama"])
    text = words(random.Random(12), 300)
    cfg = gen_cfg(response_temperature=1.0, response_top_p=0.9)
    a, b = record_of(cfg, model, tok, text)[0], record_of(cfg, model, tok, text)[0]
    assert a == b and len(a["turns"]) >= 2  # the same seed: the same record, answers and reference log-probs
    other = record_of(gen_cfg(response_temperature=1.0, response_top_p=0.9, seed=1), model, tok, text)[0]
    assert answers(other) != answers(a)
    # the pools come first from the document's generator, so greedy answers the very same instructions
    greedy = record_of(gen_cfg(), model, tok, text)[0]
    assert [t["instruction"] for t in greedy["turns"]] == [t["instruction"] for t in a["turns"]]
    assert all(x != y for x, y in zip(answers(greedy), answers(a)))  # temperature 1 sampled, away from the argmax
    short = [longpo.render_chat(tok, [text[t["chunk"][0]:t["chunk"][1]] + "\n\n" + t["instruction"]])[0]
             for t in greedy["turns"]]
    assert [t["chosen"] for t in greedy["turns"]] == [
        tok.decode(toks, skip_special_tokens=True).strip() for toks, _ in G.generate_tokens(model, short, [], 12)]


def test_long_rope_theta_changes_only_the_rejected_branch(tiny_models):
    """--long_rope_theta: the rejected answers are those of πS loaded with that base, over the long document; the
    pools, chosen answers and every reference log-prob (πS on the short chunk) are those of πS's own base."""
    path = tiny_models["llama"]
    model, tok = load(path)
    own = model.model.rotary_emb.inv_freq.clone()
    text = words(random.Random(11), 300)
    base = record_of(gen_cfg(), model, tok, text)[0]
    rec = record_of(gen_cfg(long_rope_theta=50.0), model, tok, text)[0]
    assert torch.equal(model.model.rotary_emb.inv_freq, own)  # the model's own base is back afterwards
    long_model = longpo.load_model(path, torch.float32, "longpo", rope_theta=50.0)[0].eval()
    assert not torch.equal(long_model.model.rotary_emb.inv_freq, own)
    prompts = [longpo.render_chat(tok, [text + "\n\n" + t["instruction"]])[0] for t in rec["turns"]]
    expect = G.generate_with_prefix_cache(long_model, prompts, [tok.eos_token_id], 12)
    assert [t["rejected"] for t in rec["turns"]] == [tok.decode(x, skip_special_tokens=True).strip() for x, _ in expect]
    assert len(rec["turns"]) == len(base["turns"]) >= 2
    assert all(a["rejected"] != b["rejected"] for a, b in zip(rec["turns"], base["turns"]))
    for i, (a, b) in enumerate(zip(rec["turns"], base["turns"])):
        assert (a["chunk"], a["instruction"], a["chosen"], a["ref_chosen_logp"]) == \
               (b["chunk"], b["instruction"], b["chosen"], b["ref_chosen_logp"])
        messages = longpo.short_messages(rec, i, a["rejected"])
        own, other = (longpo.response_logps(m, tok, messages)[0].item() for m in (model, long_model))
        assert abs(a["ref_rejected_logp"] - own) <= 1e-4 * max(1.0, abs(own))  # over the chunk's cache: float32
        assert abs(a["ref_rejected_logp"] - other) > 1e-2


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


def test_default_chunk_size_fits_the_window_with_prompt_and_response(tiny_models, tmp_path, capsys):
    _, tok = load(tiny_models["llama"])
    W, cfg = 384, G.GenConfig(pool_max_new_tokens=24, max_new_tokens=24)
    longest, budgets = G.max_chunk_tokens(tok, W, cfg)
    assert 100 < longest < W - 48 - 19 and f"= {longest}" in budgets  # 19: the chat template alone

    def cats(n):  # n tokens exactly: " cat" is one token of the test tokenizer
        return " ".join(["cat"] * n)
    assert len(tok(cats(longest), add_special_tokens=False)["input_ids"]) == longest
    for n, fits in ((longest, True), (longest + 3, False)):
        pool = len(longpo.render_chat(tok, [cats(n) + "\n\n" + G.POOL_PROMPT.format(n=4)])[0]) + 24
        answer = len(longpo.render_chat(tok, [cats(n) + "\n\n" + cats(24), cats(24)])[0])  # a pool-long I, a full y
        assert (max(pool, answer) <= W) == fits, (n, pool, answer)
    # a model with that window: the derived size is used; one that cannot fit is refused in one line, exit 2,
    # before any parts folder is written
    small = tmp_path / "small"
    shutil.copytree(tiny_models["llama"], small)
    conf = json.loads((small / "config.json").read_text())
    conf["max_position_embeddings"] = W
    (small / "config.json").write_text(json.dumps(conf))
    out = tmp_path / "o.jsonl"
    base = ["--model", str(small), "--corpus", str(tmp_path / "none.txt"), "--out", str(out),
            "--pool_max_new_tokens", "24", "--max_new_tokens", "24"]
    with pytest.raises(SystemExit, match="no such file"):  # past the check: the derived size fits
        G.main(base)
    assert f"--chunk_tokens {longest} from πS's window" in capsys.readouterr().out
    left = G.max_chunk_tokens(tok, W, dataclasses.replace(cfg, max_new_tokens=300))[0]
    for extra, message in ((["--chunk_tokens", str(longest + 1)],
                            f"--chunk_tokens {longest + 1} does not fit πS's window: max_position_embeddings {W} - "),
                           (["--max_new_tokens", "300"], f"πS's window leaves {left} tokens for a chunk, under "
                                                         "--min_chunk_tokens 128: max_position_embeddings")):
        with pytest.raises(SystemExit) as e:
            longpo.run_script(G.main, base + extra)  # as the command line runs it
        last = capsys.readouterr().err.splitlines()[-1]  # (above it, transformers' loading bar)
        assert e.value.code == 2 and last.startswith(message), last
        assert not os.path.exists(str(out) + ".parts")


def test_chunks_are_capped_at_32k_whatever_the_window(tiny_models, tmp_path, capsys):
    """A round-1 checkpoint as πS (its config says 131072 positions) gets chunks of --chunk_cap (32K, §4.1) without
    any flag, not the 130K its window would allow."""
    ckpt = tmp_path / "round1"
    shutil.copytree(tiny_models["llama"], ckpt)
    conf = json.loads((ckpt / "config.json").read_text())
    conf["max_position_embeddings"] = 131072
    (ckpt / "config.json").write_text(json.dumps(conf))
    args = ["--model", ckpt, "--corpus", tmp_path / "none.jsonl", "--out", tmp_path / "o.jsonl"]
    code, out, err = cli(G.main, args, capsys)
    assert code == 2 and "none.jsonl: no such file" in one_line(err)  # past the chunk size: the corpus is missing
    assert "--chunk_tokens 32768 (--chunk_cap), under what πS's window allows" in out
    code, out, _ = cli(G.main, args + ["--chunk_cap", 4096], capsys)
    assert "--chunk_tokens 4096 (--chunk_cap)" in out


def test_turns_past_the_window_are_dropped_and_counted(tiny_models):
    """A turn whose short sequence [C_S; I; y], as render_chat renders it, is longer than πS's window is dropped
    (chosen before its rejected answer is generated), counted per branch; the others are kept unchanged."""
    model, tok = load(tiny_models["llama"])
    text = words(random.Random(14), 400)
    cfg = gen_cfg(chunks_per_doc=4)
    full, counts = record_of(cfg, model, tok, text)
    assert len(full["turns"]) == 4 and not any(k.endswith("over_window") for k in counts)
    lengths = [[len(longpo.render_chat(tok, longpo.short_messages(full, i, t[k]))[0]) for k in ("chosen", "rejected")]
               for i, t in enumerate(full["turns"])]
    W = sorted(max(x) for x in lengths)[1]  # about half the turns fit
    model.config.max_position_embeddings = W
    rec, counts = record_of(cfg, model, tok, text)
    over_c = sum(c > W for c, _ in lengths)
    over_r = sum(c <= W < r for c, r in lengths)
    assert counts["dropped: chosen over_window"] == over_c and counts["dropped: rejected over_window"] == over_r
    assert over_c + over_r >= 2
    # the same turns; the reference log-probs, batched over the turns kept, to float32 rounding
    assert same_turns(rec["turns"], [t for t, (c, r) in zip(full["turns"], lengths) if max(c, r) <= W])


def test_length_filter_boundaries():
    assert [G.in_length_range(n, 100) for n in (49, 50, 51, 100, 101)] == [False, False, True, True, False]


def test_filter_rules():
    cfg = G.GenConfig()
    assert G.reject_reason("  \n", True, cfg) == "empty" and G.reject_reason(" ... ", True, cfg) == "empty"
    assert G.reject_reason("The answer is 42", False, cfg) is None  # cut off: kept by default (released)
    assert G.reject_reason("The answer is 42", False, dataclasses.replace(cfg, drop_cut_off=True)) == "cut_off"
    assert G.reject_reason("I'm sorry, but I cannot help with that.", True, cfg) == "refusal"
    assert G.reject_reason("As an AI language model, I do not know.", True, cfg) == "refusal"
    ok = "Ada Quill counted 382 crates of copper in the grey warehouse on day 12 of the spring season."
    tail = ok + (" Then the harbour master sold twenty barrels of amber oil to Velmor, paid by Orin Tessa in silver. "
                 "Beyond that, I cannot answer.")
    assert len(tail) > 200 and G.reject_reason(tail, True, cfg) == "refusal"  # anywhere, not only at the start
    assert G.reject_reason(tail, True, dataclasses.replace(cfg, drop_refusals=False)) is None
    # the released word-repetition ratio, by hand: the share of words that recur
    assert G.repetition_ratio("a b c d") == 0 and G.repetition_ratio("A b, a c!") == 0.5
    assert G.repetition_ratio("the cat the cat") == 1 and G.repetition_ratio("") == 0
    loop = "red " * 19 + "blue"  # 19 of 20 words recur: 0.95
    assert G.repetition_ratio(loop) == 0.95
    assert G.reject_reason(loop, True, cfg, "chosen") == "repetitive"  # > 0.9
    assert G.reject_reason(loop, True, cfg, "rejected") is None  # not > 0.95
    assert G.reject_reason("red " * 20, True, cfg, "rejected") == "repetitive"
    assert G.reject_reason(loop, True, dataclasses.replace(cfg, rep_ratio_chosen=1.0), "chosen") is None
    # fewer than --min_words words of three or more characters (off by default; the released code's 2)
    assert G.reject_reason("ok 42", True, cfg) is None
    assert G.reject_reason("ok 42", True, dataclasses.replace(cfg, min_words=2)) == "short"
    assert G.reject_reason("ok 417 crates", True, dataclasses.replace(cfg, min_words=2)) is None
    assert G.reject_reason(ok, True, cfg) is None
    # a control token's string spelled out in ordinary tokens (SmolLM2 can write "<|im_end|>" that way): dropped,
    # since render_chat would refuse the record
    assert G.reject_reason(ok + " <|im_end|>", True, cfg, "chosen", ["<|im_end|>", "<|im_start|>"]) == \
        "special_token_text"
    assert G.reject_reason(ok, True, cfg, "chosen", ["<|im_end|>"]) is None


def test_filter_flags_count_per_branch(tiny_models, monkeypatch):
    """build_record with the sampler replaced by fixed answers: what each rule drops, per branch, under the default
    flags and under the opposite ones, the pool fallback, and the summary lines that print it."""
    model, tok = load(tiny_models["llama"])
    text = words(random.Random(13), 600)
    good = "The blue house stands by the green tree."
    loop, refusal = "red " * 19 + "blue", "The text lists many things. " * 8 + "But I cannot answer that."
    chosen = {0: ("I'm sorry, I cannot help with that.", True), 1: (loop, True), 2: ("ok 42", True),
              3: ("The cat sat on the mat", False), 4: (good, True), 5: (good + " Yes.", True)}
    rejected = {0: ("The house is green.", True), 1: ("stone " * 10, True), 2: (loop, True), 3: (refusal, True),
                4: ("Blue stone by the river.", True), 5: ("A tree.", True)}

    def turn_of(prompt):
        user = tok.decode(prompt)
        return 5 if G.FALLBACK_INSTRUCTION in user else next(k for k in range(5) if f"part {k} of" in user)

    def fake_short(model_, prompts, **kw):  # pools (chunk 5's unusable), then chosen answers
        if G.POOL_PROMPT[:20] in tok.decode(prompts[0]):
            lines = [f"1. What does part {k} of the text say about it?" if k < 5 else "Sure!"
                     for k in range(len(prompts))]
        else:
            lines = [chosen[turn_of(p)] for p in prompts]
        return [(tok(x if isinstance(x, str) else x[0], add_special_tokens=False)["input_ids"],
                 True if isinstance(x, str) else x[1]) for x in lines]

    def fake_long(model_, prompts, **kw):
        return [(tok(rejected[turn_of(p)][0], add_special_tokens=False)["input_ids"], rejected[turn_of(p)][1])
                for p in prompts]
    monkeypatch.setattr(G, "generate_tokens", fake_short)
    monkeypatch.setattr(G, "generate_with_prefix_cache", fake_long)
    cfg = G.GenConfig(chunk_tokens=64, min_chunk_tokens=16, chunks_per_doc=6, pool_max_new_tokens=16, max_new_tokens=12)
    rec, counts = record_of(cfg, model, tok, text)
    assert counts == {"turns": 6, "fallback_instruction": 1, "dropped: chosen refusal": 1,
                      "dropped: chosen repetitive": 1, "dropped: rejected refusal": 1}
    assert [t["chosen"] for t in rec["turns"]] == ["ok 42", good, good + " Yes."]
    lines = G.summary_lines(counts, cfg)
    assert "  dropped: chosen refusal: 1" in lines and "  dropped: rejected repetitive: 0" in lines
    assert "  fallback_instruction: 1" in lines and not any("short" in x or "cut_off" in x for x in lines)
    flipped = dataclasses.replace(cfg, drop_cut_off=True, drop_refusals=False, rep_ratio_chosen=1.0,
                                  rep_ratio_rejected=0.9, min_words=2, pool_fallback=False)
    rec, counts = record_of(flipped, model, tok, text)
    assert counts == {"turns": 6, "dropped: no instruction": 1, "dropped: chosen short": 1,
                      "dropped: chosen cut_off": 1, "dropped: rejected repetitive": 1}
    assert [t["chosen"] for t in rec["turns"]] == [chosen[0][0], good]
    lines = G.summary_lines(counts, flipped)
    assert "  dropped: rejected cut_off: 0" in lines and "  dropped: no instruction: 1" in lines
    assert not any("refusal" in x or "chosen repetitive" in x for x in lines)  # rules off are not listed


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
# reference log-probs over the chunk's cache


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cached_reference_logps_equal_response_logps(tiny_models, monkeypatch, dtype, tol):
    """log πS(y | C_S, I) from [I; y] fed over the chunks' cache equals longpo.response_logps' full forward over
    [C_S; I; y], for several turns of uneven chunk lengths in one batch (one row's cached tokens reaching past what
    its sequence shares), chosen then rejected over the same cache, which is only read."""
    if dtype == torch.float64:
        exact_rmsnorm(monkeypatch)
    model, tok = load(tiny_models["llama"], dtype)
    rng = random.Random(3)
    chunks = [words(rng, n) for n in (40, 110, 70, 15)]
    users = [c + "\n\n" + "what " + words(rng, rng.randint(2, 8)) for c in chunks]
    prefixes = [longpo.render_chat(tok, [c])[0] for c in chunks]
    prefixes[1] = longpo.render_chat(tok, [chunks[1] + "\n\nRead the text above"])[0][:-1]
    cache, cached = G.prefill_prefixes(model, prefixes)
    keys = [k.clone() for k in cache.k]
    for lengths in ((5, 30, 12, 1), (22, 3, 9, 17)):  # chosen, then rejected
        messages = [[u, words(rng, n)] for u, n in zip(users, lengths)]
        got = G.cached_response_logps(model, cache, cached, [longpo.render_chat(tok, m) for m in messages],
                                      budget=7 * model.config.vocab_size)
        want = torch.cat([longpo.response_logps(model, tok, m) for m in messages])
        assert got.dtype == torch.float64 and all(torch.equal(k, k2) for k, k2 in zip(cache.k, keys))
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # by default the head runs in chunks of longpo's logit budget (budget // V rows), not a row at a time
    rows = []
    real = longpo.ChunkedLogps.apply
    monkeypatch.setattr(longpo.ChunkedLogps, "apply", lambda *a: rows.append(a[-1]) or real(*a))
    G.cached_response_logps(model, cache, cached, [longpo.render_chat(tok, m) for m in messages])
    assert rows == [longpo.LOGP_BUDGET // model.config.vocab_size] and rows[0] > 1000


def test_shared_chunk_records_equal_the_unshared_path(tiny_models, monkeypatch):
    """build_record (each chunk filled once, the document once for all its answers, references over the chunks'
    cache) gives the record of the plain recipe (bench.unshared_record: fresh prefills for every use, a full
    forward per reference) in float64 to 1e-10, with fewer prefill tokens; the stages' seconds are counted."""
    exact_rmsnorm(monkeypatch)
    model, tok = load(tiny_models["llama"], torch.float64)
    text = words(random.Random(20), 300)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    G.STATS.clear()
    old, old_counts, _ = bench.unshared_record(gen_cfg(), model, tok, [tok.eos_token_id], 0, "test", text, offsets,
                                               "tiny")
    old_tokens = G.STATS["prefill_tokens"]
    G.STATS.clear()
    new, new_counts = record_of(gen_cfg(), model, tok, text)
    assert all(G.STATS[k + "_s"] > 0 for k in G.STAGES)
    assert old_counts == new_counts and len(new["turns"]) >= 2 and G.STATS["prefill_tokens"] < old_tokens
    assert same_turns(new["turns"], old["turns"], tol=1e-10) and new["meta"] == old["meta"]


# -----------------------------------------------------------------------------
# the pipeline end to end: reference log-probs, resume, sharding


def eos_model(path, n_eos, **shape):
    """A tiny Llama whose generation config lists its n_eos most frequent tokens as EOS too (a random model never
    says <|im_end|>), so that answers end at different lengths."""
    from transformers import GenerationConfig
    make_model(path, family="llama", **shape)
    model, tok = load(path)
    free = G.generate_tokens(model, prompts_of(tok, (8, 20, 30, 14), seed=9), [tok.eos_token_id], 30)
    common = sorted({t for toks, _ in free for t in toks}, key=lambda t: -sum(x.count(t) for x, _ in free))
    gc = GenerationConfig.from_pretrained(path)
    gc.eos_token_id = [tok.eos_token_id] + common[:n_eos]
    gc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_models):
    """A tiny model whose generation config lists frequent tokens as EOS (a random model never says <|im_end|>),
    and a JSONL corpus of five documents, one of them outside the length range."""
    d = tmp_path_factory.mktemp("pipe")
    path = eos_model(str(d / "model"), 6, seed=4)
    rng = random.Random(1)
    corpus = d / "corpus.jsonl"
    with open(corpus, "w") as f:
        for n in (250, 300, 40, 280, 260):
            f.write(json.dumps({"text": words(rng, n)}) + "\n")
    args = ["--model", path, "--corpus", str(corpus), "--max_len", "640", "--chunk_tokens", "96",
            "--min_chunk_tokens", "16", "--chunks_per_doc", "3", "--pool_max_new_tokens", "24",
            "--max_new_tokens", "24"]
    return d, path, args


def run_generate(*args, env=None):
    p = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), *map(str, args)], capture_output=True,
                       text=True, timeout=300, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
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
                end = full.index(tok.convert_tokens_to_ids("<|im_end|>"), len(prompt)) + 1  # the marker included
                direct = sum(logp[j - 1, full[j]].item() for j in range(len(prompt), end))
                assert abs(direct - t[f"ref_{key}_logp"]) < 1e-3 * max(1.0, abs(direct))
            n_turns += 1
    assert n_turns >= 2
    # the per-reason counts are printed and add up with the kept turns
    counts = {line.rsplit(":", 1)[0].strip(): int(line.rsplit(":", 1)[1]) for line in log.splitlines()
              if line.startswith("  ")}
    assert counts["turns"] == n_turns + sum(v for k, v in counts.items() if k.startswith("dropped: "))
    assert "dropped: chosen over_window" in counts and "dropped: rejected repetitive" in counts


def test_resume_and_sharding_reproduce_the_file(pipeline, capsys):
    d, path, args = pipeline
    ref = d / "ref.jsonl"
    run_generate(*args, "--out", ref)
    # a crash after one document (with a torn half-written line appended), then a restart
    out = d / "resumed.jsonl"
    log = run_generate(*args, "--out", out, env={"LONGPO_STOP_AFTER": "1"})
    assert not out.exists() and "stopping without merging" in log
    with open(d / "resumed.jsonl.parts" / "rank-00000.jsonl", "a") as f:
        f.write('{"index": 3, "record": {"id": "doc-000')
    log = run_generate(*args, "--out", out)
    assert "1 already done" in log
    assert out.read_bytes() == ref.read_bytes()
    # a finished run rerun: nothing regenerated, same file
    run_generate(*args, "--out", out)
    assert out.read_bytes() == ref.read_bytes()
    # other settings on the same parts are refused (as the command line runs main)
    code, _, err = cli(G.main, [*args, "--out", out, "--seed", "1"], capsys)
    assert code and "--seed" in err
    # the corpus is compared by its contents: the same lines by another path resume, the lines shuffled do not
    moved = d / "moved.jsonl"
    moved.write_bytes((d / "corpus.jsonl").read_bytes())
    args_moved = [moved if a == str(d / "corpus.jsonl") else a for a in args]
    run_generate(*args_moved, "--out", out)
    assert out.read_bytes() == ref.read_bytes()
    moved.write_text("".join(reversed(open(d / "corpus.jsonl").readlines())))
    code, _, err = cli(G.main, [*args_moved, "--out", out], capsys)
    assert code == 2 and "other settings (the corpus's contents)" in err and "Traceback" not in err
    # two data-parallel ranks write the same merged file
    sharded = d / "sharded.jsonl"
    torchrun(2, "generate.py", *args, "--out", sharded)
    assert sharded.read_bytes() == ref.read_bytes()
    assert sorted(os.listdir(d / "sharded.jsonl.parts")) == ["config.json", "rank-00000.done", "rank-00000.jsonl",
                                                             "rank-00001.done", "rank-00001.jsonl"]  # a part and
    # its done mark a rank
    # ... and under torchrun every rank stops on the refusal (rank 0 decides, the others hear it from it)
    with pytest.raises(AssertionError) as refused:
        torchrun(2, "generate.py", *args, "--out", sharded, "--seed", 1, timeout=120)
    assert str(refused.value).count("holds documents generated with other settings") == 1  # printed once


SLOW_RANK0 = """import os, runpy, sys, time
import longpo
real = longpo.validate_record
def slow(record, where, *a, **k):  # the end of build_record: rank 0 held back at its last document
    if os.environ.get("RANK") == "0" and where.startswith("document " + sys.argv[1] + " "):
        time.sleep(12)
    return real(record, where, *a, **k)
longpo.validate_record = slow
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_generate_groups_finishing_apart_join_through_files(pipeline, tmp_path):
    """Two dp groups, rank 0 finishing its documents 12 s after rank 1, under a process-group timeout of 6 s:
    rank 1 waits on the groups' .done files, not in a collective, and the merged file is the one-process file."""
    d, path, args = pipeline
    ref = tmp_path / "ref.jsonl"
    run_generate(*args, "--out", ref)
    slow = tmp_path / "slow.py"
    slow.write_text(SLOW_RANK0)
    out = tmp_path / "two.jsonl"
    log = torchrun(2, slow, 4, "generate.py", *args, "--out", out, "--timeout_min", 0.1)  # document 4: rank 0's last
    assert out.read_bytes() == ref.read_bytes() and "wrote" in log


@pytest.fixture(scope="module")
def heads93(tmp_path_factory):
    """A tiny Llama with SmolLM2's 9 query and 3 kv heads (uneven shares at P = 2), frequent tokens as EOS, and
    three documents."""
    d = tmp_path_factory.mktemp("h93")
    path = eos_model(str(d / "model"), 4, heads=9, kv_heads=3, hidden=36, seed=4)
    rng = random.Random(2)
    with open(d / "corpus.jsonl", "w") as f:
        for n in (250, 300, 280):
            f.write(json.dumps({"text": words(rng, n)}) + "\n")
    return d, path


def test_sequence_parallel_generation_writes_the_records_of_one_rank(heads93):
    """generate.py with each document spread over 2 and 3 ranks (9 query / 3 kv heads: uneven head shares, a kv
    head on two ranks) writes the records of one process: the same pools, instructions, chosen and rejected
    answers, the reference log-probs to float64 rounding; and a run at sp 2 killed after a document resumes to the
    same file."""
    d, path = heads93
    args = ["generate.py", "--model", path, "--corpus", d / "corpus.jsonl", "--max_len", "640", "--chunk_tokens",
            "96", "--min_chunk_tokens", "16", "--chunks_per_doc", "3", "--pool_max_new_tokens", "24",
            "--max_new_tokens", "16", "--dtype", "float64"]
    torchrun(1, "test_longpo.py", "exact", *args, "--out", d / "one.jsonl")
    want = longpo.read_records(str(d / "one.jsonl"))
    assert len(want) >= 2 and sum(len(r["turns"]) for r in want) >= 3
    for nproc, sp in ((2, 2), (3, 3)):  # (dp 2 at sp 1: test_resume_and_sharding_reproduce_the_file)
        out = d / f"sp{sp}x{nproc // sp}.jsonl"
        torchrun(nproc, "test_longpo.py", "exact", *args, "--sp", sp, "--out", out)
        got = longpo.read_records(str(out))
        assert [answers(r) for r in got] == [answers(r) for r in want], (nproc, sp)
        for a, b in zip(got, want):
            assert same_turns(a["turns"], b["turns"], tol=1e-10), (nproc, sp)
    # killed after its first document (LONGPO_STOP_AFTER stands in for the kill: the part is flushed per document)
    out = d / "resumed.jsonl"
    env = {"LONGPO_STOP_AFTER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(random.randint(20000, 60000)), "test_longpo.py", "exact", *map(str, args), "--sp", "2", "--out",
           str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE, **env})
    assert p.returncode == 0 and not out.exists(), p.stderr[-2000:]
    torchrun(2, "test_longpo.py", "exact", *args, "--sp", 2, "--out", out)
    assert out.read_bytes() == (d / "sp2x1.jsonl").read_bytes()


def test_document_generation_builds_no_mask_and_copies_no_kv_heads(tiny_models, monkeypatch):
    """Through an unpadded document's record (its chunks, pools, answers, the document, its answers, the
    references), every SDPA call (the prefills) gets no mask and the model's kv heads as they are, and every
    decoding attention reads kv heads as they are: nothing is materialised but the scores themselves."""
    model, tok = load(tiny_models["llama"])
    kv_heads = model.config.num_key_value_heads
    calls, plain = [], []
    real_sdpa, real_lse = torch.nn.functional.scaled_dot_product_attention, longpo.attention_lse

    def sdpa(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask, k.shape[1], v.shape[1], kw.get("is_causal"), q.shape[2] == k.shape[2]))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def lse(q, k, v, *a, **kw):
        plain.append(k.shape[1])
        return real_lse(q, k, v, *a, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(longpo, "attention_lse", lse)
    rec, _ = record_of(gen_cfg(), model, tok, words(random.Random(20), 300))
    assert rec is not None and len(calls) >= 4 * model.config.num_hidden_layers and plain
    assert all(mask is None and k == v == kv_heads and causal and square for mask, k, v, causal, square in calls)
    assert set(plain) == {kv_heads}


def test_a_document_that_cannot_be_rendered_is_skipped(pipeline, tmp_path, monkeypatch, capsys):
    """A document build_record cannot render is skipped with its index and source, counted, and marked done:
    a rerun does not stop on it again."""
    d, path, args = pipeline
    real = G.build_record

    def fails_on_doc_1(cfg, model, tokenizer, eos_ids, index, *rest):
        if index == 1:
            raise longpo.RenderError("the chat template does not render a conversation as a prefix of its "
                                     "continuation")
        return real(cfg, model, tokenizer, eos_ids, index, *rest)
    monkeypatch.setattr(G, "build_record", fails_on_doc_1)
    out = tmp_path / "o.jsonl"
    G.main([*map(str, args), "--out", str(out)])
    log = capsys.readouterr()
    assert f"skipping document 1 ({d / 'corpus.jsonl'}:2): the chat template" in log.err
    assert "  documents skipped (cannot be rendered): 1" in log.out
    first = out.read_bytes()
    assert all(r["meta"]["source"] != f"{d / 'corpus.jsonl'}:2" for r in longpo.read_records(str(out)))
    G.main([*map(str, args), "--out", str(out)])  # the rerun finds it done
    assert "skipping" not in capsys.readouterr().err and out.read_bytes() == first


# =============================================================================
# eval.py: task sizes and depths, scorers by hand, log-likelihoods against a direct computation


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny Mistral in float64, and its tokenizer."""
    d = str(tmp_path_factory.mktemp("m64"))
    make_model(d)
    model, tokenizer = longpo.load_model(d, torch.float64, "longpo")
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# task generators


def context_of(user):
    return user.split("\n\n")[1]  # every task's user message: intro, blank line, context, blank line, question


@pytest.mark.parametrize("length", [1024, 2000])
@pytest.mark.parametrize("task", E.TASKS)
def test_task_length_answer_and_depth(tok, task, length):
    cfg = E.EvalConfig(samples=2)
    for index in range(2):
        s = E.make_sample(task, tok, length, index, cfg)
        answer = s["answers"][0] if s["options"] else ", ".join(s["answers"])
        n_answer = len(tok(answer, add_special_tokens=False)["input_ids"])
        # the prompt is the chat rendering of the user message, and prompt + answer is the length to within 1%
        assert s["prompt_ids"] == longpo.render_chat(tok, [s["user"]])[0]
        assert s["tokens"] == len(s["prompt_ids"]) + n_answer
        assert 0.99 * length <= s["tokens"] <= length
        ctx = context_of(s["user"])
        for a in s["answers"]:
            assert a in ctx
        if task.startswith("niah") or task in ("vt", "mc_records"):
            # each recorded depth is where the sentence holding the answer starts, in characters of the context
            start = ctx.rfind(". ", 0, ctx.index(s["answers"][0])) + 2  # the needle opens a sentence, never the text
            assert s["depth"] == pytest.approx(start / len(ctx), abs=1e-12)
            if task != "vt":  # the first needle sits at the requested depth (index + 0.5) / samples, to a sentence
                n_needles = ctx.count("access code for") + ctx.count("Record ")  # the others shift it a little
                assert abs(s["depth"] - (index + 0.5) / 2) < (1 + n_needles) / ctx.count(". ") + 0.01
        if task == "mc_records":
            assert s["options"][s["answer_index"]] == s["answers"][0] and len(set(s["options"])) == 4
            assert all(o in ctx for o in s["options"])  # the distractors are other records' towns
        if task == "vt":  # the chain X0 = value, X1 = X0, ... appears in order
            chain = [ctx.index(f"{s['answers'][0]} = ")] + [ctx.index(f"{b} = {a}.")
                                                            for a, b in zip(s["answers"], s["answers"][1:])]
            assert chain == sorted(chain)
    # the same seed gives the same sample; another index another one
    assert E.make_sample(task, tok, length, 1, cfg)["user"] == s["user"]
    assert E.make_sample(task, tok, length, 0, cfg)["user"] != s["user"]


def test_cwe_and_fwe_answers_are_the_most_frequent(tok):
    cfg = E.EvalConfig()
    s = E.make_sample("cwe", tok, 2048, 0, cfg)
    entries = [line.split(". ", 1)[1] for line in context_of(s["user"]).split("\n")]
    counts = {w: entries.count(w) for w in set(entries)}
    rare_max = max(c for w, c in counts.items() if w not in s["answers"])
    assert len(s["answers"]) == 10 and min(counts[w] for w in s["answers"]) > rare_max
    s = E.make_sample("fwe", tok, 2048, 0, cfg)
    words = context_of(s["user"]).split()
    top = sorted(set(words), key=lambda w: -words.count(w))[:3]
    assert sorted(words.count(w) for w in s["answers"]) == sorted(words.count(w) for w in top)
    # the pseudo-word pool does not grow with the length (it would ask for more distinct words than exist past
    # ~700K tokens, and loop for ever): a 1M-token list builds, its common words still the most frequent
    user, answers, _, _, _ = E.task_cwe(random.Random(0), "s", 0.5, 1 << 20)(300_000)
    entries = user.split("\n\n")[1].split("\n")
    counts = Counter(line.split(". ", 1)[1] for line in entries)
    assert len(entries) == 300_000 and {w for w, _ in counts.most_common(10)} == set(answers)


# -----------------------------------------------------------------------------
# scorers, by hand


def test_string_match_by_hand():
    preds = ["The codes are 123 and 456.", "nothing here", "ABC"]
    refs = [["123", "456", "789"], ["42"], ["abc", "def"]]
    assert E.string_match_all(preds, refs) == pytest.approx(100 * (2 / 3 + 0 + 1 / 2) / 3)
    assert E.string_match_part(preds, refs) == pytest.approx(100 * (1 + 0 + 1) / 3)


def test_mc_scores_and_effective_length_by_hand():
    # raw argmax picks option 0; divided by lengths (1, 10, 2): -10, -1.2, -15, so acc_norm picks option 1
    assert E.mc_scores([-10.0, -12.0, -30.0], ["a", "bbbbbbbbbb", "cc"], 1) == (0.0, 1.0)
    # lengths in characters, as the harness's code divides: "é" counts 1 (2 in UTF-8 bytes), so -2/1 beats -3/2
    assert E.mc_scores([-2.0, -3.0], ["x", "é"], 0) == (1.0, 1.0)
    assert E.mc_scores([-2.0, -3.0], ["x", "éé"], 1) == (0.0, 1.0)
    assert E.effective_length({1024: 90.0, 2048: 86.0, 4096: 50.0, 8192: 95.0}, 85.6) == 2048
    assert E.effective_length({1024: 80.0, 2048: 99.0}, 85.6) == 0
    assert E.effective_length({1024: 90.0, 2048: 85.6}, 85.6) == 1024  # RULER: the score must exceed it


# -----------------------------------------------------------------------------
# log-likelihoods against a direct full-logits computation


def direct_logps(model, ids):
    x = torch.tensor(ids)[None]
    return model(x).logits[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]  # (T-1,)


def test_option_logliks_equal_direct(tiny64):
    model, tok = tiny64
    prompt = longpo.render_chat(tok, ["the cat sat on a mat by the river, what is the key"])[0]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in ("blue", "the red stone", "x", "apple tree")]
    got = E.option_logliks(model, prompt, options)
    with torch.no_grad():
        want = [direct_logps(model, prompt + o)[len(prompt) - 1:].sum().item() for o in options]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert len(set(round(g, 6) for g in got)) == 4


def test_short_context_nll_and_kl_equal_direct(tiny64, tmp_path):
    model, tok = tiny64
    other, _ = longpo.load_model(make_model(str(tmp_path / "other"), seed=1), torch.float64, "sdpa")
    pairs = E.read_pairs(make_records(str(tmp_path / "r.jsonl"), n=3), 5)
    assert len(pairs) == 5
    got = E.short_context(other, tok, pairs, base=model)
    self_kl = E.short_context(model, tok, pairs, base=model)["kl"]
    nll = kl = n = 0.0
    with torch.no_grad():
        for msgs in pairs:
            ids, turns = longpo.render_chat(tok, msgs)
            keep = torch.tensor(turns[1:]) > 0
            x = torch.tensor(ids)[None]
            lp = other(x).logits[0, :-1].log_softmax(-1)[keep]
            lb = model(x).logits[0, :-1].log_softmax(-1)[keep]
            nll -= lp.gather(-1, x[0, 1:][keep][:, None]).sum().item()
            kl += torch.nn.functional.kl_div(lb, lp, log_target=True, reduction="sum").item()  # KL(other || model)
            n += int(keep.sum())
    assert got["tokens"] == n and got["pairs"] == 5
    assert got["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert got["kl"] == pytest.approx(kl / n, rel=1e-4) and got["kl"] > 0.01
    assert abs(self_kl) < 1e-6
    # the NLL is the one longpo.response_logps gives (the reference log-probs of training)
    total = sum(longpo.response_logps(other, tok, m).sum().item() for m in pairs)
    assert got["nll"] == pytest.approx(-total / n, rel=1e-5)


def test_multiple_choice_by_direct_logliks(tiny64, tmp_path):
    """acc picks the highest log-likelihood, acc_norm the highest per character: choices are searched for (in a
    fixed order) where the two picks differ, so that a swap of the two scores cannot pass."""
    model, tok = tiny64
    question = "what is the sun"
    prompt = longpo.render_chat(tok, [question])[0]

    def logliks(choices):
        with torch.no_grad():
            return [direct_logps(model, prompt + tok(c, add_special_tokens=False)["input_ids"])[len(prompt) - 1:]
                    .sum().item() for c in choices]

    pool = ["a star", "blue green tree", "one", "the moon is a stone", "x", "red", "where the river is blue"]
    for choices in itertools.combinations(pool, 3):
        ll = logliks(choices)
        best = max(range(3), key=ll.__getitem__)
        best_norm = max(range(3), key=lambda j: ll[j] / len(choices[j]))
        if best != best_norm:
            break
    assert best != best_norm
    items = [{"question": question, "choices": list(choices), "answer": a} for a in range(3)]
    got = E.multiple_choice(model, tok, items)
    assert got["items"] == 3
    assert got["acc"] == pytest.approx(100 / 3) and got["acc_norm"] == pytest.approx(100 / 3)
    assert E.multiple_choice(model, tok, [items[best]]) == dict(items=1, acc=100.0, acc_norm=0.0)
    assert E.multiple_choice(model, tok, [items[best_norm]]) == dict(items=1, acc=0.0, acc_norm=100.0)


def test_long_context_scores_decoded_outputs(tiny64, monkeypatch):
    """The sweep's plumbing: a sampler that echoes the first prompt of a batch (which holds every reference) and
    returns nothing for the second must give string_match_all 50 on every generated task."""
    model, tok = tiny64
    calls = []

    def echo(model, prompts, eos_ids, max_new_tokens, temperature, group):
        calls.append((len(prompts), temperature, max_new_tokens))
        return [(p if j == 0 else [], j == 0) for j, p in enumerate(prompts)]

    monkeypatch.setattr(E, "generate_tokens", echo)
    every = E.EvalConfig(samples=2, batch=4, tasks=list(E.TASKS), max_new_tokens=10**6)  # the echo is never cut
    out = E.long_context(every, model, tok, "tiny", [1024])
    for task in E.TASKS[:-1]:
        assert out[task][1024]["string_match_all"] == 50.0 and out[task][1024]["string_match_part"] == 50.0
    assert len(calls) == len(E.TASKS) - 1 and all(n == 2 and t == 0.0 and m == 10**6 for n, t, m in calls)
    # each prediction is held to its own sample's budget, whatever the batch decoded
    cfg = E.EvalConfig(samples=2, batch=4, tasks=["niah_single"], max_new_tokens=5)
    cut = E.long_context(cfg, model, tok, "tiny", [1024])
    first = cut["niah_single"][1024]["samples"][0]
    prompt = E.make_sample("niah_single", tok, 1024, 0, cfg)["prompt_ids"]
    assert first["pred"] == tok.decode(prompt[:5], skip_special_tokens=True).strip()
    mc = out["mc_records"][1024]
    for i, s in enumerate(mc["samples"]):  # the option picked is the argmax of its log-likelihoods, each given the
        # whole prompt (a plain forward over [prompt; option] as the oracle)
        assert s["pred"] == s["options"][max(range(4), key=s["logliks"].__getitem__)]
        prompt = E.make_sample("mc_records", tok, 1024, i, every)["prompt_ids"]
        with torch.no_grad():
            want = [direct_logps(model, prompt + tok(o, add_special_tokens=False)["input_ids"])[len(prompt) - 1:]
                    .sum().item() for o in s["options"]]
        assert s["logliks"] == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert mc["score"] == 50.0 * sum(s["pred"] == s["answers"][0] for s in mc["samples"])


# -----------------------------------------------------------------------------
# bad input


def test_tables_with_a_kl_left_out():
    """A later model with another vocabulary has no KL: its cell reads n/a instead of ending the sweep unsaved."""
    cell = {"score": 50.0}
    model = lambda short: {"beyond_max_positions": [], "ruler": {1024: 50.0}, "ruler_avg": 50.0,
                           "effective_length": 0, "long": {"vt": {1024: cell}}, "short": short}
    report = {"models": {"a": model({"nll": 0.5, "kl": 0.0, "acc": 40.0}), "b": model({"nll": 0.7, "acc": 50.0})}}
    text = E.tables(report, [1024], 85.6)
    row_b = next(line for line in text.splitlines() if line.startswith("b ") and "n/a" in line)
    assert row_b.split() == ["b", "0.7000", "+0.2000", "n/a", "50.0", "+10.0"]


def test_bad_mc_file_names_file_line_and_field(tmp_path):
    good = {"question": "q", "choices": ["a", "b"], "answer": 1}
    cases = [({**good, "answer": 2}, "field 'answer'"), ({**good, "choices": "ab"}, "field 'choices'"),
             ({**good, "question": ""}, "field 'question'"), ({**good, "answer": True}, "field 'answer'")]
    for bad, field_msg in cases:
        p = tmp_path / "mc.jsonl"
        p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=rf"mc.jsonl:2: {field_msg}"):
            E.read_mc(str(p))
    p.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match="mc.jsonl:2: malformed JSON"):
        E.read_mc(str(p))
    with pytest.raises(SystemExit, match="nope.jsonl: no such file"):
        E.read_mc(str(tmp_path / "nope.jsonl"))
    p.write_text(json.dumps(good) + "\n")
    assert E.read_mc(str(p)) == [good]


def test_bad_models_and_lengths(tmp_path):
    with pytest.raises(SystemExit, match="nowhere is not a directory"):
        E.resolve_models(E.EvalConfig(models=[f"a={tmp_path}/nowhere"]))
    with pytest.raises(SystemExit, match="has no config.json"):
        E.resolve_models(E.EvalConfig(models=[f"a={tmp_path}"]))
    assert E.parse_lengths(["4K", "1024", "2k"]) == [1024, 2048, 4096]
    with pytest.raises(SystemExit, match="--lengths"):
        E.parse_lengths(["four"])
    cfg = longpo.parse_config(E.EvalConfig, ["--models", "a=x", "b=y", "--lengths", "1K", "2K", "--samples", "3"])
    assert cfg.models == ["a=x", "b=y"] and cfg.lengths == ["1K", "2K"] and cfg.samples == 3
    assert E.resolve_tasks(["all"]) == list(E.TASKS) and E.resolve_tasks(["vt", "cwe"]) == ["vt", "cwe"]
    assert set(E.EvalConfig().tasks) < set(E.TASKS)
    with pytest.raises(SystemExit, match="--tasks: unknown task 'niah'"):
        E.resolve_tasks(["vt", "niah"])


# -----------------------------------------------------------------------------
# end to end


def test_end_to_end_tiny_models(tmp_path):
    a, b = make_model(str(tmp_path / "a")), make_model(str(tmp_path / "b"), seed=1)
    with open(os.path.join(b, "config.json")) as f:
        conf = json.load(f)
    conf["max_position_embeddings"] = 1100  # so that 1200 runs beyond b's positions: warned, run, starred
    with open(os.path.join(b, "config.json"), "w") as f:
        json.dump(conf, f)
    short = make_records(str(tmp_path / "short.jsonl"), n=3)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"what is {w}", "choices": ["red", "blue stone", "one tree"],
                                      "answer": j % 3}) + "\n" for j, w in enumerate(["sun", "moon", "key"])))
    out = tmp_path / "eval.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    p = subprocess.run([sys.executable, "eval.py", "--models", f"a={a}", f"b={b}", "--lengths", "1024", "1200",
                        "--samples", "2", "--max_new_tokens", "8", "--short_data", short, "--mc", str(mc),
                        "--tasks", "all", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=HERE)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert list(rep["models"]) == ["a", "b"] and rep["lengths"] == [1024, 1200]
    for name in ("a", "b"):
        m = rep["models"][name]
        assert set(m["long"]) == set(E.TASKS)
        for task in E.TASKS:
            assert set(m["long"][task]) == {"1024", "1200"}
            for L in ("1024", "1200"):
                cell = m["long"][task][L]
                assert len(cell["samples"]) == 2 and 0 <= cell["score"] <= 100
                assert all(0.99 * int(L) <= s["tokens"] <= int(L) for s in cell["samples"])
        ruler = {int(L): v for L, v in m["ruler"].items()}
        assert ruler[1024] == pytest.approx(sum(m["long"][t]["1024"]["score"] for t in E.TASKS) / len(E.TASKS))
        assert m["effective_length"] == E.effective_length(ruler, 85.6)
        assert m["short"]["pairs"] == sum(len(json.loads(line)["turns"]) for line in open(short))
        assert m["short"]["items"] == 3
    assert rep["models"]["a"]["short"]["kl"] == pytest.approx(0, abs=1e-6) and rep["models"]["b"]["short"]["kl"] > 0
    assert rep["models"]["a"]["beyond_max_positions"] == [] and rep["models"]["b"]["beyond_max_positions"] == [1200]
    # the three tables, every length and every task
    assert "warning: b" in p.stdout and "RULER-like" in p.stdout and "per task" in p.stdout
    assert "short context" in p.stdout and "delta" in p.stdout
    tables = p.stdout[p.stdout.index("RULER-like"):]
    for task in E.TASKS:
        assert tables.count(f" {task} ") == 2
    row_b = next(line for line in tables.splitlines() if line.startswith("b "))
    assert row_b.split()[2].endswith("*") and not row_b.split()[1].endswith("*")


# =============================================================================
# the whole method: generate -> train at sp = 2 -> evaluate, and a checkpoint as the next round's πS


def eval_tables(stdout):
    """The tables eval.py prints, without the wall time."""
    return [line for line in stdout[stdout.index("RULER-like"):].splitlines()
            if not line.startswith(("wall time", "wrote"))]


def test_eval_spread_over_ranks_prints_the_table_of_one_process(heads93, tmp_path):
    """eval.py with each sample spread over 2 ranks (sp 2: 9 query / 3 kv heads, uneven shares) and with samples
    split over 2 dp groups prints the tables of one process, float64: every generated answer, option
    log-likelihood, NLL and KL the same."""
    d, path = heads93
    other = make_model(str(tmp_path / "other"), family="llama", heads=9, kv_heads=3, hidden=36, seed=5)
    short = make_records(str(tmp_path / "short.jsonl"), n=3)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"what is {w}", "choices": ["red", "blue stone", "one tree"],
                                      "answer": j % 3}) + "\n" for j, w in enumerate(["sun", "moon", "key"])))
    args = ["eval.py", "--models", f"a={path}", f"b={other}", "--lengths", "512", "--tasks", "niah_single", "vt",
            "mc_records", "--samples", "3", "--batch", "2", "--max_new_tokens", "6", "--short_data", short, "--mc",
            mc, "--dtype", "float64"]
    one = torchrun(1, "test_longpo.py", "exact", *args, "--json", tmp_path / "one.json")
    for nproc, sp in ((2, 2), (2, 1)):
        got = torchrun(nproc, "test_longpo.py", "exact", *args, "--sp", sp, "--json", tmp_path / f"{sp}.json")
        assert eval_tables(got) == eval_tables(one), (nproc, sp)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "2.json"))
    for name in ("a", "b"):
        for task in ("niah_single", "vt", "mc_records"):
            a, b = one["models"][name]["long"][task]["512"], two["models"][name]["long"][task]["512"]
            assert [s["pred"] for s in a["samples"]] == [s["pred"] for s in b["samples"]]
            if task == "mc_records":
                assert [x for s in a["samples"] for x in s["logliks"]] == pytest.approx(
                    [x for s in b["samples"] for x in s["logliks"]], rel=1e-10)


def test_eval_killed_mid_sweep_resumes_its_cells(tiny, tmp_path):
    """eval.py killed (SIGKILL) once some cells are saved, then rerun with the same flags: the finished cells are
    read back, not computed again, and the JSON equals an uninterrupted run's (but the wall time)."""
    import signal
    import time as clock
    args = [sys.executable, "eval.py", "--models", f"a={tiny / 'model'}", f"b={tiny / 'tied'}", "--lengths", "512",
            "700", "--tasks", "niah_single", "vt", "--samples", "2", "--max_new_tokens", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    full = subprocess.run(args + ["--json", str(tmp_path / "full.json")], capture_output=True, text=True, env=env,
                          cwd=HERE, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    cells = tmp_path / "cut.json.cells.jsonl"
    p = subprocess.Popen(args + ["--json", str(tmp_path / "cut.json")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env, cwd=HERE)
    while p.poll() is None and (not cells.exists() or cells.read_text().count("\n") < 3):
        clock.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    saved = cells.read_text().count("\n")
    assert 3 <= saved < 8 and not (tmp_path / "cut.json").exists()  # 2 models x 2 tasks x 2 lengths: cut midway
    rerun = subprocess.run(args + ["--json", str(tmp_path / "cut.json")], capture_output=True, text=True, env=env,
                           cwd=HERE, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{saved} cell(s) already in {cells}: not computed again" in rerun.stdout
    assert rerun.stdout.count(" tokens: score ") == 8 - saved  # only the rest was computed
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("full.json", "cut.json"))
    for rep in (a, b):
        del rep["wall_s"], rep["config"]["json"]
    assert a == b
    with open(cells, "a") as f:  # a line torn by a crash mid-write: cut off, the rerun goes on from the rest
        f.write('{"key": "abc", "res')
    again = subprocess.run(args + ["--json", str(tmp_path / "cut.json")], capture_output=True, text=True, env=env,
                           cwd=HERE, timeout=300)
    assert again.returncode == 0 and "8 cell(s) already in" in again.stdout and cells.read_text().endswith("\n")


def test_end_to_end_generate_train_eval(pipeline, tmp_path):
    """A tiny model writes its own preference data, trains on it under torchrun at sp = 2, is evaluated against
    itself before training; then the checkpoint is a valid --model for generate.py (round 2's πS)."""
    d, path, args = pipeline
    data = tmp_path / "data.jsonl"
    run_generate(*args, "--out", data)
    records = longpo.read_records(str(data))
    assert records and all(len(r["turns"]) >= 1 for r in records)
    for r in records:
        assert {"id", "document", "turns", "meta"} <= set(r)
        for t in r["turns"]:
            assert t["ref_chosen_logp"] <= 0 and t["ref_rejected_logp"] <= 0
    out = tmp_path / "run"
    # --max_len bounds the document in generate.py, the whole multi-turn sequence in longpo.py
    log = torchrun(2, "longpo.py", "--data", data, "--model", path, "--out", out, "--max_len", 4096,
                   "--global_batch", 1, "--max_steps", 2, "--lr", 1e-3, "--logp_budget", 64 * 320, "--rope_theta", 0)
    assert "was written by" not in log  # generate.py's meta.model names the model trained here
    metrics = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert all(math.isfinite(m[k]) for k in ("loss", "l_mt", "nll", "reward_margin", "grad_norm"))
    ckpt = longpo.checkpoints(str(out))[-1]
    report = tmp_path / "eval.json"
    p = subprocess.run([sys.executable, "eval.py", "--models", f"base={path}", f"longpo={ckpt}", "--lengths", "512",
                        "640", "--samples", "1", "--max_new_tokens", "8", "--short_data", str(data), "--json",
                        str(report)], capture_output=True, text=True, timeout=300, cwd=HERE,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(report.read_text())
    for name in ("base", "longpo"):
        m = rep["models"][name]
        assert set(m["long"]) == set(E.DEFAULT_TASKS)  # no --tasks: the default four
        assert all(set(m["long"][t]) == {"512", "640"} for t in E.DEFAULT_TASKS)
        assert math.isfinite(m["short"]["nll"])
    assert rep["models"]["base"]["short"]["kl"] == pytest.approx(0, abs=1e-6)
    assert rep["models"]["longpo"]["short"]["kl"] > 0  # training moved the model
    # round 2: the checkpoint as πS, writing data for a longer length
    round2 = tmp_path / "round2.jsonl"
    log = run_generate(*args[2:], "--model", ckpt, "--out", round2, "--max_docs", 2)
    assert "documents in the length range" in log
    assert all(json.loads(x)["meta"]["model"] == ckpt for x in open(round2) if x.strip())


def exact(script, *args):
    """Runs a script of the project (under torchrun: each rank) with exact_rmsnorm: float64 runs that are compared
    across layouts then differ by float64 rounding only."""
    import runpy
    exact_rmsnorm()
    sys.argv = [script, *args]
    runpy.run_path(os.path.join(HERE, script), run_name="__main__")


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    worker(sys.argv[2])
if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "exact":
    exact(*sys.argv[2:])


# -----------------------------------------------------------------------------
# miniature.py: the world, building πS, the experiment at toy size

import miniature as M  # noqa: E402


def test_world_texts_are_consistent():
    """Every fact in its text once, keys distinct, the asked answer where the text says, exact token counts, one
    token a word (no unknown token anywhere in the world's texts, prompts or questions)."""
    tok = M.make_tokenizer()
    unk = tok.convert_tokens_to_ids("[UNK]")
    rng = random.Random(5)
    for n, k in ((40, 1), (300, 6), (2000, 40)):
        text, facts = M.document(rng, n, k)
        assert len(text.split()) == n and len(facts) == k
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == n and unk not in ids
        for key, value in facts.items():
            assert text.count(M.fact(key, value)) == 1 and text.count(f" {key} ") + text.startswith(key) == 1
            assert M.key_of(M.question(key)) == key
    for prompt in (G.POOL_PROMPT.format(n=4), G.FALLBACK_INSTRUCTION, M.pool_answer(M.KEYS[:4], 4)):
        assert unk not in tok(prompt, add_special_tokens=False)["input_ids"]
    assert M.key_of(G.FALLBACK_INSTRUCTION) is None and M.key_of("what is the code of ?") is None
    # generate.py's parser reads the pool πS is taught to write, as decoded by the tokenizer
    pool = M.pool_answer(M.KEYS[:3], 4)
    decoded = tok.decode(tok(pool, add_special_tokens=False)["input_ids"])
    assert G.parse_pool(decoded) == [M.question(k) for k in M.KEYS[:3]]


def test_world_eval_tasks_and_corpus(tmp_path):
    tok = M.make_tokenizer()
    path = tmp_path / "tasks.jsonl"
    M.write_eval_tasks(str(path), [256, 1024], 3, M.EVAL_SEED, tok)
    own = E.read_task_file(str(path))
    cfg = E.EvalConfig(samples=3)
    for L in (256, 1024):
        for s in own["world_code"][L]:
            key = M.key_of(s["user"].split("\n\n")[-1])
            assert M.fact(key, s["answers"][0]) in s["user"]  # answerable from its text, answer as stated
            assert E.file_sample(s, tok, L, 0, cfg)["tokens"] == L  # prompt + answer: exactly the length
    M.write_corpus(str(tmp_path / "c.jsonl"), 3, 1024, 2048, 416, 1)
    facts = json.load(open(tmp_path / "c.jsonl.facts.json"))
    for line, kv in zip(open(tmp_path / "c.jsonl"), facts):
        text = json.loads(line)["text"]
        words = text.split()
        assert 1024 < len(words) <= 2048 and len(words) % 416 == 0 and len(kv) == len(words) // 416
        for b in range(0, len(words), 416):  # each chunk-sized block holds exactly one of the document's facts
            block = " ".join(words[b:b + 416])
            assert sum(M.fact(k, v) in block for k, v in kv.items()) == 1


def test_task_file_errors_name_file_line_field(tmp_path):
    path = tmp_path / "t.jsonl"
    good = {"task": "mine", "length": 300, "user": "a question", "answers": ["x"]}
    for bad, field_name in (({**good, "task": "vt"}, "task"), ({**good, "length": "300"}, "length"),
                            ({**good, "answers": []}, "answers"), ({**good, "user": ""}, "user"),
                            ({**good, "depth": "deep"}, "depth"), ({**good, "depth": 1.5}, "depth")):
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(SystemExit, match=f"t.jsonl:2: field '{field_name}'"):
            E.read_task_file(str(path))
    assert E.resolve_tasks(["niah_single"], ["mine"]) == ["niah_single", "mine"]
    assert E.resolve_tasks(["all"], ["mine"]) == list(E.TASKS) + ["mine"]


def test_grade_counts_right_and_wrong(tmp_path):
    corpus = tmp_path / "c.jsonl"
    M.write_corpus(str(corpus), 1, 200, 400, 100, 3)
    text = json.loads(corpus.read_text())["text"]
    kv = json.load(open(str(corpus) + ".facts.json"))[0]
    k1, k2 = list(kv)[:2]
    span = [0, len(text)]
    wrong = next(v for v in M.VALUES if v not in (kv[k1], kv[k2]))
    turns = [dict(chunk=span, instruction=M.question(k1), chosen=kv[k1], rejected=wrong),  # right, wrong
             dict(chunk=span, instruction=M.question(k2), chosen=wrong, rejected=kv[k2]),  # wrong, right
             dict(chunk=span, instruction=G.FALLBACK_INSTRUCTION, chosen="x", rejected="y")]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "d", "document": text, "turns": turns}) + "\n")
    g = M.grade(str(data), str(corpus))
    assert (g["turns"], g["gradable"], g["fallback_instruction"], g["chosen_right"], g["rejected_wrong"]) == (3, 2, 1, 1, 1)
    assert g["chosen_right_rate"] == g["rejected_wrong_rate"] == 0.5


def test_pi_s_build_loss_falls(tmp_path):
    """A tiny πS build: a few steps at a small size, its loss falls, and the result loads as a project model."""
    cfg = M.MiniConfig(pi_s=str(tmp_path / "pi"), build_steps=40, build_tokens=1024, build_lr=5e-3, layers=1,
                       hidden=32, heads=2, mlp=64, window=256)
    losses = M.build(cfg)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    model, tok = longpo.load_model(cfg.pi_s, attn="sdpa")
    assert model.config.max_position_embeddings == 256 and tok.chat_template == M.CHAT_TEMPLATE


def test_miniature_end_to_end_toy(tmp_path):
    """The whole experiment at toy size on the shipped πS: every stage runs as a user runs it, results.json holds
    every model at every length, and each score is what eval.py's own scorer gives for the samples it wrote."""
    out = tmp_path / "mini"
    p = subprocess.run([sys.executable, "miniature.py", "--out", str(out), "--docs", "8", "--docs_r2", "6",
                        "--eval_samples", "2", "--epochs", "1", "--global_batch", "1", "--procs", "1",
                        "--ablation", "false", "--curve_every", "4"], capture_output=True, text=True, cwd=HERE,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["lengths"] == [256, 512, 1024, 2048, 4096]
    assert set(res["models"]) == set(res["exact"]) == {"pi_s", "pi_s_theta", "sft", "sft_rejected", "dpo", "longpo",
                                                       "longpo_r2"}
    # Fig. 4's curves: step 0 is the policy before any step, the intermediate checkpoints are scored (then
    # removed), and each curve's last point is its objective's row of the table
    far = [L for L in res["lengths"] if L > res["window"]]
    for name in ("sft", "sft_rejected", "dpo", "longpo"):
        c = res["curves"][name]
        assert c["steps"][0] == 0 and len(c["steps"]) >= 3 and c["steps"] == sorted(c["steps"])
        assert c["long"][-1] == sum(res["models"][name][str(L)] for L in far) / len(far)
        assert c["kl"][-1] == res["short"][name]["kl"] and c["kl"][0] == res["short"]["pi_s_theta"]["kl"]
        assert [os.path.basename(x) for x in longpo.checkpoints(str(out / name))] == [f"step-{c['steps'][-1]:06d}"]
    assert (out / "curves.png").stat().st_size > 0
    report = json.load(open(out / "eval.json"))
    for name, scores in res["models"].items():
        for L in res["lengths"]:
            samples = report["models"][name]["long"]["world_code"][str(L)]["samples"]
            assert len(samples) == 2
            preds, refs = [s["pred"] for s in samples], [s["answers"] for s in samples]
            assert scores[str(L)] == E.string_match_all(preds, refs)
            assert res["exact"][name][str(L)] == E.exact_match(preds, refs)
    g = res["data"]["r1"]
    assert g["turns"] == g["gradable"] + g["fallback_instruction"] + g["malformed_question"] + g["key_not_in_chunk"]
    assert g["turns"] > 0 and 0 <= g["chosen_right_rate"] <= 1
    again = M.grade(str(out / "r1.jsonl"), str(out / "corpus_r1.jsonl"))  # the grades are of round 1's own files
    assert {k: g[k] for k in again} == again
    assert (out / "scores.png").stat().st_size > 0 and (out / "rewards.png").stat().st_size > 0
    assert "LongPO round 2" in p.stdout
    # a finished run is not resumed (its curves' checkpoints are gone): one line, nothing changed
    before = (out / "results.json").read_bytes()
    p = subprocess.run([sys.executable, "miniature.py", "--out", str(out), "--resume", "true"], capture_output=True,
                       text=True, cwd=HERE, timeout=120)
    assert p.returncode != 0 and "that run finished" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert (out / "results.json").read_bytes() == before


# -----------------------------------------------------------------------------
# non-finite values never reach the weights (careless or hostile input)


def test_non_finite_flags_references_and_weights_refused(tiny, tmp_path):
    for flag in ("inf", "nan", "-inf", "1e999", "1e39"):
        with pytest.raises(SystemExit, match=f"--lr takes a finite number, got '{flag}'"):
            longpo.parse_config(longpo.Config, ["--lr", flag])
    # a reference log-prob finite in JSON but past float32's range, or an integer too large for a float
    rec = json.loads(open(tiny / "data.jsonl").readline())
    for bad, match in (("-1e39", "field 'turns\\[0\\].ref_chosen_logp': expected a number within float32's range"),
                       ("-" + "9" * 400, "field 'turns\\[0\\].ref_chosen_logp': expected a finite number, got -9999"),
                       ("-" + "9" * 5001, "malformed JSON")):
        line = json.dumps(rec).replace(json.dumps(rec["turns"][0]["ref_chosen_logp"]), bad, 1)
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:1: {match}"):
            longpo.read_records(str(tmp_path / "bad.jsonl"))
    # a --model holding a NaN weight is refused, naming the tensor
    from safetensors.torch import load_file, save_file
    model = tmp_path / "nan_model"
    import shutil
    shutil.copytree(tiny / "model", model)
    weights = load_file(str(model / "model.safetensors"))
    name = sorted(weights)[3]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    args = train_args(tiny, tmp_path / "out", "--max_steps", 1)
    args[args.index("--model") + 1] = model
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode != 0 and f"tensor {name} holds non-finite values" in p.stderr
    assert "holds non-finite values" in p.stderr and not os.path.exists(tmp_path / "out" / "step-000001")


def test_non_finite_steps_are_skipped_then_stop(tiny, tmp_path):
    """--lr 1e30: step 1 is finite and applied, step 2's loss is not: it is skipped (not applied, logged as
    skipped in strict JSON) and, with --max_bad_steps 1, the run stops naming the step and its records. Nothing
    non-finite is ever on disk."""
    out = tmp_path / "out"
    args = train_args(tiny, out, "--save_every", 1, "--max_bad_steps", 1)
    args[args.index("--lr") + 1] = 1e30
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and "stopping at step 2: 1 step(s) in a row with a non-finite loss" in p.stderr
    step2 = sorted(i + 1 for i in longpo.schedule(6, longpo.Config(global_batch=2, epochs=2))[1])  # its lines
    assert f"the last held the records at lines {step2} of {tiny / 'data.jsonl'}" in p.stderr
    lines = open(out / "metrics.jsonl").read().splitlines()
    recs = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for line in lines]
    assert [r["skipped"] for r in recs] == [False, True] and recs[1]["loss"] is None
    assert longpo.checkpoints(str(out)) == [str(out / "step-000001")]
    assert all(torch.isfinite(t).all() for t in load_weights(out / "step-000001").values())


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.update(document="   \n "), r"bad.jsonl:2: field 'document': missing, empty"),
    (lambda r: r.update(document="abc\ud800def" * 5), r"bad.jsonl:2: field 'document': holds a lone surrogate"),
    (lambda r: r["turns"][0].update(chosen="x\udfff"), r"bad.jsonl:2: field 'turns\[0\].chosen': holds a lone"),
    (lambda r: r.update(meta="abc"), r"bad.jsonl:2: field 'meta': expected an object, got str"),
    (lambda r: r["turns"][0].update(chunk=[10, 5]), r"bad.jsonl:2: field 'turns\[0\].chunk': span \[10, 5\] is empty"),
    (lambda r: r["turns"][0].update(chunk=[4, 4]), r"bad.jsonl:2: field 'turns\[0\].chunk': span \[4, 4\] is empty"),
])
def test_more_bad_records(tmp_path, mutate, message):
    with pytest.raises(ValueError, match=message):
        longpo.read_records(bad_line(tmp_path, mutate))


def test_bad_inputs_end_in_one_line(tiny, tmp_path, capsys):
    """A user's mistake: one line naming file, line and field (or the flag), no traceback."""
    bad_utf8 = tmp_path / "utf8.jsonl"
    good = open(tiny / "data.jsonl", "rb").readline()
    bad_utf8.write_bytes(good + good.replace(b"what", b"wh\xffat", 1))
    with pytest.raises(ValueError, match=r"utf8.jsonl:2: not UTF-8 text: byte 0xff at column \d+"):
        longpo.read_records(str(bad_utf8))
    tok = longpo.load_model(str(tiny / "model"), torch.float32, "sdpa")[1]
    path = bad_line(tmp_path, lambda r: r["turns"][0].update(chosen="a <|im_end|> b") and None)
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*special token.*\(field 'turns\[0\].chosen'\)"):
        longpo.prepare_data(longpo.Config(data=path, max_len=4096), tok)
    cases = [(["--data", str(bad_utf8)], "utf8.jsonl:2: not UTF-8 text", 2),
             (["--data", str(tmp_path)], "a directory, expected a JSONL file", 2),
             (["--out", str(bad_utf8)], "a file (or under one), expected a directory", 2),
             (["--sp", "-1"], "--sp -1: must be 0", 2),
             (["--out", str(bad_utf8 / "sub")], "a file (or under one)", 2),
             (["--rope_theta", "-1"], "--rope_theta -1.0 is out of range", 2),
             (["--weight_decay", "-1"], "--weight_decay -1.0 is out of range", 2),
             (["--lr", "inf"], "--lr takes a finite number", 2)]
    for j, (extra, message, status) in enumerate(cases):
        args = train_args(tiny, tmp_path / "out", "--max_steps", 1)
        for k in range(0, len(extra), 2):
            if extra[k] in args:
                args[args.index(extra[k]) + 1] = extra[k + 1]
            else:
                args += extra[k:k + 2]
        if j == 0:  # the first as its own process, the rest as the command line runs main (run_script)
            p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=HERE,
                               timeout=120)
            code, err = p.returncode, p.stderr
        else:
            code, _, err = cli(train_main, args[1:], capsys)
        assert code == status and message in err and "Traceback" not in err, (extra, err[-500:])


def test_remainder_records_are_reported(tiny, tmp_path):
    five = tmp_path / "five.jsonl"
    five.write_text("".join(open(tiny / "data.jsonl").readlines()[:5]))
    args = train_args(tiny, tmp_path / "out", "--max_steps", 1)
    args[args.index("--data") + 1] = five
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 record(s) an epoch fill no batch of --global_batch 2 and are left out of that epoch" in p.stdout


def test_generate_corpus_and_flags(tmp_path, capsys):
    # U+2028 inside a JSON string is text, not a line break; control-token strings go to a fixed point
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n" + json.dumps({"text": "c"}) + "\n",
                      encoding="utf-8")
    assert [t for _, t in G.read_corpus(str(corpus))] == ["a\u2028b", "c"]
    for bad, message in (('{"text": "ab\\ud800c"}', "c.jsonl:1: field 'text' holds a lone surrogate"),
                         ('{"text": "a", "n": ' + "9" * 5000 + "}", "c.jsonl:1: malformed JSON")):
        corpus.write_text(bad + "\n")
        with pytest.raises(SystemExit, match=message):
            G.read_corpus(str(corpus))
    assert G.remove_specials("x<|im_<|im_end|>end|>y<|im_end|>", ["<|im_end|>"]) == ("xy", 3)
    flags = (["--chunk_tokens", "-1"], ["--pool_temperature", "-1"], ["--sp", "-1"], ["--chunk_cap", "0"],
             ["--response_top_p", "0"], ["--rep_ratio_rejected", "1.5"], ["--long_rope_theta", "-1"])
    for k, flag in enumerate(flags):  # the first as its own process, the rest as the command line runs main
        if k == 0:
            p = subprocess.run([sys.executable, "generate.py", "--out", str(tmp_path / "o.jsonl"), *flag],
                               capture_output=True, text=True, cwd=HERE, timeout=120)
            code, err = p.returncode, p.stderr
        else:
            code, _, err = cli(G.main, ["--out", tmp_path / "o.jsonl", *flag], capsys)
        assert code == 2 and err.startswith(f"{flag[0]} ") and "is out of range" in err
        assert not os.path.exists(tmp_path / "o.jsonl.parts")  # nothing written that a corrected rerun would refuse


def test_eval_output_path_checked_before_any_model(tmp_path):
    (tmp_path / "f").write_text("x")
    for bad in (str(tmp_path), str(tmp_path / "f" / "eval.json")):
        with pytest.raises(SystemExit, match="cannot be written"):
            E.main(E.EvalConfig(json=bad, models=["nowhere"]))


def test_eval_inputs_checked_before_any_model(tiny, tmp_path, monkeypatch):
    """A special-token string or invalid UTF-8 in --mc, --short_data or --task_file stops eval.py before the first
    model loads, in one line naming file:line:field; from the command line, exit status 2 and no traceback."""
    model, rec = str(tiny / "model"), json.loads(open(tiny / "data.jsonl").readline())
    mc = {"question": "Which?", "choices": ["a", "b"], "answer": 0}
    cases = [("--mc", json.dumps(mc) + "\n" + json.dumps({**mc, "choices": ["a", "b <|im_end|>"]}),
              r"m.jsonl:2: field 'choices\[1\]': holds the special token '<\|im_end\|>' of model 'a' as text"),
             ("--mc", json.dumps({**mc, "question": "x\ud800"}), r"m.jsonl:1: field 'question': holds a lone surrogate"),
             ("--short_data", json.dumps({**rec, "turns": [{**rec["turns"][0], "instruction": "what <|im_start|>"}]}),
              r"m.jsonl:1: field 'turns\[0\].instruction': holds the special token '<\|im_start\|>'"),
             ("--task_file", json.dumps({"task": "mine", "length": 256, "user": "a <|im_end|>", "answers": ["a"]}),
              r"m.jsonl:1: field 'user': holds the special token")]
    monkeypatch.setattr(longpo, "load_model", lambda *a, **k: pytest.fail("a model loaded before the inputs"))
    for flag, text, message in cases:
        (tmp_path / "m.jsonl").write_text(text + "\n")
        cfg = E.EvalConfig(models=[f"a={model}"], json=str(tmp_path / "e.json"), lengths=["256"], samples=1)
        setattr(cfg, flag[2:], str(tmp_path / "m.jsonl"))
        with pytest.raises(ValueError, match=message):
            E.main(cfg)
    (tmp_path / "m.jsonl").write_bytes(json.dumps(mc).encode() + b"\n" + json.dumps(mc).encode().replace(b"a", b"\xff", 1))
    p = subprocess.run([sys.executable, "eval.py", "--models", f"a={model}", "--mc", str(tmp_path / "m.jsonl"),
                        "--json", str(tmp_path / "e.json")], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"{tmp_path / 'm.jsonl'}:2: not UTF-8 text: byte 0xff")


def test_task_file_samples_spread_and_exact_match():
    assert E.spread(list(range(100)), 4) == [0, 25, 50, 75] and E.spread([1, 2], 2) == [1, 2]
    assert E.exact_match([" 417 ", "417 . the", "x"], [["417"], ["417"], ["X"]]) == pytest.approx(200 / 3)
    assert E.string_match_all(["417 . the"], [["417"]]) == 100.0


def test_update_that_overflows_a_weight_stops_at_once(tiny, tmp_path, monkeypatch, capsys):
    """An update that leaves a weight non-finite although the loss and gradient were finite (no lr the flag check
    accepts does that to a model's weights, so the optimizer's step here adds an overflow of its own): the run stops
    at that step, naming it and the lr, and writes no checkpoint of it."""
    real = torch.optim.RMSprop.step

    def overflowing(self, *a, **k):
        out = real(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][1].mul_(1e38).mul_(1e38)  # a weight past float32's range: inf
        return out
    monkeypatch.setattr(torch.optim.RMSprop, "step", overflowing)
    out = tmp_path / "out"
    code, _, err = cli(train_main, train_args(tiny, out, "--optimizer", "rmsprop", "--save_every", 1)[1:], capsys)
    assert code == 2 and "stopping at step 1: its update made parameter" in err and "--lr 0.001" in err
    assert longpo.checkpoints(str(out)) == []


# -----------------------------------------------------------------------------
# hostile input, by class: no wrong number, no silent loss, no traceback (each class: several cases, run as the
# command line runs them, through run_script, and one case of each as a separate process)


def cli(main, argv, capsys):
    """A script's main as its command line runs it (longpo.run_script): (exit status, stdout, stderr)."""
    try:
        longpo.run_script(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    """The last line of stderr, which run_script writes (transformers' loading bars may precede it)."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert "Traceback" not in err and lines, err[-2000:]
    return lines[-1]


def train_main(argv):
    return longpo.train(longpo.parse_config(longpo.Config, argv))


def eval_main(argv):
    return E.main(longpo.parse_config(E.EvalConfig, argv))


def scaled_model(tmp_path, name, factor):
    """A copy of a tiny model with its LM head scaled by factor (1e38: finite weights whose logits overflow)."""
    from safetensors.torch import load_file, save_file
    path = tmp_path / name
    shutil.copytree(make_model(str(tmp_path / (name + "_src"))), path)
    weights = load_file(str(path / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * factor
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def test_hostile_non_finite_scores_are_reported_never_scored(tmp_path, capsys):
    """Class 1: a model whose weights are finite but whose logits overflow (head x 1e38): every table says
    "non-finite" where a number would be (generated answers, multiple-choice records, NLL, MC acc), nothing is
    scored, and the JSON and its cells stay strict JSON."""
    bad = scaled_model(tmp_path, "overflow", 1e38)
    good = make_model(str(tmp_path / "good"))
    short = make_records(str(tmp_path / "short.jsonl"), n=2)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "what is red", "choices": ["red", "blue"], "answer": 0}) + "\n")
    code, out, err = cli(eval_main, ["--models", f"a={good}", f"b={bad}", "--lengths", "512", "--tasks", "niah_single",
                                     "mc_records", "--samples", "2", "--max_new_tokens", "4", "--short_data", short,
                                     "--mc", mc, "--json", tmp_path / "e.json"], capsys)
    assert code == 0, err[-2000:]
    tables = out[out.index("RULER-like"):]
    row = lambda name, *words: next(x for x in tables.splitlines() if x.split()[:1 + len(words)] == [name, *words])
    assert row("b").split()[1:3] == ["non-finite", "non-finite"] and "non-finite" not in row("a")
    assert row("b", "niah_single").split()[2] == "non-finite" and row("b", "mc_records").split()[2] == "non-finite"
    assert [x for x in tables.splitlines() if x.startswith("b ")][-1].split()[1:3] == ["non-finite", "non-finite"]
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    rep = strict((tmp_path / "e.json").read_text())
    b = rep["models"]["b"]
    assert b["long"]["niah_single"]["512"]["score"] is None and b["ruler_avg"] is None and b["short"]["nll"] is None
    assert b["short"]["acc"] is None and all(s.get("non_finite") for s in b["long"]["mc_records"]["512"]["samples"])
    for line in (tmp_path / "e.json.cells.jsonl").read_text().splitlines():
        strict(line)


def test_hostile_outputs_over_inputs_are_refused(tiny, tmp_path, capsys):
    """Class 2: an --out that is the corpus (or inside its folder), a corpus folder reached twice through a symlink
    loop or listing one file twice, an eval --json that is its --mc file, a longpo.py --data that is a file its
    --out holds: each refused in one line before any work, the inputs unchanged."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": words(random.Random(0), 200)}) + "\n")
    before = corpus.read_bytes()
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(words(random.Random(1), 200))
    loop = tmp_path / "loop"
    shutil.copytree(folder, loop)
    os.symlink(loop, loop / "sub" / "back")  # a folder reachable through a link back to itself
    twice = tmp_path / "twice"
    shutil.copytree(folder, twice)
    os.symlink(twice / "a.txt", twice / "sub" / "b.txt")
    model = tiny / "model"
    cases = [([f"--corpus={corpus}", f"--out={corpus}"], f"--out {corpus}: {corpus} is (or holds) the corpus's file"),
             ([f"--corpus={folder}", f"--out={folder / 'records.jsonl'}"], f"lies inside the --corpus folder {folder}"),
             ([f"--corpus={loop}", f"--out={tmp_path / 'o.jsonl'}"], "is reached twice"),
             ([f"--corpus={twice}", f"--out={tmp_path / 'o.jsonl'}"], "lists one file twice")]
    for args, message in cases:
        code, _, err = cli(G.main, [f"--model={model}", *args], capsys)
        assert code == 2 and message in one_line(err), (args, err[-1000:])
    assert corpus.read_bytes() == before and not os.path.exists(str(corpus) + ".parts")
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    code, _, err = cli(eval_main, ["--models", f"a={model}", "--mc", mc, "--json", mc], capsys)
    assert code == 2 and f"--json {mc}: {mc} is the --mc file" in one_line(err)
    out = tmp_path / "run"
    out.mkdir()
    data = out / "metrics.jsonl"
    shutil.copy(tiny / "data.jsonl", data)
    code, _, err = cli(train_main, ["--data", data, "--model", model, "--out", out, "--max_len", 4096], capsys)
    assert code == 2 and "is a file this run writes or removes in --out" in one_line(err)
    assert data.read_bytes() == (tiny / "data.jsonl").read_bytes()
    p = subprocess.run([sys.executable, "generate.py", "--model", str(model), "--corpus", str(corpus), "--out",
                        str(corpus)], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and "the records would replace the corpus" in one_line(p.stderr)
    assert corpus.read_bytes() == before


def test_hostile_data_changed_under_a_run_is_noticed(tiny, tmp_path, monkeypatch, capsys):
    """Class 3: --data rewritten in place after the first step, at the same length and at another: the run stops
    at the first record it reads again, in one line saying the file changed (not "malformed JSON" about a valid
    line), and the checkpoint it wrote records the sha256 of the data it trained on."""
    real = longpo.accumulate
    for edit in (lambda t: t.replace("the", "teh"), lambda t: t.replace("the", "the the")):
        data = tmp_path / "data.jsonl"
        shutil.copy(tiny / "data.jsonl", data)
        sha = longpo.file_fingerprint(str(data))
        steps = []

        def accumulate(*a, **k):
            if steps:  # after the first step: the file is edited in place
                data.write_text(edit(data.read_text()))
            steps.append(1)
            return real(*a, **k)
        monkeypatch.setattr(longpo, "accumulate", accumulate)
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        code, _, err = cli(train_main, ["--data", data, "--model", tiny / "model", "--out", out, "--max_len", 4096,
                                        "--global_batch", 2, "--save_every", 1, "--logp_budget", 64 * 320], capsys)
        assert code == 2 and "the file changed while this run used it" in one_line(err), err[-1000:]
        assert json.load(open(out / "step-000001" / "longpo_config.json"))["data_sha256"] == sha


def test_hostile_damaged_checkpoints_are_named(tiny, tmp_path, capsys):
    """Class 4: --resume over a truncated train-state shard, a missing .metadata, a corrupt longpo_config.json, or
    a step directory that holds no checkpoint: one line naming the checkpoint and its damage, and the older complete
    checkpoint to resume from."""
    out = tmp_path / "out"
    args = ["--data", tiny / "data.jsonl", "--model", tiny / "model", "--max_len", 4096, "--global_batch", 2,
            "--logp_budget", 64 * 320, "--save_every", 1]
    code, _, err = cli(train_main, [*args, "--out", out, "--max_steps", 2], capsys)
    assert code == 0, err[-2000:]

    def truncate(d):
        shard = next(f for f in os.listdir(d / "train_state") if f.endswith(".distcp"))
        with open(d / "train_state" / shard, "r+b") as f:
            f.truncate(os.path.getsize(d / "train_state" / shard) // 2)
    damages = [(truncate, "is truncated"), (lambda d: os.remove(d / "train_state" / ".metadata"),
                                            "train_state/.metadata is missing"),
               (lambda d: (d / "longpo_config.json").write_text("{oops"), "longpo_config.json is not a JSON object"),
               (lambda d: shutil.rmtree(d) or d.mkdir(), "it has no longpo_config.json")]
    for k, (damage, message) in enumerate(damages):
        damaged = tmp_path / f"copy{k}"
        shutil.copytree(out, damaged)
        damage(damaged / "step-000002")
        code, _, err = cli(train_main, [*args, "--out", damaged, "--max_steps", 3, "--resume"], capsys)
        line = one_line(err)
        assert code == 2 and line.startswith(f"--resume: {damaged / 'step-000002'} is not a complete checkpoint (")
        assert message in line and f"{damaged / 'step-000001'} is: move" in line, line
    p = subprocess.run([sys.executable, *map(str, train_main_args := ["longpo.py", *args, "--out", tmp_path / "copy0",
                                                                      "--max_steps", 3, "--resume"])],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and "is not a complete checkpoint" in one_line(p.stderr), train_main_args


def test_hostile_save_failures_say_what_failed(tiny, tmp_path, monkeypatch, capsys):
    """Class 5: a checkpoint that cannot be written (the folder made read-only: permission denied) ends in one line
    naming the cause, and says so when the partial directory cannot be removed either; a file left where the
    temporary checkpoint goes is removed and the save goes on."""
    args = ["--data", tiny / "data.jsonl", "--model", tiny / "model", "--max_len", 4096, "--global_batch", 2,
            "--logp_budget", 64 * 320, "--max_steps", 1]
    real = os.makedirs

    def denied(path, *a, **k):
        if ".tmp-step-" in str(path):
            real(path, *a, **k)  # made, then refused: a partial directory is left to remove
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "makedirs", denied)
    out = tmp_path / "ro"
    code, _, err = cli(train_main, [*args, "--out", out], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("saving step 1 failed: Permission denied: ") and "intact" in line, line
    assert not [f for f in os.listdir(out) if f.startswith((".tmp", "step"))]
    monkeypatch.setattr(longpo.shutil, "rmtree", lambda *a, **k: None)  # and the leftover cannot be removed
    code, _, err = cli(train_main, [*args, "--out", tmp_path / "ro2"], capsys)
    assert code == 2 and "could not be removed: remove it by hand" in one_line(err)
    monkeypatch.undo()
    out = tmp_path / "file"
    out.mkdir()
    (out / ".tmp-step-000001").write_text("not a directory")
    code, stdout, err = cli(train_main, [*args, "--out", out], capsys)
    assert code == 0 and f"removed {out / '.tmp-step-000001'}" in stdout and longpo.checkpoints(str(out)), err


def test_hostile_flags_are_checked_against_their_use(tiny, tmp_path, capsys):
    """Class 6: numbers the code cannot use are refused in one line at the flag, not deep inside torch: an lr
    Adam's first step overflows (1e38), seeds outside 64 bits, timeouts past a timedelta, a schedule too long to
    hold, lengths and budgets no task or cache can take; a temperature near 0 samples the argmax, not NaN."""
    model, data = tiny / "model", tiny / "data.jsonl"
    train = ["--data", data, "--model", model, "--out", tmp_path / "o", "--max_len", 4096]
    for extra, message in ((["--lr", "1e38"], "--lr 1e+38 is out of range"), (["--seed", "1e30"], "--seed"),
                           (["--seed", "-1"], "--seed -1 is out of range"),
                           (["--timeout_min", "1e30"], "--timeout_min 1e+30 is out of range"),
                           (["--epochs", "1e12", "--global_batch", "2"], "steps, more than 10,000,000")):
        code, _, err = cli(train_main, [*train, *extra], capsys)
        assert code == 2 and message in one_line(err), (extra, err[-800:])
    for extra, message in ((["--seed", "1e30"], "--seed"), (["--timeout_min", "1e12"], "--timeout_min")):
        code, _, err = cli(G.main, ["--model", model, "--out", tmp_path / "g.jsonl", *extra], capsys)
        assert code == 2 and message in one_line(err) and "out of range" in one_line(err)
    for extra, message in ((["--lengths", "infK"], "--lengths takes token counts"),
                           (["--lengths", "1e9"], "over the 4,194,304 (4M) a task is written for"),
                           (["--samples", "1e9"], "--samples"), (["--max_new_tokens", "1e12"], "--max_new_tokens")):
        code, _, err = cli(eval_main, ["--models", f"a={model}", *extra], capsys)
        assert code == 2 and message in one_line(err), (extra, err[-800:])
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30
    for t in (1e-40, 1e-30):
        assert torch.equal(G.sample(logits, t, 0.9, torch.Generator().manual_seed(1)), logits.argmax(-1))
    p = subprocess.run([sys.executable, "longpo.py", *map(str, train), "--lr", "1e38"], capture_output=True, text=True,
                       cwd=HERE, timeout=120)
    assert p.returncode == 2 and one_line(p.stderr) == "--lr 1e+38 is out of range"


def test_hostile_non_finite_models_refused_by_every_script(tiny, tmp_path, capsys):
    """Class 7: a --model with a NaN weight is refused by longpo.py, generate.py and eval.py alike, in one line naming
    the tensor, before any work (nothing written)."""
    from safetensors.torch import load_file, save_file
    model = tmp_path / "nan"
    shutil.copytree(tiny / "model", model)
    weights = load_file(str(model / "model.safetensors"))
    name = sorted(weights)[2]
    weights[name].view(-1)[1] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": words(random.Random(0), 300)}) + "\n")
    for main, argv, label in ((train_main, ["--data", tiny / "data.jsonl", "--model", model, "--out", tmp_path / "o",
                                            "--max_len", 4096], f"--model {model}"),
                              (G.main, ["--model", model, "--corpus", corpus, "--out", tmp_path / "g.jsonl"],
                               f"--model {model}"),
                              (eval_main, ["--models", f"a={model}", "--json", tmp_path / "e.json"],
                               f"--models a={model}")):
        code, _, err = cli(main, argv, capsys)
        assert code == 2 and one_line(err) == f"{label}: tensor {name} holds non-finite values", err[-800:]
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "nan"]  # nothing written by any of them
    p = subprocess.run([sys.executable, "generate.py", "--model", str(model), "--corpus", str(corpus), "--out",
                        str(tmp_path / "g.jsonl")], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert p.returncode == 2 and one_line(p.stderr) == f"--model {model}: tensor {name} holds non-finite values"


def test_hostile_many_turns_are_measured_in_one_pass(tiny, tmp_path, monkeypatch):
    """Class 8: a record of 2,000 turns over --max_len is measured by rendering each branch's chat once (not each of
    its 4,000 prefixes) and skipped; a short record of many turns is still measured exactly, as training renders it."""
    rng = random.Random(0)
    turn = lambda: dict(chunk=[0, 10], instruction=words(rng, 3), chosen=words(rng, 2), rejected=words(rng, 2),
                        ref_chosen_logp=-3.0, ref_rejected_logp=-4.0)
    long_rec = {"id": "many", "document": words(rng, 40), "turns": [turn() for _ in range(2000)]}
    short_rec = {"id": "few", "document": words(rng, 40), "turns": [turn() for _ in range(6)]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(long_rec) + "\n" + json.dumps(short_rec) + "\n")
    tok = longpo.load_tokenizer(str(tiny / "model"))
    calls = []
    real = type(tok).apply_chat_template
    monkeypatch.setattr(type(tok), "apply_chat_template", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    kept = longpo.prepare_data(longpo.Config(data=str(data), max_len=4096), tok)
    assert [e["line"] for e in kept] == [2] and len(calls) < 2 * 2 + 4 * 6 * 2 + 8  # one pass each, then 6 turns
    exact = max(len(ids) for ids, _ in longpo.render_branches(tok, short_rec)[0])
    assert kept[0]["tokens"] == exact


def test_hostile_template_without_end_of_turn_is_refused(tiny, tmp_path, capsys):
    """Class 9: a chat template that ends an assistant turn with no end-of-turn token (its response would be its
    text plus the template's newline) is refused by all three scripts, in one line naming the problem."""
    model = tmp_path / "plain"
    shutil.copytree(tiny / "model", model)
    conf = json.loads((model / "tokenizer_config.json").read_text())
    conf["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant: {% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(conf))
    if (model / "chat_template.jinja").exists():
        (model / "chat_template.jinja").write_text(conf["chat_template"])
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": words(random.Random(0), 300)}) + "\n")
    message = f"--model {model}: its chat template ends an assistant turn without an end-of-turn token"
    for main, argv in ((train_main, ["--data", tiny / "data.jsonl", "--model", model, "--out", tmp_path / "o",
                                     "--max_len", 4096]),
                       (G.main, ["--model", model, "--corpus", corpus, "--out", tmp_path / "g.jsonl"]),
                       (eval_main, ["--models", f"a={model}", "--json", tmp_path / "e.json"])):
        code, _, err = cli(main, argv, capsys)
        assert code == 2 and one_line(err).startswith(message), err[-800:]


# -----------------------------------------------------------------------------
# the porter's lifts: each test imports only its lift's functions and checks them against a plain computation


def test_lift_the_loss():
    """The loss (aggregate_turns, longpo_loss): per-turn log-prob sums in, Eq. 13/14 out, against the formula
    written out in float64."""
    from longpo import aggregate_turns, longpo_loss
    a, b = torch.tensor([[-12.0, -30.5]], dtype=torch.float64), torch.tensor([[-9.0, -41.0]], dtype=torch.float64)
    c, d = torch.tensor([[-14.0, -28.0]], dtype=torch.float64), torch.tensor([[-20.0, -35.5]], dtype=torch.float64)
    turns = torch.tensor([[True, True]])
    nll, beta, lam = torch.tensor([2.5], dtype=torch.float64), 0.1, 0.01
    lse = lambda x: torch.logsumexp(x, -1)  # noqa: E731: log Σ_i π_i, Eq. 13 as printed
    h = beta * ((lse(a) - lse(c)) - (lse(b) - lse(d)))
    loss, l_mt, chosen, rejected = longpo_loss(a, b, c, d, turns, nll, beta, lam)
    torch.testing.assert_close(l_mt, torch.log1p(torch.exp(-h)), rtol=1e-15, atol=0)  # -log σ(h)
    torch.testing.assert_close(loss, lam * torch.log1p(torch.exp(-h)) + nll, rtol=1e-15, atol=0)  # Eq. 14
    torch.testing.assert_close(chosen - rejected, h, rtol=1e-15, atol=0)
    torch.testing.assert_close(aggregate_turns(a, turns, "sum"), a.sum(-1))  # the released code's Σ_i log π_i


ALL_TO_ALL_EXAMPLE = """
import sys, torch, torch.distributed as dist
from longpo import head_shares, seq_to_heads, heads_to_seq
dist.init_process_group("gloo")
P, me = dist.get_world_size(), dist.get_rank()
torch.manual_seed(0)
x = torch.randn(2, 9, 12, 4, dtype=torch.float64)  # (B, H, T, D), the same on every rank: 9 heads over P ranks
q_idx, kv_idx, _ = head_shares(9, 3, P)
mine = x[:, :, me * 12 // P:(me + 1) * 12 // P].clone().requires_grad_()  # this rank's slice of the positions
heads = seq_to_heads(mine, q_idx, None)  # (B, H, T/P, D) -> (B, my heads, T, D)
assert torch.equal(heads, x[:, q_idx[me]])
back = heads_to_seq(heads, q_idx, None, 9)  # and back: (B, H, T/P, D)
assert torch.equal(back, mine)
back.pow(2).sum().backward()  # the backward of each exchange is the other exchange
assert torch.allclose(mine.grad, 2 * mine.detach())
sys.stdout.write(f"ok {me}\\n")  # one write: the ranks' lines do not interleave
sys.stdout.flush()
dist.destroy_process_group()
"""


def test_lift_the_all_to_all(tmp_path):
    """The all-to-all (head_shares, seq_to_heads, heads_to_seq), run as an example under torchrun on 3 ranks with 9
    heads (uneven shares): each rank gets its heads over every position, the way back restores its slice, and the
    gradient goes through both exchanges."""
    example = tmp_path / "all_to_all.py"
    example.write_text(ALL_TO_ALL_EXAMPLE)
    assert sorted(torchrun(3, example).splitlines()) == ["ok 0", "ok 1", "ok 2"]


ULYSSES_EXAMPLE = """
import sys, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from longpo import register_attention
dist.init_process_group("gloo")
P, me = dist.get_world_size(), dist.get_rank()
register_attention(dist.new_group(list(range(P))))  # the attention "longpo", over these ranks
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float64, attn_implementation="longpo")
plain = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float64, attn_implementation="eager")
ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
T = ids.shape[1] // P  # each rank feeds its slice of the positions, with their global position ids
pos = torch.arange(me * T, (me + 1) * T)[None]
mine = model.model(input_ids=ids[:, me * T:(me + 1) * T], position_ids=pos).last_hidden_state
want = plain.model(input_ids=ids).last_hidden_state[:, me * T:(me + 1) * T]
assert torch.allclose(mine, want, rtol=1e-6, atol=1e-6), (mine - want).abs().max()  # (RMSNorm rounds to float32)
sys.stdout.write(f"ok {me}\\n")  # one write: the ranks' lines do not interleave
sys.stdout.flush()
dist.destroy_process_group()
"""


def test_lift_the_ulysses_attention(tiny, tmp_path):
    """The Ulysses attention with its registration (register_attention, ulysses_attention), run as an example under
    torchrun on 2 ranks: a model loaded with attn_implementation="longpo", each rank feeding a slice of the
    sequence, gives the hidden states of transformers' own attention over the whole sequence (float64)."""
    example = tmp_path / "ulysses.py"
    example.write_text(ULYSSES_EXAMPLE)
    assert sorted(torchrun(2, example, tiny / "model").splitlines()) == ["ok 0", "ok 1"]


def test_lift_the_chunked_head():
    """The chunked log-prob head (chunked_logps): log softmax(hidden @ W.T)[targets] in chunks of budget logits,
    and its gradients, against full logits (float64)."""
    from longpo import chunked_logps
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    ours = chunked_logps(hidden, weight, targets, budget=5 * 50)  # 5 rows a chunk: 8 chunks
    full = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(ours, full, rtol=1e-12, atol=1e-12)
    w = torch.randn(37, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((ours * w).sum(), (hidden, weight))
    torch.testing.assert_close(grads, torch.autograd.grad((full * w).sum(), (hidden, weight)), rtol=1e-12, atol=1e-12)


def test_lift_the_sampler():
    """The sampler's choice of a token (sample, nucleus): the exact argmax at temperature 0, and draws that stay in
    the top-p nucleus transformers' warpers keep."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from generate import nucleus, sample
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3)) * 3
    assert torch.equal(sample(logits), logits.argmax(-1))
    probs, idx = nucleus(logits, 0.7, 0.9)
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, probs > 0)
    ref = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())) > -math.inf
    assert torch.equal(kept, ref)
    draws = torch.stack([sample(logits, 0.7, 0.9, torch.Generator().manual_seed(s)) for s in range(50)], 1)
    assert kept.gather(1, draws).all()

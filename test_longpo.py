"""Tests for longpo.py, generate.py and eval.py: each hard part against an independent computation.

    python -m pytest -q test_longpo.py

CPU only; distributed paths run under torchrun with the gloo backend. Tiny randomly initialised Mistral /
Qwen2 / Llama models and a byte-level BPE tokenizer trained here stand in for real checkpoints.
"""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
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


def make_model(path, family="mistral", heads=4, kv_heads=2, layers=2, hidden=32, seed=0, **extra):
    """A tiny random causal LM of a supported family, saved as a HF directory with the test tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tok = make_tokenizer(path)
    config = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  head_dim=hidden // heads, max_position_embeddings=4096, tie_word_embeddings=False,
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
    """Records in the JSONL schema of DESIGN.md, with random text and reference log-probs."""
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
    """A tiny Mistral and six records for it."""
    d = tmp_path_factory.mktemp("tiny")
    make_model(str(d / "model"))
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


def exact_rmsnorm():
    """The models' RMSNorm casts to float32 inside, even for float64 inputs; a float64 comparison between two
    computations would then see float32 rounding, so the float64 tests compute the norm in the input's dtype."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    for cls in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm):
        cls.forward = forward


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


def worker(spec_path):
    """Runs under torchrun: the distributed side of a comparison, described by a JSON spec; rank 0 saves."""
    spec = json.load(open(spec_path))
    exact_rmsnorm()
    torch.use_deterministic_algorithms(True)
    results = []
    for case in spec["cases"]:
        cfg = longpo.Config(**case["cfg"])
        env = longpo.setup_distributed(cfg.sp)
        model, tok = longpo.load_model(case["model"], torch.float64, "longpo", 0, 0)
        data = longpo.prepare_data(cfg, tok, env)
        if case["mode"] == "sp":  # sequence parallel alone: sum the partial gradients by hand
            policy = longpo.TokenLogps(model, cfg.logp_chunk)
            rec, packed = longpo.load_example(cfg, tok, data[case["record"]])
            loss, _ = longpo.record_loss(cfg, policy, packed, rec, env.sp, env.sp_rank, env.device)
            turn_sums, nll_sum = longpo.sequence_sums(policy, packed, env.sp, env.sp_rank, env.device)
            loss.backward()
            grads = {}
            for name, p in policy.model.named_parameters():
                g = p.grad.clone()
                torch.distributed.all_reduce(g)  # partial gradients of the sp ranks add up to the whole
                grads[name] = g
            results.append({"loss": loss.detach(), "turn_sums": turn_sums.detach(), "grads": grads})
        else:  # the trainer's own path: FSDP2 sharding, loss scaling, gradient norm, one Adam step
            policy = longpo.build_policy(cfg, env, model)
            opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
            accum = cfg.global_batch // env.dp
            steps = longpo.schedule(len(data), cfg, env.dp)
            sums, _ = longpo.accumulate(cfg, env, policy, tok, data, steps[0][env.dp_rank::env.dp], accum)
            norm = torch.nn.utils.clip_grad_norm_(list(policy.parameters()), float("inf"))
            grads = {n.removeprefix("model."): p.grad.full_tensor() for n, p in policy.named_parameters()}
            opt.step()
            weights = {n.removeprefix("model."): p.full_tensor().detach() for n, p in policy.named_parameters()}
            results.append({"grads": grads, "weights": weights, "norm": norm.full_tensor(),
                            "order": steps[0]})
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
    for i, t in enumerate(rec["turns"]):  # response i's tokens decode to the response and its end-of-turn marker
        text = tok.decode([x for x, k in zip(ids, turns) if k == i + 1])
        assert text.startswith(t["chosen"]) and "<|im_end|>" in text
    assert tok.decode(ids).startswith("<|im_start|>user\n" + rec["document"] + "\n\n" + rec["turns"][0]["instruction"])


def test_chunked_logps_equal_full_logits():
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    got = longpo.chunked_logps(h, w, y, chunk=8)
    full = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None])[:, 0]
    torch.testing.assert_close(got, full, rtol=1e-13, atol=0)
    g1 = torch.autograd.grad((got * torch.arange(37)).sum(), (h, w))
    g2 = torch.autograd.grad((full * torch.arange(37)).sum(), (h, w))
    for x, z in zip(g1, g2):
        torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-14)


MEMORY_PROBE = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import longpo
T, V, d, mode = int(sys.argv[2]), int(sys.argv[3]), 64, sys.argv[4]
torch.manual_seed(0)
h = torch.randn(T, d, requires_grad=True); w = torch.randn(V, d, requires_grad=True); y = torch.randint(0, V, (T,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "chunked":
    lp = longpo.chunked_logps(h, w, y, 256)
else:
    lp = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None])[:, 0]
lp.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


# glibc keeps freed memory for reuse, so peak RSS would depend on allocation history; with a low mmap
# threshold every large tensor is its own mapping, returned to the system when freed, and peak RSS tracks the
# peak of live tensor memory
LIVE_RSS = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_mb(T, V, mode):
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, HERE, str(T), str(V), mode], capture_output=True,
                         text=True, check=True, env={**os.environ, **LIVE_RSS}).stdout
    return float(out.split()[-1])


def test_chunked_logps_memory_does_not_grow_with_T_times_V():
    """Peak RSS added by forward + backward of the log-probs, measured in fresh processes."""
    V = 16384
    full = peak_mb(4096, V, "full")
    small, large = peak_mb(1024, V, "chunked"), peak_mb(4096, V, "chunked")
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
        open(path, "w").write(json.dumps(rec) + "\n")
    return path


def test_packed_equals_unshared_one_process(tiny, tmp_path):
    """Prefix sharing at P = 1: per-turn log-probs, NLL, loss and every gradient equal the unshared oracle."""
    exact_rmsnorm()
    for n_turns, rej, kind in ((1, None, "longpo"), (4, None, "longpo"), (2, 150, "longpo"), (3, None, "sft")):
        data = one_record_file(str(tmp_path / "r.jsonl"), None, n_turns, rej=rej)
        cfg = longpo.Config(data=data, max_len=4096, logp_chunk=7, loss=kind)
        model, tok = longpo.load_model(str(tiny / "model"), torch.float64, "longpo")
        ref_model = longpo.load_model(str(tiny / "model"), torch.float64, "sdpa")[0]
        (rec, packed), = examples(cfg, tok)
        policy = longpo.TokenLogps(model, cfg.logp_chunk)
        loss, m = longpo.record_loss(cfg, policy, packed, rec, 1, 0, torch.device("cpu"))
        loss.backward()
        want, sums, nlls = oracle(ref_model, tok, [rec], cfg)
        want.backward()
        turn_sums, _ = longpo.sequence_sums(policy, packed, 1, 0, torch.device("cpu"))
        if kind == "sft":  # only the chosen branch was packed
            torch.testing.assert_close(turn_sums[:n_turns], sums[0][0], rtol=1e-10, atol=0)
        else:
            torch.testing.assert_close(turn_sums, torch.cat(sums[0]), rtol=1e-10, atol=0)
            assert m["nll"] == pytest.approx(nlls[0].item(), rel=1e-10)
        assert loss.item() == pytest.approx(want.item(), rel=1e-10)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)



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
              "cfg": {"data": records[r], "max_len": 4096, "logp_chunk": 7, "sp": P, "dtype": "float64"}}
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
        assert got["loss"].item() == pytest.approx(want.item(), rel=1e-10), (m, r)
        for name, p in ref_model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-7, atol=1e-11, msg=f"{m} {r} {name}")
    assert any(t % P for t in lengths)  # a length that P does not divide was among them


@pytest.mark.parametrize("nproc,sp", [(2, 1), (4, 2)])
def test_fsdp_equals_one_process(tiny, tmp_path, nproc, sp):
    """dp = 2, and dp = 2 x sp = 2: FSDP2 gradients (sum over sp, mean over dp), their norm, and the weights
    after one Adam step equal one process's."""
    exact_rmsnorm()
    cfgd = {"data": str(tiny / "data.jsonl"), "max_len": 4096, "logp_chunk": 64, "sp": sp, "dtype": "float64",
            "global_batch": 4, "lr": 1e-3}
    got, = run_worker(tmp_path, nproc, [{"mode": "fsdp", "model": str(tiny / "model"), "cfg": cfgd}])
    cfg = longpo.Config(**cfgd)
    ref_model, tok = longpo.load_model(str(tiny / "model"), torch.float64, "sdpa")
    records = [r for r, _ in examples(cfg, tok)]
    want, _, _ = oracle(ref_model, tok, [records[i] for i in got["order"]], cfg)
    want.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), float("inf"))
    assert got["norm"].item() == pytest.approx(norm.item(), rel=1e-8)
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-7, atol=1e-11, msg=name)
    torch.optim.Adam(ref_model.parameters(), lr=1e-3).step()
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(got["weights"][name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)



# -----------------------------------------------------------------------------
# the trainer end to end: checkpoints, resume


def train_args(tiny, out, *extra):
    return ["longpo.py", "--data", tiny / "data.jsonl", "--model", tiny / "model", "--out", out, "--max_len", 4096,
            "--global_batch", 2, "--epochs", 2, "--lr", 1e-3, "--logp_chunk", 64, *extra]


def load_weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def test_checkpoint_and_resume(tiny, tmp_path):
    """torchrun at sp = 2: an HF directory that transformers loads with no code of ours, and a run interrupted
    after step 2 and resumed ends with the same weights, optimizer state and logged metrics as one that was not."""
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


def test_sft_and_dpo_run(tiny, tmp_path):
    """The baselines through the trainer: SFT in one process; DPO under torchrun at dp = 2 with an odd record
    count (every dp group must make the same number of reference forwards). Losses finite; DPO's reference is
    stored once, and equals the policy at the first step, so the first rewards are zero."""
    out = tmp_path / "sft"
    p = subprocess.run([sys.executable, *map(str, train_args(tiny, out, "--loss", "sft", "--max_steps", 1))],
                       capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0, p.stderr[-3000:]
    assert math.isfinite(json.loads(open(out / "metrics.jsonl").readline())["loss"])
    three = tmp_path / "three.jsonl"
    three.write_text("".join(open(tiny / "data.jsonl").readlines()[:3]))
    out = tmp_path / "dpo"
    args = train_args(tiny, out, "--loss", "dpo", "--max_steps", 1, "--sp", 1)
    args[args.index("--data") + 1] = three
    torchrun(2, *args)
    m = json.loads(open(out / "metrics.jsonl").readline())
    assert math.isfinite(m["loss"]) and len(json.load(open(out / "dpo_reference.json"))) == 3
    assert abs(m["reward_chosen"]) < 1e-5 and abs(m["reward_margin"]) < 1e-5


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


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    worker(sys.argv[2])

"""LongPO in miniature: the paper's loop (arXiv 2502.13922, §3.3, Table 1, Figs. 4, 6) on a tiny short-window model.

A synthetic world written in code (filler sentences and facts "the code of KEY is VALUE ."), a word-level tokenizer
with a ChatML template, and πS: a 0.44M-parameter Llama (2 layers, hidden 128) trained here at no more than W = 512
tokens to read text, answer "what is the code of KEY ?" from it, and write a numbered pool of such questions about a
text. Measured, πS answers every question inside its window and few past it. The experiment then runs the project's
own scripts as a user runs them: generate.py (πS writes short-to-long preference data), longpo.py (LongPO, LongPO
without NLL, and the SFT, SFT-Rejected and DPO baselines on the same records, each also scored at its earlier
checkpoints: Fig. 4's curves), a second round of self-evolution (the round-1 LongPO model as πS on documents twice as
long), and eval.py on every model (a single-needle retrieval of the world at W/2 ... 8W, through eval.py's
--task_file, and short-context NLL / KL on held-out short pairs).

    # the whole experiment on the shipped πS: a Table-1-like table, Fig. 4's curves, three pictures
    python miniature.py
    # build πS from its fixed seed (the shipped weights in miniature/pi_s are exactly this)
    python miniature.py build
    # the longer setting: 4x the documents, 2x the epochs
    python miniature.py --long

Nothing in longpo.py, generate.py or eval.py imports this file.
"""

import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import longpo
from longpo import flag
from eval import format_table, string_match_all
from generate import FALLBACK_INSTRUCTION, POOL_PROMPT, part_files, read_part


# -----------------------------------------------------------------------------
# config


@dataclass
class MiniConfig:
    out: str = flag("out/miniature", "results.json, scores.png, rewards.png, data and checkpoints of every stage")
    pi_s: str = flag("miniature/pi_s", "πS: the HF directory `python miniature.py build` writes (shipped in the repo)")
    window: int = flag(512, "W: πS's max_position_embeddings; every sequence it is trained on fits in W")
    # building πS (python miniature.py build)
    build_steps: int = flag(2000, "optimizer steps")
    build_tokens: int = flag(4096, "tokens a batch (sequences of one length, as many as fit)")
    build_lr: float = flag(1e-3, "AdamW peak lr: linear warm-up, cosine decay to a tenth")
    build_seed: int = flag(0, "world texts and initial weights of πS; the evaluation's seeds are apart (EVAL_SEED)")
    layers: int = flag(2, "decoder layers of πS")
    hidden: int = flag(128, "hidden size (head dim = hidden / heads)")
    heads: int = flag(4, "attention heads (as many kv heads)")
    mlp: int = flag(256, "intermediate size of the MLP")
    tie: bool = flag(False, "tied input and output embeddings (tied, the keys learnt as outputs blur as inputs)")
    rope_theta_s: float = flag(10000.0, "πS's RoPE base")
    # the experiment (python miniature.py): fixed before any evaluation was looked at
    docs: int = flag(96, "round-1 documents (2W-4W tokens each)")
    docs_r2: int = flag(48, "round-2 documents (4W-8W tokens each)")
    turns: int = flag(4, "chunks (turns) per document, n in Eq. 13 (paper: up to 4)")
    lr: float = flag(1e-4, "every objective's Adam lr: the lr πS's build ends at (build_lr / 10)")
    rope_theta: float = flag(1e5, "the policy's RoPE base: 10 x πS's, as §4.1 raises Mistral's 1e6 to 1e7")
    epochs: int = flag(2, "passes over each round's records")
    global_batch: int = flag(8, "records per step (paper: 8)")
    ablation: bool = flag(True, "also LongPO w/o NLL (--nll_weight 0)")
    curve_every: int = flag(8, "round-1 steps between the checkpoints each objective is scored at (Fig. 4's curves)")
    eval_samples: int = flag(100, "evaluation texts per length, from EVAL_SEED (needle depths evenly spread)")
    procs: int = flag(2, "processes for generate.py, longpo.py and eval.py (torchrun, one thread each)")
    seed: int = flag(0, "the experiment's data seeds (corpora, generation); the evaluation's are EVAL_SEED")
    long: bool = flag(False, "the longer setting, LONG below: 4x the documents and 2x the epochs, 8x the steps")
    resume: bool = flag(False, "go on from what a stopped run with the same flags left in --out: each training run "
                        "from its newest checkpoint, generation from its finished documents")


# `python miniature.py --long`: room for the objectives to differ, fixed before any of its results was seen: four
# times the round-1 documents (more to learn from, not the same 96 records more often) and twice the epochs, so
# eight times the steps; checkpoints for the curves as often in epochs as the quick run's. Flags given win.
LONG = dict(docs=384, docs_r2=192, epochs=4, curve_every=24, out="out/miniature_long")


# The world's fixed vocabulary: keys and values are drawn once from this seed; texts from per-use seeds.
WORLD_SEED = 12345
EVAL_SEED = 777_000  # the evaluation's texts: never used by anything that trains or generates


# -----------------------------------------------------------------------------
# the world: filler sentences, facts, questions (every word one token)

NOUNS = ("river", "farmer", "lamp", "wagon", "bridge", "miller", "garden", "tower", "sailor", "market", "horse",
         "window", "baker", "forest", "kettle", "road")
VERBS = ("passes", "watches", "follows", "paints", "carries", "finds", "crosses", "cleans", "mends", "visits",
         "counts", "leaves")
PLACES = ("at dawn", "by the mill", "in the rain", "near the sea", "after noon", "on the hill", "at night",
          "in spring", "by the gate", "under the trees", "before supper", "with care")
ADJECTIVES = ("old", "quiet", "red", "small", "tired", "bright", "young", "slow")
CONS, VOWELS = "bdfgklmnprstvz", "aeiou"
N_KEYS, N_VALUES = 160, 160


def _world_words():
    rng = random.Random(WORLD_SEED)
    syllables = [c + v for c in CONS for v in VOWELS]
    keys = rng.sample([a + b for a in syllables for b in syllables], N_KEYS)
    values = [str(v) for v in rng.sample(range(100, 1000), N_VALUES)]
    return keys, values


KEYS, VALUES = _world_words()


def question(key):
    return f"what is the code of {key} ?"


def fact(key, value):
    return f"the code of {key} is {value} ."


def filler(rng):
    return (f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} "
            f"{rng.choice(PLACES)} .")


def document(rng, n_tokens, n_facts, depth=None, avoid=()):
    """A text of exactly n_tokens words: filler sentences with n_facts facts (distinct keys, none in `avoid`) at
    random sentence boundaries, or for one fact at `depth` (0 = start, 1 = end). Returns (text, {key: value})."""
    keys = rng.sample([k for k in KEYS if k not in avoid], n_facts)
    facts = {k: rng.choice(VALUES) for k in keys}
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_tokens:
        sentences.append(filler(rng))
    slots = sorted(rng.sample(range(len(sentences) + 1), n_facts))
    if depth is not None:
        slots = [round(depth * len(sentences))]  # the cut to length below drops a sentence or two at the end
    for slot, k in sorted(zip(slots, keys), reverse=True):
        sentences.insert(slot, fact(k, facts[k]))
    words = " ".join(sentences).split()
    # cut to n_tokens, never through a fact: drop whole filler sentences from the end first
    while len(words) > n_tokens:
        for i in range(len(sentences) - 1, -1, -1):
            if not sentences[i].startswith("the code of"):
                del sentences[i]
                break
        else:
            break
        words = " ".join(sentences).split()
    if len(words) < n_tokens:  # pad with the start of a filler sentence
        words += filler(rng).split()[:n_tokens - len(words)]
    return " ".join(words), facts


def pool_answer(keys, n):
    """What πS learns to write for generate.py's POOL_PROMPT: n numbered questions about keys of the text."""
    return "\n".join(f"{i + 1}. {question(k)}" for i, k in enumerate(keys[:n]))


def key_of(instruction):
    """The key a world question asks about, or None (a pool line πS wrote that is not such a question)."""
    words = instruction.split()
    if len(words) == 7 and " ".join(words[:5] + words[6:]) == "what is the code of ?":
        return words[5]
    return None


# -----------------------------------------------------------------------------
# tokenizer: one token per word and per newline, ChatML template


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vocabulary():
    words = ["<|pad|>", "<|im_start|>", "<|im_end|>", "[UNK]", "\n", "user", "assistant", "system", "."]
    text = " ".join([*NOUNS, *VERBS, *PLACES, *ADJECTIVES, "the code of is what ?", POOL_PROMPT.format(n=4),
                     FALLBACK_INSTRUCTION, " ".join(f"{i}." for i in range(1, 10))])
    for w in text.split() + KEYS + VALUES:
        if w not in words:
            words.append(w)
    return words


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary())}, unk_token="[UNK]"))
    # words split at spaces; a newline is a token of its own
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "removed"),
                                                 pre_tokenizers.Split("\n", "isolated")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


# -----------------------------------------------------------------------------
# building πS: language-model loss over every token of plain texts and chats, all within W


def training_example(rng, tokenizer, n_tokens, chats_only=False):
    """One sequence of πS's training mixture, a text with one fact: (ids, weights). The plain text with its fact
    restated a few times (each restated value a copy to predict: the dense signal from which copying is learnt),
    a chat asking for its code, or a pool request. Answers and restated values weigh 5, other tokens 1."""
    kind = 0.5 if chats_only else rng.random()
    if kind < 0.25:
        text, facts = document(rng, n_tokens, 1)
        (k, v), = facts.items()
        sentences = text.split(" . ")
        for _ in range(rng.randint(1, 4)):
            at = next(i for i, x in enumerate(sentences) if x.startswith("the code of")) + 1
            sentences.insert(rng.randint(at, len(sentences)), fact(k, v)[:-2])
        words = " . ".join(sentences).split()[:n_tokens]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
        first = words.index(v)
        return ids, [5.0 if j > first and x == v else 1.0 for j, x in enumerate(words)]
    if kind < 0.75 or n_tokens < 128:
        text, facts = document(rng, n_tokens - 22, 1)  # the template, the question and the answer: 22 tokens
        (k, v), = facts.items()
        msgs = [text + "\n\n" + question(k), v]
    else:  # a pool request (the texts are long enough for one from 128 tokens on)
        text, facts = document(rng, n_tokens - 60, 1)  # template, pool prompt and pool: 60 tokens
        msgs = [text + "\n\n" + POOL_PROMPT.format(n=4), pool_answer(list(facts), 4)]
    ids, turns = longpo.render_chat(tokenizer, msgs)
    return ids, [5.0 if t else 1.0 for t in turns]


def curriculum(frac, window):
    """(text lengths, chats only) at a fraction of the build. First, one-sentence texts and their question alone:
    copying from the text is learnt there, in a few hundred steps (mixed with the rest from the start, or with
    longer texts, it was not learnt in 1,000). Then the whole mixture, longer and longer, the window from 60% on."""
    if frac < 0.2:
        return 40, 64, True
    top = int(min(window, 64 * 2 ** ((frac - 0.2) / 0.4 * math.log2(window / 64))))
    return max(40, top // 2), top, False


def build_batch(rng, tokenizer, cfg, frac):
    """(ids, weights) (B, T): sequences of one length, as many as fit in build_tokens, right-padded."""
    lo, hi, chats_only = curriculum(frac, cfg.window)
    n = rng.randint(lo, hi)
    rows = [training_example(rng, tokenizer, n, chats_only) for _ in range(max(1, cfg.build_tokens // n))]
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    weights = torch.zeros(len(rows), T)
    for b, (i, w) in enumerate(rows):
        ids[b, :len(i)] = torch.tensor(i)
        weights[b, :len(w)] = torch.tensor(w)
    return ids, weights


def new_pi_s(cfg, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.mlp,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=cfg.window, rope_theta=cfg.rope_theta_s, tie_word_embeddings=cfg.tie,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta_s}
    torch.manual_seed(cfg.build_seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def probe(model, tokenizer, length, n, seed):
    """Exact match of the first answer token, greedy, on n one-fact chats of `length` tokens (the build's monitor,
    on the build's own seeds)."""
    rng = random.Random(seed)
    hits = 0
    model.eval()
    for _ in range(n):
        text, facts = document(rng, length - 22, 1)
        (k, v), = facts.items()
        ids, _ = longpo.render_chat(tokenizer, [text + "\n\n" + question(k)])
        logits = model(torch.tensor([ids])).logits[0, -1]
        hits += tokenizer.decode([int(logits.argmax())]).strip() == v
    model.train()
    return hits / n


def build(cfg):
    """Train πS from nothing and save it as an HF directory (cfg.pi_s) that longpo.load_model reads."""
    t0 = time.time()
    torch.set_num_threads(1)  # the same floats on any machine (thread counts change reduction order); a 0.5M model
    # gains little from more threads, and on shared cores one thread is the fastest
    tokenizer = make_tokenizer()
    model = new_pi_s(cfg, tokenizer)
    print(f"πS: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}, "
          f"window {cfg.window}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.build_lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(cfg.build_seed)
    warm = max(1, cfg.build_steps // 30)
    losses, hits = [], []
    for step in range(cfg.build_steps):
        frac = step / cfg.build_steps
        lr = cfg.build_lr * (step + 1) / warm if step < warm else \
            cfg.build_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / (cfg.build_steps - warm))))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, weights = build_batch(rng, tokenizer, cfg, frac)
        logits = model(ids).logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        w = weights[:, 1:]
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        hit = logits.argmax(-1) == ids[:, 1:]  # (B, T-1): training accuracy on the answers and restated values
        hits.append(((hit & (w > 1)).sum() / (w > 1).sum().clamp(min=1)).item())
        if step % 100 == 0 or step == cfg.build_steps - 1:
            lo, hi, _ = curriculum(frac, cfg.window)
            probes = " ".join(f"{L}:{probe(model, tokenizer, L, 16, 10_000 + step):.2f}"
                              for L in (128, cfg.window, 2 * cfg.window, 4 * cfg.window))
            print(f"build step {step:5d} | loss {sum(losses[-100:]) / len(losses[-100:]):.3f} | lr {lr:.2e} | "
                  f"lengths {lo}-{hi} | answer acc {sum(hits[-100:]) / len(hits[-100:]):.2f} | probe acc {probes} | "
                  f"{time.time() - t0:.0f}s", flush=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = cfg.pi_s + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(cfg.pi_s):
        shutil.rmtree(cfg.pi_s)
    os.replace(tmp, cfg.pi_s)
    print(f"wrote {cfg.pi_s} in {time.time() - t0:.0f}s", flush=True)
    return losses


# -----------------------------------------------------------------------------
# the experiment: the project's scripts, run as a user runs them


def sweep(W):
    """The evaluation's lengths: W/2 ... 8W."""
    return [W // 2, W, 2 * W, 4 * W, 8 * W]


# the table's rows: πS, πS with the policy's RoPE base and no training (what the base change alone does), the
# baselines and LongPO on round 1's records, and round 2
ROWS = (("pi_s", "πS"), ("pi_s_theta", "πS, θ raised, untrained"), ("sft", "SFT"), ("sft_rejected", "SFT-Rejected"),
        ("dpo", "DPO"), ("longpo", "LongPO"), ("longpo_nonll", "LongPO w/o NLL"), ("longpo_r2", "LongPO round 2"))
CURVES = ("sft", "sft_rejected", "dpo", "longpo", "longpo_nonll")  # Fig. 4's objectives (round 1)


def write_corpus(path, n_docs, lo, hi, block, seed):
    """n_docs world texts of lo < tokens <= hi (generate.py's length range for --max_len hi), each made of blocks
    of `block` tokens with one fact each: generate.py's chunks of --chunk_tokens block are exactly the blocks, so
    each chunk holds one fact, and the document several. The facts are kept beside, to grade the data."""
    rng = random.Random(seed)
    facts, sizes = [], [m for m in range(1, hi // block + 1) if lo < m * block <= hi]
    with open(path, "w") as f:
        for _ in range(n_docs):
            parts, kv = [], {}
            for _ in range(rng.choice(sizes)):
                text, one = document(rng, block, 1, avoid=kv)
                parts.append(text)
                kv.update(one)
            f.write(json.dumps({"text": " ".join(parts)}) + "\n")
            facts.append(kv)
    with open(path + ".facts.json", "w") as f:
        json.dump(facts, f)


def write_eval_tasks(path, lengths, samples, seed, tokenizer):
    """eval.py --task_file: at each length, `samples` texts with one fact each at an even spread of depths (RULER's
    single needle), sized so that the rendered prompt plus the answer has exactly `length` tokens."""
    overhead = len(longpo.render_chat(tokenizer, ["\n\n" + question(KEYS[0])])[0]) + 1  # template, question, answer
    with open(path, "w") as f:
        for L in lengths:
            rng = random.Random(f"{seed}/{L}")
            for i in range(samples):
                text, kv = document(rng, L - overhead, 1, depth=(i + 0.5) / samples)
                (k, v), = kv.items()
                f.write(json.dumps({"task": "world_code", "length": L, "user": text + "\n\n" + question(k),
                                    "answers": [v], "depth": text.index(fact(k, v)) / len(text)}) + "\n")


def write_short_heldout(path, n, window, seed):
    """Held-out short pairs for eval.py --short_data, in generate.py's schema: a one-fact text of at most W/2
    tokens, its question, and the world's answer as y_S (what πS answers inside its window)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for j in range(n):
            text, kv = document(rng, rng.randint(window // 4, window // 2 - 24), 1)
            (k, v), = kv.items()
            wrong = rng.choice([x for x in VALUES if x != v])
            f.write(json.dumps({"id": f"short-{j}", "document": text, "turns": [
                {"chunk": [0, len(text)], "instruction": question(k), "chosen": v, "rejected": wrong}]}) + "\n")


def grade(data_path, corpus_path):
    """How good the generated data is, graded by the world's facts (a figure no real corpus can give). Of the kept
    turns: world questions (the others are generate.py's fallback instruction or a malformed pool line), and of
    those, the ones about a key of their own chunk; of these gradable turns, chosen answers right and rejected ones
    wrong. And what generate.py's filters dropped (from its parts files)."""
    with open(corpus_path) as f:
        texts = [json.loads(line)["text"] for line in f]
    with open(corpus_path + ".facts.json") as f:
        facts = json.load(f)
    by_text = {t: kv for t, kv in zip(texts, facts)}
    g = dict(records=0, turns=0, fallback_instruction=0, malformed_question=0, key_not_in_chunk=0, gradable=0,
             chosen_right=0, rejected_wrong=0)
    with open(data_path) as f:
        for line in f:
            r = json.loads(line)
            kv = by_text[r["document"]]
            g["records"] += 1
            for t in r["turns"]:
                g["turns"] += 1
                k = key_of(t["instruction"])
                if k is None:
                    g["fallback_instruction" if t["instruction"] == FALLBACK_INSTRUCTION else "malformed_question"] += 1
                    continue
                s, e = t["chunk"]
                if k not in kv or fact(k, kv[k]) not in r["document"][s:e]:
                    g["key_not_in_chunk"] += 1
                    continue
                g["gradable"] += 1
                g["chosen_right"] += t["chosen"] == kv[k]
                g["rejected_wrong"] += t["rejected"] != kv[k]
    g["gradable_rate"] = g["gradable"] / max(g["turns"], 1)
    g.update({f"{k}_rate": g[k] / max(g["gradable"], 1) for k in ("chosen_right", "rejected_wrong")})
    dropped = {}  # turns sampled, fallback instructions, each filter's drops: what generate.py's parts recorded
    for part in part_files(data_path + ".parts"):
        for line in read_part(part):
            for k, v in line["counts"].items():
                dropped[k] = dropped.get(k, 0) + v
    g["generate_counts"] = dropped
    return g


def run(cmd, log, procs=1):
    """One stage: a script of the project as a user runs it (torchrun with one thread a process when procs > 1)."""
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1") if procs > 1 else dict(os.environ)
    t0 = time.time()
    print("$ " + " ".join(cmd[1:]), flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"stage failed (exit {rc}); the end of {log}:\n{tail}")
    return time.time() - t0


def with_rope_theta(src, dst, theta):
    """A copy of the model directory src whose RoPE base is theta: πS as the policy starts, before any step."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["rope_parameters"] = {**config.get("rope_parameters", {"rope_type": "default"}), "rope_theta": theta}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dst


def newest(out):
    found = longpo.checkpoints(out)
    if not found:
        raise SystemExit(f"{out}: no checkpoint written")
    return found[-1]


def experiment(cfg):
    t_start = time.time()
    W, out = cfg.window, cfg.out
    if not os.path.exists(os.path.join(cfg.pi_s, "config.json")):
        raise SystemExit(f"--pi_s {cfg.pi_s}: no πS there; build it with `python miniature.py build`")
    os.makedirs(out, exist_ok=True)
    tokenizer = make_tokenizer()
    lengths = sweep(W)
    r1_len, r2_len = 4 * W, 8 * W  # round 1: documents of 2W-4W tokens; round 2: 4W-8W (§3.3 doubles the length)
    p = lambda name: os.path.join(out, name)
    if cfg.resume and os.path.exists(p("results.json")):  # its curves' checkpoints were scored and removed
        raise SystemExit(f"--resume: {p('results.json')} is there: that run finished (remove it to rerun its "
                         "evaluation from the stages' last checkpoints, without the curves)")
    # chunks: πS is never asked past its window; the longest short prompt, [chunk; pool prompt] with the template
    # and a pool of generate.py's token budget, must fit in W
    chunk = W - 96
    longest = len(longpo.render_chat(tokenizer, [" ".join(["the"] * chunk) + "\n\n" + POOL_PROMPT.format(n=4)])[0])
    if longest + 48 > W:
        raise SystemExit(f"--window {W}: a chunk of {chunk} tokens and its pool ({longest} + 48 tokens) exceed it")
    # the world's texts: each use its own seed; the evaluation's apart from everything that trains or generates
    write_corpus(p("corpus_r1.jsonl"), cfg.docs, r1_len // 2, r1_len, chunk, f"corpus r1/{cfg.seed}")
    write_corpus(p("corpus_r2.jsonl"), cfg.docs_r2, r2_len // 2, r2_len, chunk, f"corpus r2/{cfg.seed}")
    write_eval_tasks(p("eval_tasks.jsonl"), lengths, cfg.eval_samples, f"eval/{EVAL_SEED}", tokenizer)
    write_short_heldout(p("short_heldout.jsonl"), cfg.eval_samples, W, f"eval short/{EVAL_SEED}")
    stages, grades = {}, {}
    gen_flags = ["--chunk_tokens", str(chunk), "--min_chunk_tokens", str(chunk // 2), "--chunks_per_doc",
                 str(cfg.turns), "--pool_max_new_tokens", "48", "--max_new_tokens", "8"]
    # a checkpoint every curve_every steps, each kept until it is scored (--keep_last: all of them)
    train_flags = ["--rope_theta", str(cfg.rope_theta), "--lr", str(cfg.lr), "--epochs", str(cfg.epochs),
                   "--global_batch", str(cfg.global_batch), "--save_every", str(cfg.curve_every), "--keep_last",
                   "100000", "--grad_ckpt", "false"]
    if cfg.resume:  # longpo.py and generate.py go on bitwise where they stopped (and skip what is finished)
        train_flags += ["--resume", "true"]
    else:  # each run from nothing
        if os.path.exists(p("results.json")):
            os.remove(p("results.json"))
        for d in ("longpo", "sft", "sft_rejected", "dpo", "longpo_nonll", "longpo_r2"):
            shutil.rmtree(p(d), ignore_errors=True)
        for f in ("r1.jsonl", "r2.jsonl"):
            shutil.rmtree(p(f + ".parts"), ignore_errors=True)

    def generate(model, corpus, data, max_len, tag):
        stages[f"generate {tag}"] = run(["generate.py", "--model", model, "--corpus", corpus, "--out", data,
                                         "--max_len", str(max_len), "--seed", str(cfg.seed), *gen_flags],
                                        p(f"generate_{tag}.log"), cfg.procs)
        grades[tag] = grade(data, corpus)
        g = grades[tag]
        print(f"data {tag}: {g['records']} records, {g['turns']} turns kept, {g['gradable']} of them a question about "
              f"a key of their chunk (others: {g['fallback_instruction']} fallback, {g['malformed_question']} "
              f"malformed, {g['key_not_in_chunk']} about another key); of those, chosen right "
              f"{g['chosen_right_rate']:.2f}, rejected wrong {g['rejected_wrong_rate']:.2f} | generate.py's counts "
              f"{json.dumps(g['generate_counts'], sort_keys=True)} | {stages[f'generate {tag}']:.0f}s", flush=True)

    def train(name, model, data, max_len, *extra):
        stages[f"train {name}"] = run(["longpo.py", "--model", model, "--data", data, "--out", p(name),
                                       "--max_len", str(max_len), *train_flags, *extra], p(f"train_{name}.log"),
                                      cfg.procs)
        print(f"train {name}: {stages[f'train {name}']:.0f}s", flush=True)
        return newest(p(name))

    # round 1: πS writes short-to-long preference data over documents of 2W-4W tokens, then each objective
    generate(cfg.pi_s, p("corpus_r1.jsonl"), p("r1.jsonl"), r1_len, "r1")
    if not grades["r1"]["records"]:
        raise SystemExit(f"round 1: generate.py kept no record (see {p('generate_r1.log')}): nothing to train on")
    models = {"pi_s": cfg.pi_s, "pi_s_theta": with_rope_theta(cfg.pi_s, p("pi_s_theta"), cfg.rope_theta)}
    models["sft"] = train("sft", cfg.pi_s, p("r1.jsonl"), r1_len + 512, "--loss", "sft")
    models["sft_rejected"] = train("sft_rejected", cfg.pi_s, p("r1.jsonl"), r1_len + 512, "--loss", "sft",
                                   "--sft_target", "rejected")
    models["dpo"] = train("dpo", cfg.pi_s, p("r1.jsonl"), r1_len + 512, "--loss", "dpo")
    models["longpo"] = train("longpo", cfg.pi_s, p("r1.jsonl"), r1_len + 512)
    if cfg.ablation:
        models["longpo_nonll"] = train("longpo_nonll", cfg.pi_s, p("r1.jsonl"), r1_len + 512, "--nll_weight", "0")
    # Fig. 4: every round-1 objective's earlier checkpoints join the evaluation (its HF weights are all it reads)
    curve_models = {f"{name}@{int(c[-6:])}": c for name in CURVES if name in models
                    for c in longpo.checkpoints(p(name))[:-1]}
    # round 2 (§3.3): the round-1 LongPO model is πS, over documents of 4W-8W tokens
    generate(models["longpo"], p("corpus_r2.jsonl"), p("r2.jsonl"), r2_len, "r2")
    if grades["r2"]["records"]:
        models["longpo_r2"] = train("longpo_r2", models["longpo"], p("r2.jsonl"), r2_len + 512)
    else:  # every turn filtered out: there is nothing to train round 2 on, and the table says so by its absence
        print("round 2: generate.py kept no record; no round-2 model", flush=True)
    # every model on the same held-out texts, through eval.py's own task loop and scorer; the samples split over
    # the processes (dp), each sample whole on one
    for old in (p("eval.json"), p("eval.json.cells.jsonl")):  # from nothing, as the rest
        if os.path.exists(old):
            os.remove(old)
    stages["eval"] = run(["eval.py", "--models", *[f"{k}={v}" for k, v in {**models, **curve_models}.items()],
                          "--task_file", p("eval_tasks.jsonl"), "--tasks", "world_code", "--lengths",
                          *map(str, lengths), "--samples", str(cfg.eval_samples), "--max_new_tokens", "4", "--batch",
                          "8", "--short_data", p("short_heldout.jsonl"), "--short_n", str(cfg.eval_samples),
                          "--json", p("eval.json"), "--sp", "1"], p("eval.log"), cfg.procs)
    with open(p("eval.json")) as f:
        report = json.load(f)
    for path in curve_models.values():  # scored: the curves' checkpoints are not needed any more
        shutil.rmtree(path)
    doc_lengths = {}
    for tag in ("r1", "r2"):  # the lengths each round really trained at, for the picture
        with open(p(f"corpus_{tag}.jsonl")) as f:
            n = [len(json.loads(line)["text"].split()) for line in f]
        doc_lengths[tag] = [min(n), max(n)]
    results = dict(lengths=lengths, window=W, models={}, exact={}, far={}, short={}, data=grades, stages_s=stages,
                   document_lengths=doc_lengths, settings=dataclasses.asdict(cfg))
    results["curves"] = curves(report, models, curve_models, lengths, W)
    for name, entry in report["models"].items():
        if name in curve_models:
            continue
        per = entry["long"]["world_code"]
        results["models"][name] = {str(L): per[str(L)]["score"] for L in lengths}
        results["exact"][name] = {str(L): per[str(L)]["exact_match"] for L in lengths}
        results["short"][name] = {k: entry["short"][k] for k in ("nll", "kl")}
        # the same scores over the needles more than W tokens before the question only: distances πS never saw
        far = {}
        for L in lengths[2:]:
            xs = [x for x in per[str(L)]["samples"] if (1 - x["depth"]) * L > W]
            far[str(L)] = string_match_all([x["pred"] for x in xs], [x["answers"] for x in xs]) if xs else None
        results["far"][name] = far
    results["wall_s"] = time.time() - t_start
    with open(p("results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n" + table(results), flush=True)
    pictures(results, out)
    print(f"wrote {p('results.json')}, {p('scores.png')}, {p('rewards.png')}, {p('curves.png')} | wall "
          f"{results['wall_s']:.0f}s",
          flush=True)
    return results


def curves(report, models, curve_models, lengths, W):
    """Fig. 4 in miniature: for each round-1 objective, at step 0 (πS with the policy's RoPE base: where every run
    starts), at each curve checkpoint and at its end (the table's model), the retrieval score averaged over the
    lengths past W, and the short-context KL against πS. {name: {"steps", "long", "kl"}}."""
    def point(name):
        entry = report["models"][name]
        far = [entry["long"]["world_code"][str(L)]["score"] for L in lengths if L > W]
        return sum(far) / len(far), entry["short"]["kl"]

    out = {}
    for name in CURVES:
        if name not in models:
            continue
        with open(os.path.join(models[name], "longpo_config.json")) as f:
            last = json.load(f)["step"]
        ckpts = sorted((int(k.split("@")[1]), k) for k in curve_models if k.split("@")[0] == name)
        steps = [0] + [s for s, _ in ckpts] + [last]
        points = [point("pi_s_theta")] + [point(k) for _, k in ckpts] + [point(name)]
        out[name] = {"steps": steps, "long": [x for x, _ in points], "kl": [y for _, y in points]}
    return out


def table(results):
    """Table 1 in miniature: a row per model, a column per length, the average, short-context retention; then the
    same runs scored by exact match, and over the needles farther than W from the question only."""
    lengths, W = results["lengths"], results["window"]
    far = [L for L in lengths if L > W]
    text = []
    for title, key, cols in (
            ("retrieval score (eval.py's string_match_all, RULER's: the answer found in the output), 0-100", "models",
             lengths),
            ("exact match (eval.py's exact_match: the output is the answer and nothing else), 0-100", "exact", lengths),
            ("string_match_all over the needles more than W tokens before the question only (distances πS never "
             "saw in training)", "far", far)):
        head = ["model"] + [f"{L}{'*' if L > W else ''}" for L in cols] + ["avg"]
        head += ["NLL short", "KL vs πS"] if key == "models" else []
        rows = []
        for name, label in ROWS:
            if name in results[key]:
                scores = [results[key][name][str(L)] for L in cols]
                row = [label] + [f"{x:.1f}" for x in scores] + [f"{sum(scores) / len(scores):.1f}"]
                if key == "models":
                    row += [f"{results['short'][name]['nll']:.3f}", f"{results['short'][name]['kl']:.3f}"]
                rows.append(row)
        text += [title, format_table(head, rows), ""]
    labels = dict(ROWS)
    for key, title in (("long", f"Fig. 4: retrieval score over the lengths past W ({far}) at each step"),
                       ("kl", "Fig. 4: short-context KL against πS at each step")):
        rows = [[labels[n], *(f"{s}: {v:.{1 if key == 'long' else 3}f}" for s, v in zip(c["steps"], c[key]))]
                for n, c in results.get("curves", {}).items()]
        if rows:
            text += [title, format_table(["model"] + [""] * (max(map(len, rows)) - 1),
                                         [r + [""] * (max(map(len, rows)) - len(r)) for r in rows]), ""]
    return f"context length in tokens; W = {W} is πS's window, '*' past it\n\n" + "\n".join(text)


def pictures(results, out):
    """scores.png: score against length per model; rewards.png: rewards, margin and preference accuracy over the
    steps of LongPO and DPO; curves.png: each objective's long- and short-context scores over its steps."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = results["lengths"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, label in ROWS:
        if name in results["models"]:
            ax.plot(lengths, [results["models"][name][str(L)] for L in lengths], marker="o", label=label,
                    ls="--" if name == "pi_s_theta" else "-")
    for tag, colour in (("r1", "tab:red"), ("r2", "tab:brown")):  # the document lengths each round trained at
        lo, hi = results["document_lengths"][tag]
        ax.axvspan(lo, hi, color=colour, alpha=0.08, lw=0)
        ax.text(lo * 1.03, 4, f"round-{tag[1]}\ndocuments", fontsize=7, color=colour)
    ax.axvline(results["window"], color="grey", ls=":", lw=1)
    ax.text(results["window"], 102, " W", color="grey", va="bottom")
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="retrieval score (0-100)", ylim=(-3, 108),
           title="LongPO in miniature: score against context length")
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scores.png"), dpi=120)
    plt.close(fig)
    # rewards.png: Fig. 6's quantities over the steps; LongPO's reference is πS on the short input, DPO's the
    # initial policy on the long one
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    logs = {}
    for run_name in ("longpo", "dpo", "longpo_r2"):
        path = os.path.join(out, run_name, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                logs[run_name] = [r for r in map(json.loads, f) if not r.get("skipped")]  # a skipped step: no rewards
    for run_name, label, style in (("longpo", "LongPO", "-"), ("longpo_r2", "LongPO round 2", ":"),
                                   ("dpo", "DPO", "--")):
        m = logs.get(run_name)
        if not m:
            continue
        steps = [r["step"] for r in m]
        axes[0].plot(steps, [r["reward_chosen"] for r in m], style, color="tab:green", label=f"{label}: chosen")
        axes[0].plot(steps, [r["reward_rejected"] for r in m], style, color="tab:red", label=f"{label}: rejected")
        axes[1].plot(steps, [r["reward_margin"] for r in m], style, label=label)
        axes[2].plot(steps, [r["accuracy"] for r in m], style, label=label)
    for ax, title in zip(axes, ("rewards β·(log πθ − log π_ref)", "margin (chosen − rejected)",
                                "preference accuracy (margin > 0)")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rewards.png"), dpi=120)
    plt.close(fig)
    # curves.png: Fig. 4, each round-1 objective over its steps
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = dict(ROWS)
    far = [L for L in lengths if L > results["window"]]
    for name, c in results.get("curves", {}).items():
        axes[0].plot(c["steps"], c["long"], marker="o", label=labels[name])
        axes[1].plot(c["steps"], c["kl"], marker="o", label=labels[name])
    axes[0].set(xlabel="step", ylabel="retrieval score (0-100)", title=f"long context: mean over {far} tokens")
    axes[1].set(xlabel="step", ylabel="KL per answer token", title="short context: KL against πS")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)
    plt.close(fig)


def main(argv):
    verb, flags = (argv[0], argv[1:]) if argv and not argv[0].startswith("--") else ("run", argv)
    cfg = longpo.parse_config(MiniConfig, flags)
    if cfg.long:  # the longer setting under the flags given
        cfg = longpo.parse_config(MiniConfig, flags, base=MiniConfig(**LONG))
    if verb == "build":
        build(cfg)
    elif verb == "run":
        experiment(cfg)
    else:
        raise SystemExit(f"unknown command {verb!r}: python miniature.py [run | build] [--flags]")


if __name__ == "__main__":
    main(sys.argv[1:])

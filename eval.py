"""Offline evaluation of LongPO checkpoints, side by side: what the paper's Tables 1-3 measure, on your own models.

Long context (paper §4.2, Table 2): RULER-style synthetic tasks generated in code from a fixed seed, swept over
context lengths measured with each model's own tokenizer: needle-in-a-haystack (single, multi-key, multi-value,
multi-query), variable tracking, common- and frequent-words extraction, scored by RULER's string_match_all, and a
multiple-choice retrieval over records scored by the log-likelihood of its options (accuracy). Greedy decoding
with the chat template (generate.py's sampler). Short context (Table 3): on held-out (chunk, instruction) pairs
of a generate.py file, the mean token NLL of πS's responses y_S under each model and KL(model || first model)
per response token, both models given the short input (a token-level proxy for the drift the short-to-long
constraint of Eq. 10 bounds, which compares the policy on x_L with πS on x_S), and, with --mc, multiple-choice acc
and acc_norm as lm-evaluation-harness computes them.

    # the embedded SmolLM2-135M-Instruct against the newest checkpoint in out/longpo: one task per RULER category
    # (niah_single, vt, fwe, mc_records) at 1K-8K, 1 sample each
    python eval.py
    # every task
    python eval.py --tasks all
    # several checkpoints, the paper's lengths, short-context retention and a multiple-choice file
    python eval.py --models base=/ckpt/Mistral-7B-Instruct-v0.2 longpo=out/mistral-longpo-128k/step-000500 \
        --lengths 4K 8K 16K 32K 64K 128K 256K --samples 20 --short_data data/heldout.jsonl --mc data/arc.jsonl
    # one override: the niah tasks only, four samples each
    python eval.py --tasks niah_single niah_multikey niah_multivalue niah_multiquery --samples 4
    # your own task beside them: a JSONL of {"task", "length", "user", "answers"} samples (miniature.py writes one)
    python eval.py --task_file my_task.jsonl --tasks niah_single --lengths 4K 8K --samples 20

A --task_file sample is taken as written: its prompt is rendered with each model's chat template, its size
measured (not fitted), and its output scored by string_match_all like the built-in generation tasks.

A length is prompt plus reference-answer tokens, never above the request and within 1% of it from about 1K tokens
up (a haystack word or list entry is a few tokens); the greedy answer may run a few tokens past it. Needle depth is
recorded per sample as the fraction of the context's characters before the needle; the first needle of sample i
is placed at (i + 0.5) / samples (variable tracking: its first assignment at half that).

A length beyond a model's max_position_embeddings is warned about and run anyway: how a model does past its window
is part of what the sweep shows. Such cells carry a '*' in the tables and are listed under "beyond_max_positions"
in the JSON.

Effective length (RULER): the largest swept length at which the task-average score, and the score at every shorter
swept length, exceeds --threshold (default 85.6, RULER's Llama-2-7B score at 4K, an average over RULER's 13 tasks:
over another task set, a guide rather than a comparison); 0 (printed "<shortest") when the shortest length does not.

On a CPU shared with other jobs, OMP_NUM_THREADS=1 can decode ten times faster than two spinning threads.

Symbols: T tokens, V vocabulary, d hidden size, K option tokens, R response tokens.
"""

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist

import longpo
from generate import NonFiniteLogits, eos_token_ids, generate_tokens, prefill_prefixes, tail_logps
from longpo import flag, print0


# -----------------------------------------------------------------------------
# config

# the tasks: TASKS, the names of TASK_BUILDERS below. The default: one task per RULER category (retrieval,
# multi-hop tracing, aggregation, and for question answering a retrieval scored as multiple choice: RULER's QA
# generates answers from real QA data, which is not offline), so that the no-argument run on a 2-core CPU takes
# minutes
DEFAULT_TASKS = ("niah_single", "vt", "fwe", "mc_records")


@dataclass
class EvalConfig:
    models: list = flag([], "name=DIR (or DIR) per model, the first the baseline of every delta and KL; [] = the "
                        "embedded model and the newest checkpoint in --out")
    out: str = flag(longpo.Config().out, "where the no-argument run looks for checkpoints (longpo.py's --out)")
    lengths: list = flag(["1K", "2K", "4K", "8K"], "prompt + answer tokens: 4096 or 4K")
    tasks: list = flag(list(DEFAULT_TASKS), "long-context tasks to run; all = every one")
    task_file: str = flag("", 'JSONL of your own samples {"task", "length", "user", "answers"}: their tasks join '
                          "--tasks")
    samples: int = flag(1, "samples per task and length (RULER uses 500; 1 keeps the CPU run to minutes)",
                        lambda x: 1 <= x <= 10**6)
    batch: int = flag(0, "samples decoded together (each reads its own prompt's cache); 0 = the most the memory plan "
                      "fits on the GPU at the longest length (at most 8), 4 on a CPU", lambda x: 0 <= x <= 4096)
    max_new_tokens: int = flag(0, "cap on generated tokens a sample; 0 = 2 x reference-answer tokens + 16",
                               lambda x: 0 <= x <= 1 << 20)
    seed: int = flag(0, "every haystack, needle and option derives from it")
    threshold: float = flag(85.6, "effective length: task-average score (0-100) a length must reach (RULER's value)",
                            lambda x: 0 <= x <= 100)
    short_data: str = flag("", 'generate.py JSONL of held-out records; "" skips NLL and KL')
    short_n: int = flag(64, "(chunk, instruction) pairs read from --short_data", lambda x: x >= 1)
    mc: str = flag("", 'JSONL of {question, choices, answer (0-based index)}; "" skips acc and acc_norm')
    json: str = flag("out/eval.json", "every number of the tables, and each sample's prompt size, depth and output")
    dtype: str = flag("auto", "auto = bfloat16 on CUDA, float32 on CPU",
                      choices=("auto", "float32", "float64", "bfloat16"))
    sp: int = flag(1, "ranks one sample is spread over (its cache split by heads); dp = world / sp groups split each "
                   "cell's samples; 0 = all ranks", lambda x: x >= 0)
    timeout_min: float = flag(60.0, "how long a collective waits for the slowest rank, minutes", lambda x: 0 < x <= 1e9)
    plan: bool = flag(False, "print the memory plan of each model at the longest length (a GPU's bytes) and exit")
    plan_check: bool = flag(True, "refuse, before a model loads, a sweep whose plan does not fit its GPUs")


# -----------------------------------------------------------------------------
# procedural text: filler sentences, keys, pseudo-words (nothing copied, nothing downloaded)

SUBJECTS = ("the baker", "a farmer", "the old sailor", "my neighbour", "a young clerk", "the teacher", "a tired driver",
            "the gardener", "an artist", "the mayor", "a quiet student", "the blacksmith", "a travelling singer",
            "the night guard", "a curious child", "the ferryman")
VERBS = ("painted", "carried", "repaired", "found", "sold", "watched", "cleaned", "counted", "borrowed", "described",
         "measured", "forgot", "wrapped", "delivered", "noticed", "polished")
OBJECTS = ("a wooden chair", "three baskets", "the red door", "an old map", "the garden fence", "a small boat",
           "two lamps", "the kitchen table", "a bag of flour", "the church bell", "a broken clock", "some letters",
           "the blue kettle", "a pair of boots", "the stone wall", "a box of nails")
TAILS = ("before noon", "near the harbour", "after the rain", "on a quiet morning", "behind the mill",
         "during the fair", "at the edge of town", "without a word", "for the third time", "under a grey sky",
         "while the bread cooled", "late in the evening")
ADJECTIVES = ("amber", "silent", "crimson", "hollow", "frozen", "golden", "rapid", "gentle", "bitter", "distant",
              "velvet", "rusty", "bright", "ancient", "lucky", "narrow")
ANIMALS = ("falcon", "otter", "badger", "heron", "lynx", "beetle", "walrus", "sparrow", "gecko", "bison", "marten",
           "pelican", "viper", "moth", "crane", "ferret")
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
TOWN_ENDS = ("ford", "wick", "dale", "mouth", "by", "stead", "ton", "field")
JOBS = ("baker", "carpenter", "nurse", "miller", "weaver", "fisher", "potter", "tailor", "mason", "brewer")


def filler_words(seed, n):
    """The first n words of a seeded stream of sentences. The stream is the same for every n, so a longer haystack
    extends a shorter one; the last sentence is cut to fit and closed with a full stop. -> list of sentences."""
    rng, out, total = random.Random(seed), [], 0
    while total < n:
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}".split()
        words = words[:n - total]
        total += len(words)
        out.append(" ".join(words).capitalize() + ".")
    return out


def pseudo_word(rng, syllables=(2, 3)):
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(*syllables)))


def distinct(rng, make, n):
    seen, out = set(), []
    while len(out) < n:
        w = make(rng)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def weave(sentences, needles):
    """Insert needle sentences into the haystack, needle j at the sentence boundary nearest its depth (0 = start,
    1 = end). Returns the text and each needle's measured depth: characters before it / characters in the text."""
    slots = sorted(range(len(needles)), key=lambda j: (round(needles[j][0] * len(sentences)), j))
    parts, starts, s = [], {}, 0
    for j in slots:
        stop = round(needles[j][0] * len(sentences))
        parts += sentences[s:stop]
        s = stop
        starts[j] = len(" ".join(parts)) + 1 if parts else 0  # the text so far and the space before the needle
        parts.append(needles[j][1])
    parts += sentences[s:]
    text = " ".join(parts)
    return text, [starts[j] / len(text) for j in range(len(needles))]


# -----------------------------------------------------------------------------
# the tasks: each returns build(k) -> (user message, answers, depths, options, answer index); k sizes the haystack

def task_niah(rng, seed, depth, length, n_keys=1, n_values=1, n_queries=1):
    """n_keys keys, the first n_queries of them asked; the first key holds n_values values, the others one each.
    Needles of the asked keys at `depth` (the first) and seeded random depths; distractor keys elsewhere."""
    keys = distinct(rng, lambda r: f"{r.choice(ADJECTIVES)}-{r.choice(ANIMALS)}", n_keys)
    values = [[str(rng.randint(1_000_000, 9_999_999)) for _ in range(n_values if i == 0 else 1)] for i in range(n_keys)]
    needles = [(depth if (i, j) == (0, 0) else rng.random(), f"The access code for {k} is {v}.")
               for i, (k, vs) in enumerate(zip(keys, values)) for j, v in enumerate(vs)]
    asked = keys[:n_queries]
    answers = [v for vs in values[:n_queries] for v in vs]
    if n_values > 1:
        question = f"List every access code given for {asked[0]} in the text above."
    elif n_queries > 1:
        question = f"What are the access codes for {', '.join(asked[:-1])} and {asked[-1]}?"
    else:
        question = f"What is the access code for {asked[0]}? Reply with the number only."
    n_asked = sum(len(vs) for vs in values[:n_queries])  # the needles of the asked keys come first

    def build(k):
        text, depths = weave(filler_words(seed, k), needles)
        user = ("A long text follows. A few access codes are hidden in it; remember them, you will be asked about "
                f"them at the end.\n\n{text}\n\n{question}")
        return user, answers, depths[:n_asked], None, None
    return build


def task_vt(rng, seed, depth, length, hops=4):
    """Multi-hop tracing: X0 = value, X1 = X0, ..., X_hops = X_{hops-1}, in order, the first at `depth`."""
    names = distinct(rng, lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), hops + 1)
    value = str(rng.randint(10_000, 99_999))
    depths = [depth * 0.5] + sorted(depth * 0.5 + rng.random() * (1 - depth * 0.5) for _ in range(hops))
    lines = [f"{names[0]} = {value}."] + [f"{names[i]} = {names[i - 1]}." for i in range(1, hops + 1)]
    question = (f"Which variables end up holding the value {value}, directly or through other variables? "
                "Name all of them.")

    def build(k):
        text, got = weave(filler_words(seed, k), list(zip(depths, lines)))
        user = f"Variable assignments are hidden in the text below; keep track of them.\n\n{text}\n\n{question}"
        return user, names, got, None, None
    return build


def task_cwe(rng, seed, depth, length, n_common=10):
    """Common-words extraction: a numbered list of k words where n_common words occur c times each and every other
    word fewer than c/4 times (c grows with k, as RULER's frequencies do with length); name the n_common."""
    pool = distinct(rng, pseudo_word, n_common + 250)  # build(k) reads at most rare[248], whatever k
    common, rare = pool[:n_common], pool[n_common:]

    def build(k):
        c = max(3, k // 40)
        u = max(1, c // 4)
        entries = common * c
        entries += [rare[i // u] for i in range(max(0, k - len(entries)))]
        random.Random(seed).shuffle(entries)
        user = ("Here is a numbered list of words.\n\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
                + f"\n\nWhich {n_common} words appear most often in the list above? Give the {n_common} words.")
        return user, common, [], None, None
    return build


def task_fwe(rng, seed, depth, length, vocab=200, alpha=2.0, top=3):
    """Frequent-words extraction: words drawn from a Zipf(alpha) law over pseudo-words; name the `top` most frequent
    (ties at the last place go to the word of lower Zipf rank)."""
    words = distinct(rng, pseudo_word, vocab)
    cum = list(itertools.accumulate(1 / (r + 1) ** alpha for r in range(vocab)))

    def build(k):
        drawn = random.Random(seed).choices(words, cum_weights=cum, k=k)  # one draw a word: a prefix of a longer run
        counts = {w: 0 for w in words}
        for w in drawn:
            counts[w] += 1
        answers = sorted(words, key=lambda w: -counts[w])[:top]  # sorted() is stable: ties keep Zipf rank order
        lines = "\n".join(" ".join(drawn[i:i + 12]) for i in range(0, k, 12))
        user = (f"Read the following coded text.\n\n{lines}\n\nWhich {top} words occur most often in the coded text? "
                f"Give the {top} words.")
        return user, answers, [], None, None
    return build


def task_mc_records(rng, seed, depth, length, n_options=4):
    """Retrieval over records, multiple choice: one record a ~400 tokens among filler, the asked one at `depth`;
    the options are its town and the towns of other records, scored by log-likelihood."""
    n = max(n_options, length // 400)
    ids = distinct(rng, lambda r: str(r.randint(1000, 9999)), n)
    towns = distinct(rng, lambda r: pseudo_word(r).capitalize() + r.choice(TOWN_ENDS), n)
    people = [f"{pseudo_word(rng).capitalize()} {pseudo_word(rng).capitalize()}" for _ in range(n)]
    records = [(depth if i == 0 else rng.random(),
                f"Record {ids[i]}: {people[i]}, a {rng.choice(JOBS)}, lives in {towns[i]}.") for i in range(n)]
    options = [towns[0]] + rng.sample(towns[1:], n_options - 1)
    rng.shuffle(options)
    question = f"In which town does the person of record {ids[0]} live? Answer with the town name only."

    def build(k):
        text, depths = weave(filler_words(seed, k), records)
        user = f"A register of people is scattered through the text below.\n\n{text}\n\n{question}"
        return user, [towns[0]], depths[:1], options, options.index(towns[0])
    return build


TASK_BUILDERS = {  # name -> builder(rng, seed, depth, length); RULER's four needle variants are one task with arguments
    "niah_single": task_niah,
    "niah_multikey": functools.partial(task_niah, n_keys=4),
    "niah_multivalue": functools.partial(task_niah, n_values=4),
    "niah_multiquery": functools.partial(task_niah, n_keys=4, n_queries=4),
    "vt": task_vt, "cwe": task_cwe, "fwe": task_fwe, "mc_records": task_mc_records}
TASKS = tuple(TASK_BUILDERS)


# -----------------------------------------------------------------------------
# sizing a sample to a token length with the model's own tokenizer

def reference(answers, options):
    """The answer text whose tokens count toward a length: the right option, or the references joined."""
    return answers[0] if options else ", ".join(answers)


def fit_length(tokenizer, build, length):
    """The largest haystack size k whose rendered prompt plus reference answer has at most `length` tokens, by
    doubling then bisection. One more unit of haystack adds a few tokens, so the result lands within 1%."""
    def size(k):
        user, answers, depths, options, answer_index = build(k)
        prompt = longpo.render_chat(tokenizer, [user])[0]  # one user message: ends with the generation prompt
        return len(prompt) + len(tokenizer(reference(answers, options), add_special_tokens=False)["input_ids"]), prompt

    lo, hi = 0, 64
    while size(hi)[0] <= length:
        lo, hi = hi, hi * 2
    hi -= 1  # size(hi + 1) > length
    while lo < hi:  # invariant: size(lo) <= length < size(hi + 1)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid)[0] <= length else (lo, mid - 1)
    return lo, *size(lo)


def file_sample(own, tokenizer, length, index, cfg):
    """A sample of --task_file, rendered with this model's chat template; its size is measured, not fitted (and
    warned about when it is more than 1% off the length it is filed under)."""
    prompt = longpo.render_chat(tokenizer, [own["user"]])[0]
    n_answer = len(tokenizer(reference(own["answers"], None), add_special_tokens=False)["input_ids"])
    tokens = len(prompt) + n_answer
    if abs(tokens - length) > 0.01 * length:
        print0(f"warning: --task_file sample {own['task']} {index} at length {length} has {tokens} tokens with "
               "this model's tokenizer")
    return dict(own, length=length, index=index, prompt_ids=prompt, tokens=tokens, depth=own.get("depth"),
                depths=[own["depth"]] if own.get("depth") is not None else [], options=None, answer_index=None,
                max_new_tokens=cfg.max_new_tokens or 2 * n_answer + 16)


def spread(items, n):
    """n of the items at an even stride: a file's samples are often ordered by depth, so the first n would test the
    shallowest needles only."""
    return [items[i * len(items) // n] for i in range(n)]


def make_sample(task, tokenizer, length, index, cfg):
    """Sample `index` of a task at a length: the same text for every model (seeded by task, length and index), sized
    with this model's tokenizer. Needle depths are spread evenly over the samples: (index + 0.5) / samples."""
    tag = f"{cfg.seed}/{task}/{length}/{index}"
    build = TASK_BUILDERS[task](random.Random(tag), tag, (index + 0.5) / cfg.samples, length)
    k, tokens, prompt = fit_length(tokenizer, build, length)
    if tokens > length:
        raise SystemExit(f"--lengths {length}: the {task} prompt has {tokens} tokens without any haystack")
    user, answers, depths, options, answer_index = build(k)
    n_answer = len(tokenizer(reference(answers, options), add_special_tokens=False)["input_ids"])
    return dict(task=task, length=length, index=index, user=user, prompt_ids=prompt, tokens=tokens, answers=answers,
                depth=depths[0] if depths else None, depths=depths, options=options, answer_index=answer_index,
                max_new_tokens=cfg.max_new_tokens or 2 * n_answer + 16)  # room for a sentence around the answer


# -----------------------------------------------------------------------------
# metrics: RULER's string matches, lm-evaluation-harness's acc and acc_norm

def string_match_all(preds, refs):
    """RULER: per sample, the fraction of its references found (case-insensitively) in the output; mean, x100."""
    return 100 * sum(sum(r.lower() in p.lower() for r in rs) / len(rs) for p, rs in zip(preds, refs)) / len(preds)


def string_match_part(preds, refs):
    """RULER: per sample, 1 if any of its references is found (case-insensitively) in the output; mean, x100."""
    return 100 * sum(max(r.lower() in p.lower() for r in rs) for p, rs in zip(preds, refs)) / len(preds)


def exact_match(preds, refs):
    """Per sample, 1 if the output is its reference answers joined (", ") and nothing else (case-insensitive,
    surrounding spaces ignored); mean, x100. Stricter than RULER's string match: an answer that runs on counts 0."""
    return 100 * sum(p.strip().lower() == ", ".join(rs).lower() for p, rs in zip(preds, refs)) / len(preds)


def mc_scores(logliks, choices, answer):
    """lm-evaluation-harness: acc = argmax of the options' log-likelihoods is the answer; acc_norm the same with each
    log-likelihood divided by the option's length, len(choice) in characters as the harness's code divides (its
    docs say bytes; the two differ only for non-ASCII text). Returns (acc, acc_norm) as 0/1."""
    argmax = lambda xs: max(range(len(xs)), key=xs.__getitem__)  # the first of equal maxima, like numpy's
    norm = [ll / len(c) for ll, c in zip(logliks, choices)]
    return float(argmax(logliks) == answer), float(argmax(norm) == answer)


def effective_length(scores, threshold):
    """RULER's effective length: the largest L with scores[L'] > threshold (RULER: "exceeds") for every swept
    L' <= L; 0 if none."""
    eff = 0
    for length in sorted(scores):
        if scores[length] is None or scores[length] <= threshold:  # None: not finite, so not exceeding it
            break
        eff = length
    return eff


# -----------------------------------------------------------------------------
# log-likelihoods: options over a shared prompt, response tokens under two models

def option_logliks(model, prompt_ids, options_ids, group=None):
    """Σ_k log π(option_k | prompt, option_<k) for each option. The prompt (but its last token) is filled into one
    cache row (generate.py's prefill_prefixes) that every option's row reads; each row feeds [the prompt's last
    token; its option], so a long prompt costs one forward whatever the number of options."""
    cache, _ = prefill_prefixes(model, [prompt_ids[:-1]], group)
    tails = [prompt_ids[-1:] + list(o) for o in options_ids]
    logps = tail_logps(model, cache, torch.ones(1, len(prompt_ids) - 1, dtype=torch.bool), None, tails,
                       [[False] + [True] * len(o) for o in options_ids], group)
    return logps.tolist()


@torch.no_grad()
def response_logprobs(model, ids, turns):
    """Full log-softmax rows at the positions that predict response tokens: (R, V) float32, and the targets (R,).
    Short contexts only: the rows are materialised so that a KL over the whole vocabulary can be taken."""
    device = next(model.parameters()).device
    x = torch.tensor(ids, device=device)[None]  # (1, T)
    keep = torch.tensor(turns[1:], device=device) > 0  # (T-1,): position j predicts token j+1, a response token
    hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[0, :-1][keep]  # (R, d)
    return longpo.head_logits(hidden, model.lm_head.weight).log_softmax(-1), x[0, 1:][keep]  # (R, V) fp32, (R,)


def short_context(model, tokenizer, pairs, base=None):
    """Mean token NLL of πS's responses y_S given (C_S, I), and KL(model || base) per response token, averaged over
    all response tokens of all pairs (token-weighted, end-of-turn marker included as in training). base: the first
    model, or None for the first model itself (its KL is 0 by definition)."""
    nll, kl, tokens = 0.0, 0.0, 0
    for messages in pairs:
        ids, turns = longpo.render_chat(tokenizer, messages)
        lp, tgt = response_logprobs(model, ids, turns)  # (R, V), (R,)
        nll -= lp.gather(-1, tgt[:, None]).sum().item()
        if base is not None:
            lb, _ = response_logprobs(base, ids, turns)
            kl += (lp.exp() * (lp - lb)).sum().item()  # Σ_r Σ_v p(v) (log p(v) - log p_base(v))
        tokens += len(tgt)
    kl = kl / tokens if base is not None else 0.0
    return dict(pairs=len(pairs), tokens=tokens, nll=finite(nll / tokens), kl=finite(kl))  # None: not finite


def finite(x):
    """x, or None when it is not a finite number (a model's overflow: reported as such, never as a score)."""
    return x if math.isfinite(x) else None


def multiple_choice(model, tokenizer, items, group=None):
    """acc and acc_norm (x100) over {question, choices, answer} items; the question is one chat turn, each choice
    is scored as the start of the assistant's reply."""
    acc = acc_norm = 0.0
    for it in items:
        prompt = longpo.render_chat(tokenizer, [it["question"]])[0]
        options = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in it["choices"]]
        logliks = option_logliks(model, prompt, options, group)
        if not all(math.isfinite(x) for x in logliks):  # an argmax over NaN would pick a choice all the same
            return dict(items=len(items), acc=None, acc_norm=None)
        a, an = mc_scores(logliks, it["choices"], it["answer"])
        acc, acc_norm = acc + a, acc_norm + an
    return dict(items=len(items), acc=100 * acc / len(items), acc_norm=100 * acc_norm / len(items))


# -----------------------------------------------------------------------------
# inputs: lengths, models, the multiple-choice file, the held-out pairs

MAX_LENGTH = 1 << 22  # the longest prompt a task writes: 4M tokens (the paper sweeps to 512K)


def parse_lengths(values):
    out = []
    for v in values:
        try:
            n = float(v[:-1]) * 1024 if v[-1:] in "kK" and v[:-1] else float(v)  # 4096, 4K, 1.5K, 4e3
            if not n.is_integer():  # "four", "nanK", "infK", 1.5 tokens
                raise ValueError
            n = int(n)
        except ValueError:
            raise SystemExit(f"--lengths takes token counts such as 4096 or 4K, got {v!r}") from None
        if n < 256:
            raise SystemExit(f"--lengths {v}: too short for a task prompt (256 tokens at least)")
        if n > MAX_LENGTH:
            raise SystemExit(f"--lengths {v}: {n} tokens, over the {MAX_LENGTH:,} (4M) a task is written for")
        out.append(n)
    return sorted(set(out))


def resolve_tasks(tasks, own=()):
    """--tasks: names from TASKS or from the --task_file (own), or all of them for "all"; the file's tasks are
    always run."""
    valid = list(TASKS) + [t for t in own if t not in TASKS]
    if list(tasks) == ["all"]:
        return valid
    for task in tasks:
        if task not in valid:
            raise SystemExit(f"--tasks: unknown task {task!r}; valid: all, or some of {' '.join(valid)}")
    return list(tasks) + [t for t in own if t not in tasks]


def jsonl_objects(path):
    """(where, object) for each non-blank line of a JSONL file, where = "path:line"; malformed JSON or text that
    is not UTF-8 raises InputError naming path:line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise longpo.InputError(f"{where}: not UTF-8 text: byte 0x{raw[e.start]:02x} at column "
                                        f"{e.start + 1}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:  # JSONDecodeError, and integers past Python's digit limit
                raise longpo.InputError(f"{where}: malformed JSON: {e}") from None
            yield where, obj


RENDERED = {"--task_file": ("user",), "--mc": ("question", "choices"),
            "--short_data": ("document", "turns")}  # the fields of each input file that reach a prompt


def check_rendered_text(inputs, tokenizers):
    """Every string of an input file that reaches a prompt is valid Unicode and holds no special-token string of
    any model's tokenizer (it would be read as the control token): else InputError naming file:line:field.
    inputs: (flag, path) pairs; tokenizers: (model name, tokenizer) pairs."""
    specials = [(name, longpo.special_token_strings(tok)) for name, tok in tokenizers]

    def strings(x, where):  # (field name, string) of every string inside x
        if isinstance(x, str):
            yield where, x
        elif isinstance(x, list):
            for i, v in enumerate(x):
                yield from strings(v, f"{where}[{i}]")
        elif isinstance(x, dict):
            for k, v in x.items():
                yield from strings(v, f"{where}.{k}")

    for option, path in inputs:
        for where, obj in jsonl_objects(path):
            for key in RENDERED[option]:
                for field_name, text in strings(obj.get(key) if isinstance(obj, dict) else None, key):
                    longpo.check_field(longpo.valid_text(text), where, field_name,
                                       "holds a lone surrogate (e.g. \\ud800): not valid Unicode text")
                    for name, sp in specials:
                        hit = longpo.special_in(text, sp)
                        longpo.check_field(not hit, where, field_name, f"holds the special token {hit!r} of model "
                                           f"{name!r} as text")


def read_task_file(path):
    """--task_file: {task: {length: [sample, ...]}} from lines {"task", "length", "user", "answers", "depth"?};
    a malformed line stops with file:line and the field."""
    if not os.path.isfile(path):
        raise SystemExit(f"--task_file {path}: no such file" + (" (a directory)" if os.path.isdir(path) else ""))
    own = {}
    try:
        for where, s in jsonl_objects(path):
            longpo.check_field(isinstance(s, dict), where, "<sample>", "expected a JSON object")
            longpo.check_field(isinstance(s.get("task"), str) and s["task"] not in TASKS and s["task"] != "all",
                               where, "task", f"expected a new task name (not a built-in), got {s.get('task')!r}")
            longpo.check_field(isinstance(s.get("length"), int) and not isinstance(s["length"], bool)
                               and s["length"] > 0, where, "length",
                               f"expected a positive int, got {s.get('length')!r}")
            longpo.check_field(isinstance(s.get("user"), str) and s["user"].strip(), where, "user",
                               "missing, empty or not a string")
            a = s.get("answers")
            longpo.check_field(isinstance(a, list) and a and all(isinstance(x, str) and x for x in a), where,
                               "answers", f"expected a list of non-empty strings, got {a!r}")
            d = s.get("depth")
            longpo.check_field(d is None or (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1),
                               where, "depth",
                               f"expected a number in [0, 1] (needle position / text length), got {d!r}")
            own.setdefault(s["task"], {}).setdefault(s["length"], []).append(s)
    except ValueError as e:  # one line naming file:line:field, not a traceback
        raise SystemExit(str(e)) from None
    if not own:
        raise SystemExit(f"--task_file {path}: no samples")
    return own


def resolve_models(cfg):
    """[(name, dir)]; "" is the embedded default model. No --models: the default model and the newest checkpoint."""
    if not cfg.models:
        models = [("base", "")]
        found = longpo.checkpoints(cfg.out)
        if found:
            models.append(("longpo", found[-1]))
        else:
            print0(f"no checkpoint in {cfg.out}: evaluating the base model alone")
        return models
    models = []
    for spec in cfg.models:
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(os.path.normpath(path))
        if not os.path.isdir(path):
            raise SystemExit(f"--models {spec}: {path} is not a directory")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"--models {spec}: {path} has no config.json (expected a HF model directory)")
        models.append((name, path))
    if len({n for n, _ in models}) < len(models):
        raise SystemExit(f"--models: names must differ, got {[n for n, _ in models]}")
    return models


def read_mc(path):
    """{question, choices, answer} per line; a malformed line raises ValueError naming file:line and the field."""
    if not os.path.isfile(path):
        raise SystemExit(f"--mc {path}: no such file" + (" (a directory)" if os.path.isdir(path) else ""))
    items = []
    for where, it in jsonl_objects(path):
        longpo.check_field(isinstance(it, dict), where, "<item>", f"expected a JSON object, got {type(it).__name__}")
        longpo.check_field(isinstance(it.get("question"), str) and it["question"].strip(), where, "question",
                           "missing, empty or not a string")
        ch = it.get("choices")
        longpo.check_field(isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c for c in ch),
                           where, "choices", f"expected a list of at least 2 non-empty strings, got {ch!r}")
        a = it.get("answer")
        longpo.check_field(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(ch), where, "answer",
                           f"expected a 0-based index into the {len(ch)} choices, got {a!r}")
        items.append(it)
    if not items:
        raise longpo.InputError(f"{path}: no items")
    return items


def read_pairs(path, n):
    """The first n (chunk, instruction, chosen) turns of a generate.py file as short chats [C_S; I, y_S]."""
    records = longpo.read_records(path, need_ref=False)
    pairs = [longpo.short_messages(r, i, t["chosen"]) for r in records for i, t in enumerate(r["turns"])]
    return pairs[:n]


# -----------------------------------------------------------------------------
# one model over the sweep: each cell's samples spread over the dp groups, each finished cell saved at once

SAMPLE_KEYS = ("index", "tokens", "depth", "depths", "answers", "pred", "options", "answer_index", "logliks",
               "non_finite")


def cell_samples(cfg, task, tokenizer, length, own, indices):
    """Samples `indices` of a (task, length) cell, sized with this model's tokenizer."""
    if own and task in own:
        chosen = spread(own[task][length], cfg.samples)
        return [file_sample(chosen[i], tokenizer, length, i, cfg) for i in indices]
    return [make_sample(task, tokenizer, length, i, cfg) for i in indices]


def run_samples(cfg, model, tokenizer, task, samples, group=None):
    """Each sample's prediction (and, for multiple choice, its options' log-likelihoods), `--batch` prompts decoded
    together, greedy; a sample's cache spread over group. A sample whose logits or log-likelihoods are not finite
    (an overflow in the model) is marked non_finite and gets no prediction."""
    if task == "mc_records":
        for s in samples:
            opts = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in s["options"]]
            s["logliks"] = option_logliks(model, s["prompt_ids"], opts, group)
            if all(math.isfinite(x) for x in s["logliks"]):
                s["pred"] = s["options"][max(range(len(opts)), key=s["logliks"].__getitem__)]
            else:
                s["non_finite"], s["logliks"] = True, None  # strict JSON: no NaN, no Infinity
        return samples
    eos = eos_token_ids(model, tokenizer)
    for b in range(0, len(samples), cfg.batch):
        batch = samples[b:b + cfg.batch]
        try:
            outs = generate_tokens(model, [s["prompt_ids"] for s in batch], eos,
                                   max(s["max_new_tokens"] for s in batch), temperature=0.0, group=group)
        except NonFiniteLogits as e:
            for j in e.rows:
                batch[j]["non_finite"] = True
            if len(batch) > 1:  # the others again, without the rows that overflowed
                run_samples(dataclasses.replace(cfg, batch=1), model, tokenizer, task,
                            [x for x in batch if not x.get("non_finite")], group)
            continue
        for s, (tokens, _) in zip(batch, outs):  # each sample held to its own budget, whatever the batch's largest
            s["pred"] = tokenizer.decode(tokens[:s["max_new_tokens"]], skip_special_tokens=True).strip()
    return samples


def score_cell(task, samples):
    """A cell's scores from its samples' predictions (all of them, in index order); a cell with a sample whose
    numbers were not finite has no score (None, printed "non-finite"): a wrong number is never reported."""
    res = {}
    if any(s.get("non_finite") for s in samples):
        res = dict(score=None, non_finite=sum(bool(s.get("non_finite")) for s in samples))
    elif task == "mc_records":
        correct = [mc_scores(s["logliks"], s["options"], s["answer_index"])[0] for s in samples]
        score = 100 * sum(correct) / len(samples)
        res = dict(score=score, accuracy=score)
    else:
        preds, refs = [s["pred"] for s in samples], [s["answers"] for s in samples]
        res = dict(score=string_match_all(preds, refs), string_match_all=string_match_all(preds, refs),
                   string_match_part=string_match_part(preds, refs), exact_match=exact_match(preds, refs))
    res["samples"] = [{k: s[k] for k in SAMPLE_KEYS if s.get(k) is not None} for s in samples]
    return res


def gather(env, mine):
    """Every dp group's list (one rank of each group speaks for it), concatenated in group order, on every rank."""
    if not dist.is_initialized():
        return mine
    parts = [None] * env.world
    dist.all_gather_object(parts, mine)  # world x this rank's list
    return [x for part in parts[::env.sp] for x in part]


def long_context(cfg, model, tokenizer, name, lengths, own=None, env=None, cells=None):
    """Every task at every length: {task: {length: {score, string_match_all, string_match_part, samples}}}. own: the
    --task_file samples, read_task_file's dict. env: the dp groups split each cell's samples (None: one process);
    cells: the Cells already finished (skipped) and where each new one is saved."""
    env = env or SimpleNamespace(dp=1, dp_rank=0, sp=1, sp_group=None, world=1, master=True)
    out = {task: {} for task in cfg.tasks}
    for length in lengths:
        for task in cfg.tasks:
            key = cell_key(cells, name, task, length) if cells else None
            if cells and key in cells.done:
                out[task][length] = cells.done[key]
                continue
            t0 = time.time()
            mine = cell_samples(cfg, task, tokenizer, length, own, range(env.dp_rank, cfg.samples, env.dp))
            done = run_samples(cfg, model, tokenizer, task, mine, env.sp_group)
            samples = sorted(gather(env, [{k: s[k] for k in SAMPLE_KEYS if k in s} for s in done]),
                             key=lambda s: s["index"])
            res = out[task][length] = score_cell(task, samples)
            if cells:
                save_cell(cells, key, res)
            print0(f"[{name}] {task:<16} {length:>7} tokens: score {shown(res['score'], '5.1f')} | prompt+answer "
                   f"{min(s['tokens'] for s in samples)}-{max(s['tokens'] for s in samples)} tokens | "
                   f"{time.time() - t0:.1f} s")
    return out


def read_cells(cfg, models, env, dtype):
    """The finished cells of a sweep: one JSON line each in --json's .cells.jsonl file, appended and flushed as each
    finishes, so that a rerun with the same flags reads them back and computes only the rest. A cell's key holds
    what its numbers depend on: the model's directory (weights, config, tokenizer, template), the task and length,
    the flags that shape the samples, the resolved dtype, the input files' contents. Rank 0 reads the file (cutting
    a torn last line off, so that appending goes on at a line's end) and every rank gets what it read. Returns the
    namespace cell_key and save_cell take."""
    settings = {k: getattr(cfg, k) for k in ("samples", "seed", "max_new_tokens", "batch", "short_n")}
    files = {f: longpo.file_fingerprint(f) for f in (cfg.task_file, cfg.mc, cfg.short_data) if f}
    cells = SimpleNamespace(path=cfg.json + ".cells.jsonl", master=env.master, done={},
                            base=json.dumps({"settings": settings, "dtype": str(dtype), "files": files},
                                            sort_keys=True),
                            models={name: model_identity(path) for name, path in models})
    done = [{}]
    if env.master and os.path.exists(cells.path):
        with open(cells.path, "rb") as f:
            data = f.read()
        if not data.endswith(b"\n") and data:  # a crash mid-write
            with open(cells.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
        for line in data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines():
            entry = json.loads(line)
            done[0][entry["key"]] = entry["result"]
    if dist.is_initialized():
        dist.broadcast_object_list(done, 0)  # one decision for every rank: which cells are left to compute
    cells.done = done[0]
    return cells


def cell_key(cells, name, *what):
    return hashlib.sha256(json.dumps([cells.base, cells.models[name], *what]).encode()).hexdigest()


def save_cell(cells, key, result):
    cells.done[key] = result
    if cells.master:
        with open(cells.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "result": result}, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def model_identity(path):
    """A model directory's resolved path and its files' sizes and modification times: another checkpoint written
    to the same path is another model."""
    path = os.path.realpath(path or longpo.default_model_dir())
    return [path] + [(f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns)
                     for f in sorted(os.listdir(path))
                     if f.endswith((".safetensors", ".bin", ".json", ".jinja", ".model", ".txt"))]


def weighted(parts, key, weight):
    """The mean of the parts' key weighted by their weight (tokens, items); None when any part's is None."""
    if any(p[key] is None for p in parts):
        return None
    return sum(p[key] * p[weight] for p in parts) / sum(p[weight] for p in parts)


def short_scores(cfg, env, model, tokenizer, pairs, mc_items, base):
    """Short-context NLL and KL (against base) and multiple-choice acc, each item list split over the dp groups and
    the sums combined."""
    short = {}
    if pairs:
        part = short_context(model, tokenizer, pairs[env.dp_rank::env.dp], base) if pairs[env.dp_rank::env.dp] \
            else dict(pairs=0, tokens=0, nll=0.0, kl=0.0)
        parts = gather(env, [part])
        short = dict(pairs=sum(p["pairs"] for p in parts), tokens=sum(p["tokens"] for p in parts),
                     nll=weighted(parts, "nll", "tokens"), kl=weighted(parts, "kl", "tokens"))
    if mc_items:
        mine = mc_items[env.dp_rank::env.dp]
        part = multiple_choice(model, tokenizer, mine, env.sp_group) if mine else dict(items=0, acc=0.0, acc_norm=0.0)
        parts = gather(env, [part])
        short.update(items=sum(p["items"] for p in parts), acc=weighted(parts, "acc", "items"),
                     acc_norm=weighted(parts, "acc_norm", "items"))
    return short


# -----------------------------------------------------------------------------
# tables

def format_table(header, rows, text_cols=1):
    """Plain text columns: the first text_cols left-aligned (names), the numbers right-aligned."""
    cols = list(zip(header, *rows))
    widths = [max(len(str(x)) for x in c) for c in cols]
    fmt = lambda row: "  ".join(str(x).ljust(w) if j < text_cols else str(x).rjust(w)
                                for j, (x, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def shown(x, fmt):
    """A number as the tables print it; None (a score not computed from non-finite numbers) as "non-finite"."""
    return "non-finite" if x is None else format(x, fmt)


def mean(xs):
    """The mean, or None when any of xs is None (a non-finite cell makes its averages unknown)."""
    return None if any(x is None for x in xs) else sum(xs) / len(xs)


def tables(report, lengths, threshold):
    """The RULER-like table, the per-task table and the short-context table, as text."""
    names = list(report["models"])
    mark = lambda name, L: "*" if L in report["models"][name]["beyond_max_positions"] else ""
    rows = []
    for name in names:
        m = report["models"][name]
        rows.append([name] + [shown(m["ruler"][L], ".1f") + mark(name, L) for L in lengths]
                    + [shown(m["ruler_avg"], ".1f"), m["effective_length"] or f"<{lengths[0]}"])
    text = ["RULER-like: task-average score (0-100) per length; effective length at threshold "
            f"{threshold} ('*': beyond the model's max positions)",
            format_table(["model"] + [str(L) for L in lengths] + ["avg", "effective"], rows), ""]
    rows = []
    for name in names:
        for task, per in report["models"][name]["long"].items():
            scores = [per[L]["score"] for L in lengths]
            rows.append([name, task] + [shown(v, ".1f") + mark(name, L) for v, L in zip(scores, lengths)]
                        + [shown(mean(scores), ".1f")])
    text += ["per task: string_match_all (mc_records: accuracy), 0-100",
             format_table(["model", "task"] + [str(L) for L in lengths] + ["avg"], rows, 2), ""]
    short = [(n, report["models"][n].get("short")) for n in names]
    if any(s for _, s in short):
        first = short[0][1] or {}
        keys = [k for k in ("nll", "kl", "acc", "acc_norm") if k in first]
        rows = []
        for name, s in short:
            row = [name]
            for k in keys:
                if k not in (s or {}):  # e.g. the KL of a model with another vocabulary: not defined
                    row += ["n/a"] + ([] if k == "kl" else ["n/a"])
                    continue
                row += [shown(s[k], ".4f" if k in ("nll", "kl") else ".1f")]
                if k != "kl":
                    delta = None if s[k] is None or first[k] is None else s[k] - first[k]
                    row += [shown(delta, "+.4f" if k == "nll" else "+.1f")]
            rows.append(row)
        header = ["model"]
        for k in keys:
            header += [{"nll": "NLL(y_S)", "kl": f"KL(.||{names[0]})", "acc": "MC acc", "acc_norm": "acc_norm"}[k]]
            if k != "kl":
                header += ["delta"]
        text += [f"short context: NLL per response token of πS's y_S given (C_S, I), KL per response token "
                 f"against {names[0]}; deltas against {names[0]}", format_table(header, rows), ""]
    return "\n".join(text)


# -----------------------------------------------------------------------------
# main

def eval_plan(cfg, path, sp, dtype, length, batch):
    """The memory plan of one model's sweep at its longest length (longpo.memory_plan's "eval" stage)."""
    config = longpo.AutoConfig.from_pretrained(path or longpo.default_model_dir())
    return longpo.memory_plan(config, "eval", length, sp, batch=batch, dtype=dtype, answer=cfg.max_new_tokens or 64)


def plan_batch(cfg, models, env, dtype, length):
    """--batch, or 0 resolved: the most samples (at most 8) whose plan fits the GPU at the longest length for every
    model; 4 on a CPU. The run is refused when even one does not fit (unless --plan_check false)."""
    if cfg.batch:
        batch = cfg.batch
    elif env.device.type != "cuda":
        batch = 4
    else:
        have = torch.cuda.get_device_properties(env.device).total_memory
        fits = [b for b in range(1, 9) if all(eval_plan(cfg, p, env.sp, dtype, length, b)[-1][1] <= have
                                              for _, p in models)]
        batch = max(fits, default=1)
    for name, path in models:
        longpo.check_plan(f"evaluation of {name}", eval_plan(cfg, path, env.sp, dtype, length, batch), env.device,
                          not cfg.plan_check)
    return batch


def main(cfg):
    t_start = time.time()
    lengths = parse_lengths(cfg.lengths)
    if cfg.plan:  # no process group, no weights: each model's plan at the longest length, for a GPU in bf16
        sp, dtype = cfg.sp or int(os.environ.get("WORLD_SIZE", 1)), "bfloat16" if cfg.dtype == "auto" else cfg.dtype
        for name, path in resolve_models(cfg):
            print0(longpo.format_plan(f"evaluation of {name}, a GPU's memory ({max(lengths)} tokens over sp {sp} "
                                      f"rank(s), batch {cfg.batch or 1}, {dtype})",
                                      eval_plan(cfg, path, sp, dtype, max(lengths), cfg.batch or 1)))
        return None
    env = longpo.setup_distributed(cfg.sp, cfg.timeout_min)
    own = read_task_file(cfg.task_file) if cfg.task_file else {}
    cfg.tasks = resolve_tasks(cfg.tasks, own)
    for task in own:  # every swept length needs samples: a missing cell would be a silent gap in the table
        missing = [L for L in lengths if len(own[task].get(L, [])) < cfg.samples]
        if missing:
            raise SystemExit(f"--task_file {cfg.task_file}: task {task!r} has fewer than --samples {cfg.samples} "
                             f"samples at length(s) {missing}")
    # every input is checked before the first model loads, so a typo costs seconds, not a sweep
    if os.path.isdir(cfg.json) or not longpo.creatable_dir(os.path.dirname(cfg.json) or "."):
        raise SystemExit(f"--json {cfg.json}: cannot be written (a directory, or under a file)")
    for target in (cfg.json, cfg.json + ".cells.jsonl"):  # an output over an input would replace it
        for option in ("task_file", "mc", "short_data"):
            if getattr(cfg, option) and os.path.realpath(getattr(cfg, option)) == os.path.realpath(target):
                raise SystemExit(f"--json {cfg.json}: {target} is the --{option} file; it would be overwritten: choose "
                                 "another --json")
    models = resolve_models(cfg)
    for name, path in models:
        longpo.check_weights(path, f"--models {name}={path or longpo.default_model_dir()}")
    mc_items = read_mc(cfg.mc) if cfg.mc else None
    pairs = read_pairs(cfg.short_data, cfg.short_n) if cfg.short_data else None
    inputs = [(flag, path) for flag, path in (("--task_file", cfg.task_file), ("--mc", cfg.mc),
                                              ("--short_data", cfg.short_data)) if path]
    tokenizers = {name: longpo.AutoTokenizer.from_pretrained(path or longpo.default_model_dir())
                  for name, path in models}
    if inputs:  # tokenizers only: the models load one at a time below
        check_rendered_text(inputs, list(tokenizers.items()))
    if pairs is None:
        print0("short-context NLL and KL skipped: pass --short_data FILE (a generate.py JSONL of held-out records)")
    dtype = longpo.inference_dtype(cfg.dtype, env.device)
    cfg.batch = plan_batch(cfg, models, env, str(dtype)[6:], max(lengths))
    print0(f"world {env.world} = dp {env.dp} x sp {env.sp}: dp groups split each cell's samples, each sample spread "
           f"over its group's {env.sp} rank(s); batch {cfg.batch}")
    print0(json.dumps(dataclasses.asdict(cfg)))
    if os.path.dirname(cfg.json) and env.master:
        os.makedirs(os.path.dirname(cfg.json), exist_ok=True)
    cells = read_cells(cfg, models, env, dtype)
    if cells.done:
        print0(f"{len(cells.done)} cell(s) already in {cells.path}: not computed again")

    report = dict(config=dataclasses.asdict(cfg), lengths=lengths, threshold=cfg.threshold, models={})
    base = None
    for k, (name, path) in enumerate(models):
        t0 = time.time()
        tokenizer = tokenizers[name]
        # a short-context cell holds the KL against the first model: that model is part of its key
        short_key = cell_key(cells, name, "short", cells.models[models[0][0]]) if pairs or mc_items else None
        todo = [cell_key(cells, name, t, L) for L in lengths for t in cfg.tasks] + ([short_key] if short_key else [])
        kl_base = k == 0 and pairs and any(cell_key(cells, n, "short", cells.models[name]) not in cells.done
                                           for n, _ in models[1:])
        model = None
        if any(key not in cells.done for key in todo) or kl_base:  # else every cell of it is done: no load
            model = longpo.load_model(path, dtype, "longpo")[0].to(env.device).eval()  # caches carry the group
        path = path or longpo.default_model_dir()
        max_pos = longpo.AutoConfig.from_pretrained(path).max_position_embeddings
        beyond = [L for L in lengths if L > max_pos]
        if beyond:
            print0(f"warning: {name} ({path}) has max_position_embeddings {max_pos}; lengths {beyond} run beyond it")
        print0(f"[{name}] {path}")
        long = long_context(cfg, model, tokenizer, name, lengths, own, env, cells)
        ruler = {L: mean([long[t][L]["score"] for t in cfg.tasks]) for L in lengths}
        entry = dict(path=path, max_position_embeddings=max_pos, beyond_max_positions=beyond, long=long, ruler=ruler,
                     ruler_avg=mean(list(ruler.values())), effective_length=effective_length(ruler, cfg.threshold))
        if short_key and short_key in cells.done:
            entry["short"] = cells.done[short_key]
        elif short_key:
            same_vocab = k == 0 or tokenizers[models[0][0]].get_vocab() == tokenizer.get_vocab()
            if not same_vocab:
                print0(f"warning: {name} has another vocabulary than {models[0][0]}: its KL is not defined, skipped")
            short = short_scores(cfg, env, model, tokenizer, pairs, mc_items, base if same_vocab else None)
            if pairs and not same_vocab:
                del short["kl"]
            save_cell(cells, short_key, short)
            entry["short"] = short
        if "short" in entry:
            print0(f"[{name}] short context: " + ", ".join(f"{k} {shown(v, '.4g')}" for k, v in entry["short"].items()))
        report["models"][name] = entry
        print0(f"[{name}] done in {time.time() - t0:.1f} s")
        if kl_base:  # the first model stays loaded only for the KL of later ones against it
            base = model
        del model

    report["wall_s"] = time.time() - t_start
    if env.master:
        print0("\n" + tables(report, lengths, cfg.threshold))
        print0(f"wall time {report['wall_s']:.0f} s")
        longpo.write_atomic(cfg.json, json.dumps(report, indent=1, allow_nan=False))
        print0(f"wrote {cfg.json} (its cells: {cells.path})")
    longpo.teardown_distributed()
    return report


if __name__ == "__main__":
    longpo.run_script(lambda: main(longpo.parse_config(EvalConfig, sys.argv[1:])))

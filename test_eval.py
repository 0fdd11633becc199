"""Tests of eval.py: task sizes and needle depths, RULER's and lm-evaluation-harness's scorers by hand, option
log-likelihoods and the short-context NLL/KL against a direct full-logits computation, bad input, and a tiny-model
end-to-end run. CPU, well under a minute.

    python -m pytest -q test_eval.py
"""

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_longpo import make_model, make_records, make_tokenizer  # noqa: E402

import eval as E  # noqa: E402
import longpo  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny Mistral in float64, and its tokenizer."""
    d = str(tmp_path_factory.mktemp("m64"))
    make_model(d)
    model, tokenizer = longpo.load_model(d, torch.float64, "sdpa")
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


# -----------------------------------------------------------------------------
# scorers, by hand


def test_string_match_by_hand():
    preds = ["The codes are 123 and 456.", "nothing here", "ABC"]
    refs = [["123", "456", "789"], ["42"], ["abc", "def"]]
    assert E.string_match_all(preds, refs) == pytest.approx(100 * (2 / 3 + 0 + 1 / 2) / 3)
    assert E.string_match_part(preds, refs) == pytest.approx(100 * (1 + 0 + 1) / 3)


def test_mc_scores_and_effective_length_by_hand():
    # raw argmax picks option 0; divided by UTF-8 bytes (1, 10, 2): -10, -1.2, -15, so acc_norm picks option 1
    assert E.mc_scores([-10.0, -12.0, -30.0], ["a", "bbbbbbbbbb", "cc"], 1) == (0.0, 1.0)
    # "é" is 2 bytes: -3/2 beats -2/1
    assert E.mc_scores([-2.0, -3.0], ["x", "é"], 1) == (0.0, 1.0)
    assert E.effective_length({1024: 90.0, 2048: 86.0, 4096: 50.0, 8192: 95.0}, 85.6) == 2048
    assert E.effective_length({1024: 80.0, 2048: 99.0}, 85.6) == 0


# -----------------------------------------------------------------------------
# log-likelihoods against a direct full-logits computation


def direct_logps(model, ids):
    x = torch.tensor(ids)[None]
    return model(x).logits[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]  # (T-1,)


def test_option_logliks_equal_direct(tiny64):
    model, tok = tiny64
    prompt = longpo.render_chat(tok, ["the cat sat on a mat by the river, what is the key"])[0]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in ("blue", "the red stone", "x", "apple tree")]
    got = E.option_logliks(model, prompt, options, prefill_chunk=7)  # several prefill chunks
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
    model, tok = tiny64
    items = [{"question": "what is the sun", "choices": ["a star", "blue green tree", "one"], "answer": a}
             for a in range(3)]
    prompt = longpo.render_chat(tok, [items[0]["question"]])[0]
    with torch.no_grad():
        ll = [direct_logps(model, prompt + tok(c, add_special_tokens=False)["input_ids"])[len(prompt) - 1:].sum().item()
              for c in items[0]["choices"]]
    best = max(range(3), key=ll.__getitem__)
    best_norm = max(range(3), key=lambda j: ll[j] / len(items[0]["choices"][j]))
    got = E.multiple_choice(model, tok, items)
    assert got["items"] == 3
    assert got["acc"] == pytest.approx(100 / 3) and got["acc_norm"] == pytest.approx(100 / 3)
    assert E.multiple_choice(model, tok, [items[best]])["acc"] == 100.0
    assert E.multiple_choice(model, tok, [items[best_norm]])["acc_norm"] == 100.0


def test_long_context_scores_decoded_outputs(tiny64, monkeypatch):
    """The sweep's plumbing: a sampler that echoes the first prompt of a batch (which holds every reference) and
    returns nothing for the second must give string_match_all 50 on every generated task."""
    model, tok = tiny64
    calls = []

    def echo(model, prompts, eos_ids, max_new_tokens, temperature, prefill_chunk):
        calls.append((len(prompts), temperature, max_new_tokens))
        return [(p if j == 0 else [], j == 0) for j, p in enumerate(prompts)]

    monkeypatch.setattr(E, "generate_tokens", echo)
    cfg = E.EvalConfig(samples=2, batch=4)
    out = E.long_context(cfg, model, tok, "tiny", [1024])
    for task in E.TASKS[:-1]:
        assert out[task][1024]["string_match_all"] == 50.0 and out[task][1024]["string_match_part"] == 50.0
    assert len(calls) == len(E.TASKS) - 1 and all(n == 2 and t == 0.0 and m > 16 for n, t, m in calls)
    mc = out["mc_records"][1024]
    for s in mc["samples"]:  # the option picked is the argmax of its log-likelihoods
        assert s["pred"] == s["options"][max(range(4), key=s["logliks"].__getitem__)]
    assert mc["score"] == 50.0 * sum(s["pred"] == s["answers"][0] for s in mc["samples"])


# -----------------------------------------------------------------------------
# bad input


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
                        "--json", str(out)],
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

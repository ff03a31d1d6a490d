"""Regenerate everything under jaxrm/assets/ from two pinned PyPI sdists.

    python scripts/build_assets.py                   # pip-downloads the sdists into a temp dir
    python scripts/build_assets.py --sdist-dir DIR   # or uses copies already in DIR

Asset-build time only: nothing in jaxrm downloads anything at run time.

- vaderSentiment==3.3.2 (MIT): additional_resources/hutto_ICWSM_2014.tar.gz holds ~23,700
  sentences (tweets, movie reviews, Amazon reviews, NYT editorials), each with the mean of
  15-99 people's ratings (mostly 20) on a -4..+4 sentiment scale (Hutto & Gilbert, ICWSM 2014).
  -> jaxrm/assets/vader_pairs/{train,validation,test}.jsonl.gz, preference pairs
- openai-whisper==20250625 (MIT): whisper/assets/gpt2.tiktoken, the GPT-2 BPE ranks
  (byte-identical to tiktoken's r50k_base, checked by sha256)
  -> jaxrm/assets/gpt2.tiktoken
plus the two licence files and jaxrm/assets/README.md (with the counts of this run).

Pairs: dedupe sentences by text, drop those whose prompt+answer is over MAX_TOKENS GPT-2
tokens, split the SENTENCES 80/10/10 within each source corpus, then within each split and
source pair sentences whose mean ratings differ by >= MIN_GAP: chosen = higher rating.
Everything is seeded; a rerun writes byte-identical files.
"""

import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSETS = ROOT / "jaxrm" / "assets"

VADER = ("vaderSentiment", "3.3.2", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")
WHISPER = ("openai-whisper", "20250625", "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")
GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base

SOURCES = {  # source name -> file inside hutto_ICWSM_2014/
    "tweets": "tweets_GroundTruth.txt",
    "movie_reviews": "movieReviewSnippets_GroundTruth.txt",
    "amazon_reviews": "amazonReviewSnippets_GroundTruth.txt",
    "nyt_editorials": "nytEditorialSnippets_GroundTruth.txt",
}
SEED = 1234
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
PROMPT = "Sentence:"
MIN_GAP = 1.0  # rating gap on the -4..4 scale; rater sd ~0.8, so a mean's std error ~0.2, a gap's ~0.28
MAX_TOKENS = 100  # GPT-2 tokens of PROMPT + " " + sentence
PAIRS_PER_SENTENCE = 1.5  # pairs made per sentence, within each split and source


def sdist(spec, sdist_dir):
    """Path of the pinned sdist, downloaded with pip unless already in sdist_dir; sha256-checked."""
    name, version, sha = spec
    pat = f"{name.replace('-', '_')}-{version}.tar.gz"
    found = [p for p in sdist_dir.iterdir() if p.name.lower() == pat.lower()]
    if not found:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{name}=={version}",
                "-d",
                str(sdist_dir),
            ],
            check=True,
        )
        found = [p for p in sdist_dir.iterdir() if p.name.lower() == pat.lower()]
    path = found[0]
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != sha:
        sys.exit(f"{path}: sha256 {got} != pinned {sha}")
    return path


def read_member(tar_path, suffix):
    with tarfile.open(tar_path) as tf:
        (m,) = [m for m in tf.getmembers() if m.name.endswith(suffix)]
        return tf.extractfile(m).read()


def read_sentences(vader_sdist):
    """-> list of dicts {text, rating, source, id}, deduplicated by exact text."""
    inner = read_member(vader_sdist, "additional_resources/hutto_ICWSM_2014.tar.gz")
    rows = []
    with tarfile.open(fileobj=io.BytesIO(inner)) as tf:
        for source, fname in SOURCES.items():
            (m,) = [m for m in tf.getmembers() if m.name.endswith("/" + fname)]
            for line in tf.extractfile(m).read().decode("utf-8").splitlines():
                if not line.strip():
                    continue
                sid, rating, text = line.split("\t", 2)
                rows.append(
                    {"text": " ".join(text.split()), "rating": float(rating), "source": source, "id": sid}
                )
    by_text = {}  # same text twice (84 times within a corpus, a few across): one sentence, mean rating
    for r in rows:
        by_text.setdefault(r["text"], []).append(r)
    sentences = [
        dict(group[0], rating=float(np.mean([g["rating"] for g in group]))) for group in by_text.values()
    ]
    return sentences, len(rows)


def make_pairs(sents, rng):
    """Pairs within one split and source: each anchor gets one partner >= MIN_GAP away, uniformly."""
    order = np.argsort([s["rating"] for s in sents], kind="stable")
    sents = [sents[i] for i in order]
    ratings = np.array([s["rating"] for s in sents])
    n, n_pairs = len(sents), int(round(PAIRS_PER_SENTENCE * len(sents)))
    anchors = np.concatenate([rng.permutation(n) for _ in range(int(np.ceil(PAIRS_PER_SENTENCE)))])[:n_pairs]
    seen, pairs = set(), []
    for a in anchors:
        lo = np.searchsorted(ratings, ratings[a] - MIN_GAP, side="right")  # [0, lo) is >= MIN_GAP below
        hi = np.searchsorted(ratings, ratings[a] + MIN_GAP, side="left")  # [hi, n) is >= MIN_GAP above
        n_eligible = lo + (n - hi)
        for _ in range(10):  # a few tries to avoid repeating a pair
            if n_eligible == 0:
                break
            k = rng.integers(n_eligible)
            b = k if k < lo else hi + (k - lo)
            key = (min(a, b), max(a, b))
            if key not in seen:
                seen.add(key)
                top, bottom = sents[key[1]], sents[key[0]]  # sorted by rating: the larger index is chosen
                pairs.append(
                    {
                        "prompt": PROMPT,
                        "chosen": " " + top["text"],
                        "rejected": " " + bottom["text"],
                        "margin": round(top["rating"] - bottom["rating"], 4),
                    }
                )
                break
    return pairs


def write_jsonl_gz(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f,
    ):
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))


def pct(xs, qs=(50, 90, 99, 100)):
    return " / ".join(str(int(np.percentile(xs, q, method="higher"))) for q in qs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist-dir", type=pathlib.Path, help="directory holding (or to receive) the sdists")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    sdist_dir = args.sdist_dir or pathlib.Path(tmp.name)
    sdist_dir.mkdir(parents=True, exist_ok=True)
    vader, whisper = sdist(VADER, sdist_dir), sdist(WHISPER, sdist_dir)

    # vocabulary and licences
    ASSETS.mkdir(parents=True, exist_ok=True)
    vocab = read_member(whisper, "whisper/assets/gpt2.tiktoken")
    assert hashlib.sha256(vocab).hexdigest() == GPT2_VOCAB_SHA256, "gpt2.tiktoken is not r50k_base"
    (ASSETS / "gpt2.tiktoken").write_bytes(vocab)
    (ASSETS / "LICENSE-vaderSentiment").write_bytes(read_member(vader, "vaderSentiment-3.3.2/LICENSE.txt"))
    (ASSETS / "LICENSE-gpt2-vocab").write_bytes(read_member(whisper, "openai_whisper-20250625/LICENSE"))

    # load jaxrm/tokenizer.py by path: no need for the rest of the package (or jax) to import
    spec = importlib.util.spec_from_file_location("_jaxrm_tokenizer", ROOT / "jaxrm" / "tokenizer.py")
    tok = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tok)
    EOT_TEXT, gpt2, byte = tok.EOT_TEXT, tok.GPT2Tokenizer(), tok.ByteTokenizer()
    assert gpt2.encode("Hello world") == [15496, 995]

    # sentences: dedupe, length filter, split by sentence within each source
    sentences, n_rows = read_sentences(vader)
    n_dedup = len(sentences)
    for s in sentences:
        s["gpt2_len"] = len(gpt2.encode(PROMPT + " " + s["text"]))
        s["byte_len"] = len(byte.encode(PROMPT + " " + s["text"]))
    n_eot = sum(EOT_TEXT in s["text"] for s in sentences)
    sentences = [s for s in sentences if EOT_TEXT not in s["text"]]
    too_long = [s for s in sentences if s["gpt2_len"] > MAX_TOKENS]
    sentences = [s for s in sentences if s["gpt2_len"] <= MAX_TOKENS]

    split_sents = {k: [] for k in SPLITS}
    for si, source in enumerate(SOURCES):
        group = [s for s in sentences if s["source"] == source]
        perm = np.random.default_rng([SEED, si]).permutation(len(group))
        cuts = np.cumsum([round(f * len(group)) for f in list(SPLITS.values())[:-1]])
        for name, idx in zip(SPLITS, np.split(perm, cuts)):
            split_sents[name] += [group[i] for i in sorted(idx)]

    # pairs within each split and source, then one shuffle per split
    rows, split_pairs = [], {}
    for pi, name in enumerate(SPLITS):
        pairs, per_source = [], {}
        for si, source in enumerate(SOURCES):
            group = [s for s in split_sents[name] if s["source"] == source]
            p = make_pairs(group, np.random.default_rng([SEED, 100 + pi, si]))
            per_source[source] = (len(group), len(p))
            pairs += p
        pairs = [pairs[i] for i in np.random.default_rng([SEED, 200 + pi]).permutation(len(pairs))]
        split_pairs[name] = pairs
        write_jsonl_gz(ASSETS / "vader_pairs" / f"{name}.jsonl.gz", pairs)
        lens = [s["gpt2_len"] for s in split_sents[name]]
        blens = [s["byte_len"] for s in split_sents[name]]
        margins = [p["margin"] for p in pairs]
        rows.append(
            f"| {name} | {len(split_sents[name])} | {len(pairs)} | "
            + " / ".join(f"{per_source[s][1]}" for s in SOURCES)
            + f" | {pct(lens)} | {pct(blens)} | {np.median(margins):.2f} |"
        )
        print(rows[-1])

    texts = {k: {s["text"] for s in v} for k, v in split_sents.items()}
    assert not (
        texts["train"] & texts["validation"]
        or texts["train"] & texts["test"]
        or texts["validation"] & texts["test"]
    )
    all_lens = [s["gpt2_len"] for s in sentences]
    per_source_counts = ", ".join(f"{s}: {sum(x['source'] == s for x in sentences)}" for s in SOURCES)
    sizes = "\n".join(
        f"| `{p.relative_to(ASSETS)}` | {p.stat().st_size:,} |"
        for p in sorted(ASSETS.rglob("*"))
        if p.is_file() and p.name != "README.md"
    )
    n_too_long, n_kept, rows_md, all_pct = len(too_long), len(sentences), "\n".join(rows), pct(all_lens)
    (ASSETS / "README.md").write_text(README.format_map({**globals(), **locals()}))
    over = f"{len(too_long)} over {MAX_TOKENS} tokens"
    print(f"sentences: {n_rows} rows, {n_dedup} unique, {over}, {len(sentences)} kept")


README = """\
# jaxrm/assets

Generated by `python scripts/build_assets.py` (do not edit by hand; rerun it instead).
It needs pip and a package index, only at asset-build time: jaxrm never downloads anything.

| file | bytes |
| --- | --- |
{sizes}

## gpt2.tiktoken: GPT-2 BPE vocabulary

`whisper/assets/gpt2.tiktoken` from the sdist of openai-whisper=={WHISPER[1]} (MIT, licence in
`LICENSE-gpt2-vocab`). It is byte-identical to tiktoken's `r50k_base` ranks
(sha256 `{GPT2_VOCAB_SHA256}`, checked by the build script and at load time),
i.e. the vocabulary OpenAI released with GPT-2. `jaxrm.tokenizer.GPT2Tokenizer` reads it from disk.

## vader_pairs/: human-rated sentiment, as preference pairs

Source: `additional_resources/hutto_ICWSM_2014.tar.gz` from the sdist of vaderSentiment=={VADER[1]}
(MIT, licence in `LICENSE-vaderSentiment`). Please cite:

> Hutto, C.J. & Gilbert, E.E. (2014). VADER: A Parsimonious Rule-based Model for Sentiment
> Analysis of Social Media Text. Eighth International Conference on Weblogs and Social Media
> (ICWSM-14). Ann Arbor, MI, June 2014.

Each sentence (tweet-like texts, movie-review, Amazon-review and NYT-editorial snippets) carries
the mean of the sentiment ratings of 15 to 99 people (20 for most; the raw ratings are in the
tarball) on a -4 (extremely negative) to +4
(extremely positive) scale. A pair says "people rated `chosen` more positive than `rejected`".

How the files are made (seed {SEED}, deterministic, byte-identical on rerun):

1. Read the four `*_GroundTruth.txt` files: {n_rows} rows. Whitespace runs become one space;
   text is otherwise verbatim (tweets keep e.g. `&amp;`). Identical texts are merged into one
   sentence with the mean of their ratings: {n_dedup} unique sentences.
2. Drop sentences containing `<|endoftext|>` ({n_eot}) and those whose `"{PROMPT}" + " " + text`
   is over {MAX_TOKENS} GPT-2 tokens ({n_too_long}). Kept: {n_kept} ({per_source_counts}).
3. Split the SENTENCES, never the pairs, 80/10/10 into train/validation/test, separately within each
   source so every split has the same mix. No sentence is in two splits.
4. Within each split and source (tweets with tweets, etc.), make round({PAIRS_PER_SENTENCE} x sentences)
   pairs: every sentence is an anchor once (and half of them a second time, in random order) and gets
   a partner drawn uniformly among the sentences of the same split and source whose mean rating
   differs by at least {MIN_GAP} (no pair repeats). chosen = the higher-rated one.
   Raters' standard deviation is about 0.8, so a mean's standard error is about 0.2 and a
   difference of two means has one of about 0.28: a gap of {MIN_GAP} is a reliable preference; `margin` is the gap, for margin losses and analysis.
5. Shuffle each split and write one JSON object per line, gzip-compressed:
   `{{"prompt": "{PROMPT}", "chosen": " <text>", "rejected": " <text>", "margin": <gap>}}`.
   The answers start with a space so that BPE of prompt + answer is natural; chosen and rejected
   therefore diverge after the shared prompt tokens.

| split | sentences | pairs | pairs: tweets / movies / amazon / nyt | GPT-2 tokens of prompt+answer p50 / p90 / p99 / max | bytes p50 / p90 / p99 / max | median margin |
| --- | --- | --- | --- | --- | --- | --- |
{rows_md}

All kept sentences: GPT-2 tokens p50 / p90 / p99 / max = {all_pct}. So `seq_len` {MAX_TOKENS} fits
every pair with the GPT-2 tokenizer; the byte tokenizer needs the longer lengths above (or drops pairs).

Load with `jaxrm.formats.load_pairs(jaxrm.data.bundled_data_path("train"))`.

## Regenerate

```
python scripts/build_assets.py                  # pip download --no-deps --no-binary :all: of both sdists
python scripts/build_assets.py --sdist-dir DIR  # reuse sdists already in DIR
```

The sdists are pinned by version and sha256 in the script.
"""

if __name__ == "__main__":
    main()

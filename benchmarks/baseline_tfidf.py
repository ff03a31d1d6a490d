"""TF-IDF + logistic-regression pairwise baseline on the bundled VADER preference pairs.

    python -m benchmarks.baseline_tfidf [--json [FILE]]

A linear reward r(x) = w . tfidf(x): TfidfVectorizer is fit on the train sentences, then a
LogisticRegression without intercept on feature differences (chosen - rejected -> 1,
rejected - chosen -> 0), i.e. a Bradley-Terry model. C is picked on validation accuracy.
Pairwise accuracy = fraction of pairs with r(chosen) > r(rejected). A reward model that does
not beat this is not learning more than word-level sentiment.
"""

import argparse
import json
import sys
import time

import numpy as np
from scipy.sparse import vstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from jaxrm.data import bundled_data_path
from jaxrm.formats import load_pairs

C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


def run(seed: int = 0) -> dict:
    t0 = time.perf_counter()
    splits = {s: load_pairs(bundled_data_path(s)) for s in ("train", "validation", "test")}
    train_texts = sorted({p.prompt + t for p in splits["train"] for t in (p.chosen, p.rejected)})
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(train_texts)

    def diff(pairs):  # (N, V) sparse: tfidf(chosen) - tfidf(rejected)
        return vec.transform([p.prompt + p.chosen for p in pairs]) - vec.transform(
            [p.prompt + p.rejected for p in pairs]
        )

    d = {s: diff(pairs) for s, pairs in splits.items()}
    x_train = vstack([d["train"], -d["train"]])  # (2N, V): both orders, so the classes are balanced
    y_train = np.r_[np.ones(d["train"].shape[0]), np.zeros(d["train"].shape[0])]

    def accuracy(model, x):
        return float(np.mean(x @ model.coef_.ravel() > 0))

    best = None
    per_c = {}
    for c in C_GRID:
        model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000, random_state=seed).fit(
            x_train, y_train
        )
        per_c[c] = accuracy(model, d["validation"])
        if best is None or per_c[c] > per_c[best[0]]:
            best = (c, model)
    c, model = best
    return {
        "baseline": "tfidf_logreg",
        "C": c,
        "validation_accuracy_by_C": {str(k): v for k, v in per_c.items()},
        "train_accuracy": accuracy(model, d["train"]),
        "validation_accuracy": accuracy(model, d["validation"]),
        "test_accuracy": accuracy(model, d["test"]),
        "pairs": {s: len(p) for s, p in splits.items()},
        "vocabulary": len(vec.vocabulary_),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description="TF-IDF + logistic regression pairwise baseline")
    ap.add_argument(
        "--json", nargs="?", const="-", metavar="FILE", help="write results as JSON (stdout if no FILE)"
    )
    args = ap.parse_args(argv)
    res = run()
    print(
        f"tfidf+logreg (C={res['C']}, {res['vocabulary']} features): pairwise accuracy "
        f"train {res['train_accuracy']:.4f}  validation {res['validation_accuracy']:.4f}  "
        f"test {res['test_accuracy']:.4f}  ({res['seconds']} s)",
        file=sys.stderr if args.json == "-" else sys.stdout,
    )
    if args.json == "-":
        print(json.dumps(res, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

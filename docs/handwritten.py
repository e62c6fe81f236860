#!/usr/bin/env python3
"""The measured part of docs/handwritten.md, from the reports docs/handwritten.sh writes.

Usage: python3 docs/handwritten.py MODELS DATA
  MODELS: space-separated model names with a report in reports/handwritten-<model>/
  DATA:   the labelled incidents (data/handwritten/incidents.jsonl)

Prints Markdown: the set's make-up, accuracy per field and system with 95 % intervals for
whole tickets, a paired count of whole tickets against TF-IDF, accuracy by language, the
priority confusion of TF-IDF and each adapter, and every wrong field of each adapter. Each
model's TF-IDF is fitted on its adapter's training file (reports/handwritten-<model>/train); one
fitted on the same file as another model's is shown once. Nothing here is fitted or chosen on
these incidents.
"""
import json
import math
import sys
from collections import Counter

FIELDS = ["category", "subcategory", "priority", "assignment_group", "request_type"]
NAMES = {"assignment_group": "assignment group", "request_type": "request type"}


def wilson(k, n, z=1.96):
    """95 % Wilson score interval of k successes in n, in percent."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, 100 * (c - h)), min(100.0, 100 * (c + h)))


def load(model):
    with open(f"reports/handwritten-{model}/report.json") as f:
        r = json.load(f)
    runs = {}
    for run in r["runs"]:
        preds = {}
        for p in run["predictions"]:
            got = {f: v for f, v, _ in p["predicted"]}
            conf = {f: c for f, _, c in p["predicted"]}
            preds[p["id"]] = (got, conf)
        runs[run["name"]] = preds
    return runs


def train_size(model):
    """The training file of the model's TF-IDF and its number of examples, if recorded."""
    try:
        path = open(f"reports/handwritten-{model}/train").read().strip()
        return path, sum(1 for l in open(path) if l.strip())
    except OSError:
        return None, None


def label(name, model, n_train=None):
    if name == "tfidf-baseline":
        return f"TF-IDF ({n_train:,})" if n_train else "TF-IDF"
    if name == "zero-shot":
        return f"{model} zero-shot"
    return f"{model} + adapter"


def main(models, data):
    rows = [json.loads(l) for l in open(data)]
    gold = {r["id"]: r["ticket"] for r in rows}
    lang = {r["id"]: r["lang"] for r in rows}
    n = len(rows)
    systems = []  # (label, predictions)
    baseline_of = {}  # model -> the label of the TF-IDF fitted on its adapter's training file
    trains = {m: train_size(m) for m in models}
    distinct = len({t for t, _ in trains.values()}) > 1
    for m in models:
        runs = load(m)
        _, n_train = trains[m]
        for name, preds in runs.items():
            name_label = label(name, m, n_train if distinct else None)
            if name == "tfidf-baseline":
                baseline_of[m] = name_label
                if any(s[0] == name_label for s in systems):
                    continue
            if set(preds) != set(gold):
                sys.exit(f"reports/handwritten-{m}: {name} has {len(preds)} predictions for {n} incidents: run docs/handwritten.sh again")
            systems.append((name_label, preds))

    def right(preds, i, f):
        return preds[i][0].get(f) == gold[i][f]

    def whole(preds, i):
        return all(right(preds, i, f) for f in FIELDS)

    langs = Counter(lang.values())
    print(f"{n} incidents; by language: " + ", ".join(f"{l} {c}" for l, c in langs.most_common()) + ".")
    print("By priority: " + ", ".join(f"{p} {c}" for p, c in Counter(t['priority'] for t in gold.values()).most_common())
          + "; by request type: " + ", ".join(f"{p} {c}" for p, c in Counter(t['request_type'] for t in gold.values()).most_common()) + ".")
    print()
    print("### Accuracy")
    print()
    print("| field | " + " | ".join(s[0] for s in systems) + " |")
    print("|---|" + "---|" * len(systems))
    for f in FIELDS:
        cells = []
        for _, p in systems:
            cells.append(f"{100 * sum(right(p, i, f) for i in gold) / n:.1f} %")
        print(f"| {NAMES.get(f, f)} | " + " | ".join(cells) + " |")
    cells = []
    for _, p in systems:
        k = sum(whole(p, i) for i in gold)
        lo, hi = wilson(k, n)
        cells.append(f"**{100 * k / n:.1f} %** ({lo:.0f}–{hi:.0f})")
    print("| all five right (95 % interval) | " + " | ".join(cells) + " |")
    print()
    if baseline_of:
        print("Whole tickets, paired with the model's TF-IDF on the same incidents (right only by"
              " this system / right only by TF-IDF):")
        print()
        by_label = dict(systems)
        for m in models:
            base_label = baseline_of.get(m)
            if not base_label:
                continue
            base = by_label[base_label]
            for name, p in systems:
                if name.startswith("TF-IDF") or not name.startswith(f"{m} "):
                    continue
                a = sum(whole(p, i) and not whole(base, i) for i in gold)
                b = sum(whole(base, i) and not whole(p, i) for i in gold)
                print(f"- {name} vs {base_label}: {a} / {b}")
        print()
    print("### All five right, by language")
    print()
    print("| language | incidents | " + " | ".join(s[0] for s in systems) + " |")
    print("|---|---|" + "---|" * len(systems))
    for l, c in langs.most_common():
        ids = [i for i in gold if lang[i] == l]
        cells = [f"{100 * sum(whole(p, i) for i in ids) / c:.0f} %" for _, p in systems]
        print(f"| {l} | {c} | " + " | ".join(cells) + " |")
    print()
    values = ["Low", "Medium", "High", "Critical"]
    if set(t["priority"] for t in gold.values()) <= set(values):
        print("### Priority: label (rows) against output (columns)")
        print()
        for name, p in systems:
            if not name.endswith("adapter") and not name.startswith("TF-IDF"):
                continue
            print(f"**{name}**")
            print()
            print("| label \\ output | " + " | ".join(values) + " |")
            print("|---|" + "---|" * len(values))
            for g in values:
                c = Counter(p[i][0].get("priority") for i in gold if gold[i]["priority"] == g)
                print(f"| {g} | " + " | ".join(str(c[v]) for v in values) + " |")
            print()
    print("### Every wrong field of the adapters")
    print()
    for name, p in systems:
        if not name.endswith("adapter"):
            continue
        wrong = Counter(f for i in gold for f in FIELDS if not right(p, i, f))
        print(f"**{name}**: {sum(wrong.values())} wrong fields (" +
              ", ".join(f"{NAMES.get(f, f)} {wrong[f]}" for f in FIELDS if wrong[f]) + ").")
        print()
        print("<details><summary>incident by incident</summary>")
        print()
        print("| incident | field | label | output (confidence) |")
        print("|---|---|---|---|")
        for i in gold:
            for f in FIELDS:
                if not right(p, i, f):
                    print(f"| {i} ({lang[i]}) | {NAMES.get(f, f)} | {gold[i][f]} | {p[i][0].get(f, '-')} ({p[i][1].get(f, 0):.2f}) |")
        print()
        print("</details>")
        print()


if __name__ == "__main__":
    main(sys.argv[1].split(), sys.argv[2])

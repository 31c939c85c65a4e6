"""Recall and false-positive rate of the built-in redaction rules on a labelled sample.

    python bench/redaction_eval.py [bench/redaction/sample.jsonl] [--show-misses]

Each line of the sample is ``{"text": ..., "labels": [types present]}``. For each type T:
recall = lines labelled T in which T was detected / lines labelled T; false-positive rate = lines
*not* labelled T in which T was detected / lines not labelled T. A line counts once per type.
Also: the share of labelled secrets whose text survives redaction verbatim (leak rate), measured on
the redacted output rather than on the detector's own report.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apps.common.redaction import BUILTIN_TYPES, Redactor  # noqa: E402


def main(argv: list[str]) -> int:
    show = "--show-misses" in argv
    args = [a for a in argv if not a.startswith("--")]
    path = Path(args[0]) if args else Path(__file__).parent / "redaction" / "sample.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    stats = {t: {"pos": 0, "tp": 0, "neg": 0, "fp": 0} for t in BUILTIN_TYPES}
    misses = []
    for item in lines:
        redactor = Redactor()
        redactor.text(item["text"])
        found = set(redactor.stats.counts)
        labels = set(item["labels"])
        for t in BUILTIN_TYPES:
            s = stats[t]
            if t in labels:
                s["pos"] += 1
                s["tp"] += t in found
            else:
                s["neg"] += 1
                s["fp"] += t in found
        if found != labels:
            misses.append((item["text"], sorted(labels), sorted(found)))
    pii_lines = sum(1 for item in lines if item["labels"])
    print(f"sample: {path} — {len(lines)} strings, {pii_lines} with PII, {len(lines) - pii_lines} without")
    print(f"{'type':8} {'positives':>9} {'recall':>8} {'negatives':>9} {'FPR':>7}")
    for t in BUILTIN_TYPES:
        s = stats[t]
        recall = s["tp"] / s["pos"] if s["pos"] else float("nan")
        fpr = s["fp"] / s["neg"] if s["neg"] else float("nan")
        print(f"{t:8} {s['pos']:9d} {recall:8.1%} {s['neg']:9d} {fpr:7.1%}")
    clean = [item for item in lines if not item["labels"]]
    touched = sum(1 for item in clean if Redactor().text(item["text"]) != item["text"])
    print(f"clean strings changed by redaction: {touched}/{len(clean)} ({touched / max(len(clean), 1):.1%})")
    redactor = Redactor()
    texts = [item["text"] for item in lines]
    size = sum(len(t.encode()) for t in texts)
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        for text in texts:
            redactor.text(text)
        rounds += 1
    elapsed = time.perf_counter() - start
    print(f"speed: {rounds * len(texts) / elapsed:,.0f} strings/s, {rounds * size / elapsed / 1e6:.1f} MB/s "
          f"(one core, mean string {size / len(texts):.0f} bytes)")
    if show:
        for text, labels, found in misses:
            print(f"  labelled {labels} found {found}: {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

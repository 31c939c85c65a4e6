#!/usr/bin/env python3
"""Count the stored spans every --interval seconds over one connection, writing the figure to --out.

The OTLP load generator's --verify-cmd runs a shell command per poll; a psql per poll cost ~25 ms of
CPU on the machine under test (about 7% of it at 4 polls a second). With this running beside the
benchmark, the verify command is a `cat` of the file.

    python bench/span_counter.py --database postgres://postgres@127.0.0.1:5432/db --out count.txt
    python bench/span_counter.py --database sqlite:///path/controlplane.sqlite3 --out count.txt
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--database", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--max-seconds", type=float, default=3600)
    args = p.parse_args()
    if args.database.startswith("sqlite:///"):
        conn = sqlite3.connect(args.database[len("sqlite:///"):], timeout=30)
    else:
        import psycopg
        conn = psycopg.connect(args.database, autocommit=True)
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        try:
            (count,) = conn.execute("SELECT count(*) FROM traces_span").fetchone()
        except Exception:  # noqa: BLE001 - the table may not exist yet; try again
            count = 0
        with open(args.out + ".tmp", "w") as f:
            f.write(f"{count}\n")
        os.replace(args.out + ".tmp", args.out)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()

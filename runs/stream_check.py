"""Whether a build with today's streamed reads (extraction/rows.py, `Extraction.example_slices`) gives what an
earlier build of the same extraction gave: REBUILT is `toe rebuild` of a budgeted real-pair extraction (the
clustering again, from the same maps) or the same `toe extract` run again from the same capture (the fusion maps
trained again too); its projector, plug-in and route data are compared tensor by tensor with BUILT's, and the two
builds' peak RSS recorded.

    python runs/stream_check.py BUILT REBUILT [OUT]     # OUT default: results/scale/stream-check.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file

from tree_of_experts.extraction.store import Extraction
from tree_of_experts.files import atomic_write_json


def main(built: str, rebuilt: str, out: str = "results/scale/stream-check.json") -> None:
    a = load_file(os.path.join(built, "toe_model.safetensors"))
    b = load_file(os.path.join(rebuilt, "toe_model.safetensors"))
    ra, rb = Extraction(built).route_data(), Extraction(rebuilt).route_data()
    pa = load_file(os.path.join(built, "projector.safetensors"))
    pb = load_file(os.path.join(rebuilt, "projector.safetensors"))
    result = {
        "command": f"python runs/stream_check.py {built} {rebuilt} {out}",
        "projector_equal": sorted(pa) == sorted(pb) and all(torch.equal(pa[k], pb[k]) for k in pa),
        "plugin_tensors": len(a), "plugin_equal": sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a),
        "plugin_max_abs_diff": max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b),
        "route_data_equal": sorted(ra) == sorted(rb) and all(torch.equal(ra[k], rb[k]) for k in ra),
        "peak_rss_gib": {"built": json.load(open(os.path.join(built, "summary.json")))["memory"]["peak_rss_gib"],
                         "rebuilt": json.load(open(os.path.join(rebuilt, "summary.json")))["memory"]["peak_rss_gib"]},
    }
    atomic_write_json(out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

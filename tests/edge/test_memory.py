"""The edge's memory over a long generation: a graph that returns its keys and values as new arrays (GPT-2
export: one position longer every step) must not leave a new ONNX Runtime arena region behind per step.

With the arena growing by exactly each request (``arena_extend_strategy`` 1) every decode step's longer
present keys/values needed a region no earlier one could serve: a 512-token GPT-2-124M generation peaked at
1.35 GB against 0.41 GB. The measurement runs in a fresh process: the arena is one per process, and regions
an earlier test left behind would hide the growth.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROMPT, STEPS = 512, 32
BOUND_MB = 32  # a region per step: 86 MB over these 32 steps (measured with the old setting)

_MEASURE = r"""
import json, sys
from seamline.edge.runtime import EdgeRuntime

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

bundle, prompt, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rt = EdgeRuntime(bundle, threads=1, verify=False)
k = rt.num_edge_layers
cache = rt.new_cache()
ids = [(7 * i) % 250 + 3 for i in range(prompt)]
for a in range(0, prompt, 128):
    rt.forward(ids[a:a + 128], a, k, cache)
before = rss_mb()
for j in range(steps):
    rt.forward([9 + j % 200], prompt + j, k, cache)
print(json.dumps({"before": before, "after": rss_mb()}))
"""


@pytest.fixture(scope="module")
def wide_gpt2(tmp_path_factory, cut_bundle):
    """A 6-block, 384-wide GPT-2 with 1,024 positions (the MiniLM tokenizer), every block on the edge: 18 KB
    of keys and values per position, so a region per step is plain in the process's resident set (with 2
    blocks the arena happened to reuse its regions)."""
    from seamline.testing.models import minilm_dir, random_checkpoint

    folder = random_checkpoint("gpt2", tmp_path_factory.mktemp("wide-gpt2") / "gpt2", seed=3,
                               config={"n_layer": 6, "n_embd": 384, "n_head": 6, "n_positions": 1024,
                                       "vocab_size": 30522, "bos_token_id": 101, "eos_token_id": 102},
                               tokenizer=minilm_dir() / "tokenizer.json")
    return cut_bundle(str(folder)).path


def test_decode_steps_at_new_lengths_reuse_the_arena(wide_gpt2):
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(wide_gpt2), str(PROMPT), str(STEPS)],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    grew = rss["after"] - rss["before"]
    assert grew < BOUND_MB, (f"the edge's resident set grew {grew:.0f} MB over {STEPS} decode steps after a "
                             f"{PROMPT}-token prompt ({rss}): the keys and values of each step are left in "
                             "regions the next, longer step cannot reuse")

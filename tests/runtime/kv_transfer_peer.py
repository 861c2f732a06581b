"""The prefill side of tests/runtime/test_kv_transfer.py, in its own process: computes each prompt
it is given, offers its pages through a TransferEndpoint and prints the offer as one JSON line.

    python -m tests.runtime.kv_transfer_peer CHECKPOINT   (stdin: one JSON list of token ids per line)
"""

import json
import sys

from meshserve.models.checkpoint import load_checkpoint
from meshserve.runtime.engine import Engine, EngineConfig
from meshserve.runtime.kv_transfer import TransferEndpoint
from meshserve.runtime.sampling import SamplingParams

CONFIG = EngineConfig(page_size=4, kv_cache_bytes=2 * 2 * 4 * 2 * 8 * 4 * 64, max_seq_len=60, max_num_seqs=4,
                      max_num_batched_tokens=16, max_prefill_chunk=16, kv_transfer=True)


def main() -> None:
    engine = Engine(load_checkpoint(sys.argv[1], progress=False), CONFIG)
    endpoint = TransferEndpoint()
    print(json.dumps({"ready": endpoint.address}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        ids, skip = request["ids"], request.get("skip", 0)
        engine.generate([ids], SamplingParams(max_tokens=1))
        print(json.dumps(endpoint.offer(engine.export_prompt(ids, skip)).as_dict()), flush=True)


if __name__ == "__main__":
    main()

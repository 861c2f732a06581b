"""The `meshserve` command line.

    meshserve convert --from gguf:FILE | hf:DIR --out CKPT_DIR [--dtype bfloat16|float32] [--quantize FORMAT]
    meshserve generate [--model CKPT_DIR] [--mesh MESH.yaml] [--chat] [sampling flags] "prompt"
    meshserve generate --input prompts.jsonl --output results.jsonl [--chat] [sampling flags]
    meshserve generate --server HOST:PORT [--chat] [sampling flags] "prompt"   stream from a server
    meshserve serve [MODEL] [--config FILE] [--host H] [--port P] [--grpc-port P] [vLLM's engine flags] ...
                                              MODEL: a GGUF file, a Hugging Face folder or a checkpoint
    meshserve fetch-default [--dtype ...]     fetch and convert the default model, print its folder
    meshserve --version                       meshserve's version and the libraries' it runs on

Errors the user can fix are printed as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

from meshserve.models.errors import MeshserveError, RequestError
from meshserve.models.config import KV_CACHE_DTYPES, QUANTIZATIONS
from meshserve.models.sources import DTYPES, source_name
from meshserve.serving import versions

EXIT_ERROR = 1
DEFAULT_SERVING_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "serving" / "default.yaml"
# Per-line fields of --input that override the command line's sampling flags.
LINE_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                        "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
                        "ignore_eos", "logprobs")


class _PrintVersions(argparse.Action):
    """`--version` as one unwrapped line (argparse's own version action wraps it at the terminal width)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions.describe())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve", description="LLM inference on JAX/XLA")
    p.add_argument("--version", action=_PrintVersions, nargs=0,
                   help="print meshserve's version and those of the libraries it runs on")
    sub = p.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="import a GGUF file or HF folder into a checkpoint")
    conv.add_argument("--from", dest="source", required=True, metavar="gguf:FILE|hf:DIR")
    conv.add_argument("--out", required=True, metavar="CKPT_DIR")
    conv.add_argument("--dtype", default="auto", choices=DTYPES,
                      help="auto: the source's (bfloat16 stays bfloat16, float16 and quantized blocks become "
                           "bfloat16, float32 stays float32)")
    conv.add_argument("--quantize", choices=QUANTIZATIONS, metavar="FORMAT",
                      help="the linear layers' weights in this format: " + ", ".join(QUANTIZATIONS)
                           + " (norms, and the embeddings except with the w8a8 formats, stay in --dtype)")

    gen = sub.add_parser("generate", help="stream a completion, or run a JSONL file of prompts")
    gen.add_argument("prompt", nargs="?")
    gen.add_argument("--model", metavar="MODEL",
                     help="a GGUF file, a Hugging Face folder or a checkpoint (default: the default model)")
    gen.add_argument("--dtype", default="auto", choices=DTYPES,
                     help="what a GGUF file or HF folder is converted to (auto: bfloat16 stays bfloat16)")
    gen.add_argument("--quantization", "-q", choices=QUANTIZATIONS, metavar="FORMAT",
                     help="the linear layers' weights in this format (a GGUF file or HF folder is converted so once)")
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    gen.add_argument("--input", metavar="JSONL", help='one {"prompt": ...} or {"messages": [...]} per line')
    gen.add_argument("--output", metavar="JSONL", help="results of --input, one line per prompt")
    gen.add_argument("--config", default=str(DEFAULT_SERVING_CONFIG),
                     help="serving config whose 'engine' section sizes the engine")
    gen.add_argument("--mesh", metavar="MESH_YAML",
                     help="mesh file (configs/meshes/): devices and how the model splits (default: one device)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--max-seq-len", type=int, default=None, help="context length (default: config)")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.add_argument("--server", metavar="HOST:PORT", help="stream from a running meshserve server")
    gen.add_argument("--token", default=os.environ.get("MESHSERVE_TOKEN"),
                     help="bearer token for --server (default: $MESHSERVE_TOKEN)")
    gen.add_argument("--tls-ca", metavar="PEM", help="CA certificate for a TLS --server")

    srv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP and gRPC servers")
    srv.add_argument("model", nargs="?", metavar="MODEL",
                     help="a GGUF file, a Hugging Face folder (converted once into the cache) or a meshserve "
                          "checkpoint (default: the default model)")
    srv.add_argument("--config", default=str(DEFAULT_SERVING_CONFIG),
                     help="serving config: 'server' and 'engine' sections (flags win)")
    srv.add_argument("--host")
    srv.add_argument("--port", dest="http_port", type=int,
                     help="the OpenAI-compatible HTTP API's port (default 8000)")
    srv.add_argument("--http-port", dest="http_port", type=int, help=argparse.SUPPRESS)
    srv.add_argument("--grpc-port", dest="port", type=int,
                     help="the gRPC API's port (default 50051); 0: no gRPC (the OpenAI HTTP API alone)")
    srv.add_argument("--model", dest="model_flag", metavar="MODEL", help=argparse.SUPPRESS)
    srv.add_argument("--mesh", metavar="MESH_YAML")
    srv.add_argument("--metrics-port", type=int)
    srv.add_argument("--served-model-name", help="the model's name on the APIs (default: the checkpoint's)")
    srv.add_argument("--api-key", action="append", help="a bearer token clients must send (repeatable)")
    srv.add_argument("--generation-config", choices=("auto", "none"),
                     help="sampling defaults of requests: the model's (auto, the default) or the API's own (none)")
    srv.add_argument("--override-generation-config", metavar="JSON",
                     help='sampling defaults laid over those, e.g. \'{"temperature": 0.7}\'')
    srv.add_argument("--tls-cert", metavar="PEM")
    srv.add_argument("--tls-key", metavar="PEM")
    _engine_flags(srv)
    srv.add_argument("--quiet", action="store_true", help="no progress lines")

    wrk = sub.add_parser("worker", help="serve as an NVIDIA Dynamo backend worker (behind dynamo.frontend)")
    wrk.add_argument("--config", default=str(DEFAULT_SERVING_CONFIG), help="serving config: its 'engine' section")
    wrk.add_argument("--model", metavar="MODEL",
                     help="a GGUF file, a Hugging Face folder or a checkpoint (default: the default model)")
    wrk.add_argument("--mesh", metavar="MESH_YAML")
    wrk.add_argument("--model-name", "--served-model-name", dest="model_name",
                     help="the name the frontend serves it under (default: the checkpoint's)")
    wrk.add_argument("--namespace", default="dynamo", help="Dynamo namespace (default: dynamo)")
    wrk.add_argument("--component", default="backend", help="Dynamo component (default: backend)")
    wrk.add_argument("--metrics-port", type=int, help="meshserve's Prometheus metrics (default: off)")
    wrk.add_argument("--role", default="both", choices=("both", "prefill", "decode"),
                     help="disaggregated serving: compute prompts (prefill) or continue them (decode); "
                          "both: aggregated (default)")
    wrk.add_argument("--transfer-host", default="127.0.0.1",
                     help="address this worker's KV page transfers are served on (prefill and decode roles)")
    wrk.add_argument("--kv-pull-timeout-s", type=float, default=30.0,
                     help="decode role: how long to wait for a prompt's pages before computing it here")
    wrk.add_argument("--kv-offer-timeout-s", type=float, default=120.0,
                     help="prefill role: how long a prompt's pages wait to be pulled before they are let go")
    wrk.add_argument("--kv-transport", default="auto", choices=("auto", "transfer", "store"),
                     help="how KV pages move between prefill and decode workers: jax.experimental.transfer, "
                          "a kvstore both open, or auto (transfer, else the store when one is set)")
    wrk.add_argument("--kv-transfer-store", metavar="FOLDER|URL",
                     help="the kvstore of the store transport (default: the engine config's kv_store)")
    _engine_flags(wrk)
    wrk.add_argument("--quiet", action="store_true", help="no progress lines")

    flt = sub.add_parser("fleet", help="Dynamo's frontend and N workers on this machine (loopback)")
    flt.add_argument("--workers", type=int, default=2, help="workers (decode workers with --prefill-workers)")
    flt.add_argument("--prefill-workers", type=int, default=0,
                     help="disaggregated serving: this many prefill workers beside the decode workers")
    flt.add_argument("--conditional-disagg", nargs="?", const="{}", metavar="JSON",
                     help="Dynamo's conditional disaggregation: mostly cached prompts are prefilled on the decode "
                          "worker; JSON: the frontend's policy settings, e.g. "
                          "'{\"policy\": \"isl_bounding\", \"eff_isl_threshold\": 512}'")
    flt.add_argument("--router", default="kv", choices=("kv", "round-robin", "random"))
    flt.add_argument("--port", type=int, default=8000, help="the frontend's HTTP port")
    flt.add_argument("--config", default=str(DEFAULT_SERVING_CONFIG))
    flt.add_argument("--model", metavar="MODEL", help="a GGUF file, a Hugging Face folder or a checkpoint")
    flt.add_argument("--model-name", "--served-model-name", dest="model_name")
    flt.add_argument("--dtype", default="auto", choices=DTYPES)
    flt.add_argument("--quantization", "-q", choices=QUANTIZATIONS, metavar="FORMAT")

    fetch = sub.add_parser("fetch-default", help="fetch and convert the default model; print its folder")
    fetch.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return p


def _engine_flags(p: argparse.ArgumentParser) -> None:
    """vLLM's engine flags, with its names and meanings; they win over the config file's engine section."""
    g = p.add_argument_group("engine (vLLM's flags; they win over the config file)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="what a GGUF file or HF folder is converted to; auto: the source's (bfloat16 stays "
                        "bfloat16, float16 and quantized blocks become bfloat16, float32 stays float32)")
    g.add_argument("--quantization", "-q", choices=QUANTIZATIONS, metavar="FORMAT",
                   help="serve the linear layers' weights in this format (" + ", ".join(QUANTIZATIONS)
                        + "): a GGUF file or HF folder is converted so once; a checkpoint must hold it")
    g.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="what the KV cache holds: auto (the model's dtype), float32, bfloat16, or int8 / fp8 "
                        "with a dynamic scale per token and kv head (~4x the tokens of float32)")
    g.add_argument("--speculative-config", metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 5}\' (fields: '
                        'method, num_speculative_tokens, prompt_lookup_max, prompt_lookup_min, disable_by_batch_size)')
    g.add_argument("--max-model-len", type=int, help="the longest request, prompt and output (tokens)")
    g.add_argument("--max-num-seqs", type=int, help="requests decoded at once")
    g.add_argument("--gpu-memory-utilization", type=float,
                   help="the share of each GPU's memory the engine may take; the KV cache gets what the weights "
                        "and activations leave (default 0.9)")
    g.add_argument("--kv-cache-memory", type=_bytes, metavar="BYTES",
                   help="the KV cache's size instead, e.g. 4GiB (over the whole mesh)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, help="without --mesh: split the model over N devices")
    g.add_argument("--data-parallel-size", "-dp", type=int, help="without --mesh: N replicas of the model")
    g.add_argument("--enable-expert-parallel", action="store_true", default=None,
                   help="without --mesh: split a mixture's experts over the tensor-parallel devices (each holds "
                        "1/N of the experts, whole) instead of splitting every expert's width")


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _bytes(text: str) -> int:
    """"4GiB", "512MiB", "2g", "1073741824" → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4GiB, 512MiB, 1073741824)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    return value


def _engine_config(args):
    """The config file's engine section with the command line's engine flags laid over it; sets how
    much of a GPU jax may take before jax starts."""
    from meshserve.runtime.engine import EngineConfig

    config = EngineConfig.from_yaml(args.config)
    flags = {"max_seq_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
             "gpu_memory_utilization": args.gpu_memory_utilization, "kv_cache_bytes": args.kv_cache_memory,
             "kv_cache_dtype": args.kv_cache_dtype}
    flags = {k: v for k, v in flags.items() if v is not None}
    if getattr(args, "speculative_config", None) is not None:
        import json

        from meshserve.models.config import config_from_dict
        from meshserve.runtime.speculative import SpeculativeConfig

        try:
            spec = json.loads(args.speculative_config)
        except ValueError as e:
            raise MeshserveError(f"--speculative-config: not JSON: {e}") from None
        flags["speculative"] = config_from_dict(SpeculativeConfig, spec, "--speculative-config")
    if "max_num_seqs" in flags and flags["max_num_seqs"] > config.max_num_batched_tokens:
        flags["max_num_batched_tokens"] = flags["max_num_seqs"]  # a decode step of them all must fit a step
    if flags:
        config = dataclasses.replace(config, **flags)
    # jax's GPU allocator takes this share of the card at start (its own default is 0.75)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{config.gpu_memory_utilization:.3f}")
    return config


def _model(args, spec: str | None) -> str:
    """The checkpoint folder to serve: the default model, a checkpoint, or a GGUF file / HF folder
    converted once into the cache."""
    from meshserve.models.sources import resolve_model

    return str(resolve_model(spec, args.dtype, progress=not args.quiet,
                             quantization=getattr(args, "quantization", None)))


def _serving(args, config, spec: str | None):
    """The server config with `spec` resolved to the checkpoint it serves, named after the source
    unless a name is set."""
    return dataclasses.replace(config, model=_model(args, spec),
                               served_model_name=config.served_model_name or source_name(spec))


def _convert(args) -> None:
    from meshserve.models.convert import convert

    out = convert(args.source, args.out, dtype=args.dtype, quantize=args.quantize)
    print(f"wrote {out}", file=sys.stderr)


def _sampling(args):
    from meshserve.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop))
    params.validate(vocab_size=2**31 - 1)  # the rest is checked against the model once loaded
    return params


def _layout(args):
    """The mesh file's layout (validated, then devices set up) or None for one device."""
    if not args.mesh:
        return None
    from meshserve.sharding.mesh import MeshConfig

    return MeshConfig.from_yaml(args.mesh).setup()


def _load(args, layout):
    from meshserve.models.checkpoint import load_checkpoint, read_meta
    from meshserve.runtime import progress

    folder = _model(args, args.model)
    progress.stage(f"loading {folder}")
    if layout is None:
        return load_checkpoint(folder, progress=not args.quiet)
    from meshserve.sharding.mesh import load_sharded

    layout.for_model(read_meta(folder)[1])  # a model the mesh cannot split fails here, before loading
    return load_sharded(folder, layout, progress=not args.quiet)


def _generate(args) -> None:
    from meshserve.runtime import progress
    from meshserve.runtime.engine import EngineConfig

    if (args.input is None) == (args.prompt is None):
        raise RequestError("give either a prompt or --input FILE")
    if args.server:
        return _generate_remote(args)
    if args.input is not None and args.output is None:
        raise RequestError("--input needs --output")
    params = _sampling(args)
    progress.enable(not args.quiet and args.input is None)  # a batch run has its own progress bar
    config = EngineConfig.from_yaml(args.config)
    if args.max_seq_len:
        config = dataclasses.replace(config, max_seq_len=args.max_seq_len)
    lines = _read_jsonl(Path(args.input)) if args.input else None
    layout = _layout(args)
    ckpt = _load(args, layout)
    if lines is None:
        _stream_one(ckpt, config, args, params, layout)
    else:
        _run_batch(ckpt, config, args, params, lines, layout)


def _encode(tok, prompt, chat: bool) -> list[int]:
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return tok.encode_chat(prompt)
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    return tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)


def _stream_one(ckpt, config, args, params, layout) -> None:
    """One prompt: an engine sized to it (few programs to compile), text streamed as it comes."""
    import jax

    from meshserve.runtime.engine import Engine

    ids = _encode(ckpt.tokenizer, args.prompt, args.chat)
    if not ids:
        raise RequestError("prompt is empty")
    need = len(ids) + params.max_tokens
    seq_len = max(64, 1 << (need - 1).bit_length())
    chunk = min(256, config.max_prefill_chunk, max(16, 1 << (len(ids) - 1).bit_length()))
    pages = -(-min(seq_len, config.max_seq_len) // config.page_size)
    sized = dataclasses.replace(
        config, max_seq_len=min(seq_len, config.max_seq_len), max_num_seqs=1, max_prefill_chunk=chunk,
        max_num_batched_tokens=max(chunk, config.max_num_seqs), prefill_buckets=(chunk,),
        decode_buckets=(layout.replicas if layout else 1,), context_buckets=(pages,))
    engine = Engine(ckpt, sized, layout=layout)
    engine.add_request(ids, params)
    lead = jax.process_index() == 0  # several hosts run the same engine; one of them prints
    while engine.has_unfinished:
        for out in engine.step():
            if lead:
                sys.stdout.write(out.text)
                sys.stdout.flush()
    if lead:
        sys.stdout.write("\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise RequestError(f"--input {path} does not exist")
    lines = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            raise RequestError(f"{path.name} line {n}: not valid JSON") from None
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise RequestError(f'{path.name} line {n}: need exactly one of "prompt" or "messages"')
        unknown = set(item) - {"prompt", "messages", "id", *LINE_SAMPLING_FIELDS}
        if unknown:
            raise RequestError(f"{path.name} line {n}: unknown field(s) {', '.join(sorted(unknown))}")
        item["_line"] = n
        lines.append(item)
    if not lines:
        raise RequestError(f"{path.name} holds no prompts")
    return lines


def _run_batch(ckpt, config, args, params, lines, layout) -> None:
    import time

    import jax
    from tqdm.auto import tqdm

    from meshserve.runtime.engine import Engine
    from meshserve.runtime.request import check_request

    # Every line is checked before the slow part (compiling), so a bad line fails at once.
    max_seq_len = min(config.max_seq_len, ckpt.config.max_position_embeddings)
    prompts, plist = [], []
    for item in lines:
        overrides = {k: (tuple(v) if isinstance(v, list) else v)
                     for k, v in item.items() if k in LINE_SAMPLING_FIELDS}
        try:
            p = dataclasses.replace(params, **overrides)
            ids = _encode(ckpt.tokenizer, item.get("messages") or item["prompt"], args.chat)
            check_request(ids, p, 0, vocab_size=ckpt.config.vocab_size, max_seq_len=max_seq_len,
                          priority_levels=config.priority_levels, limits=config.limits)
        except (RequestError, TypeError) as e:
            raise RequestError(f"{Path(args.input).name} line {item['_line']}: {e}") from None
        prompts.append(ids)
        plist.append(p)
    engine = Engine(ckpt, config, layout=layout)
    lead = jax.process_index() == 0  # several hosts run the same engine; one of them writes
    bar = tqdm(total=len(prompts), unit="req", desc="generating",
               disable=None if not args.quiet and lead else True)
    start, produced = time.perf_counter(), [0]

    def progress(out):
        produced[0] += len(out.token_ids)
        if out.finished:
            bar.update(1)
        bar.set_postfix_str(f"{produced[0] / (time.perf_counter() - start):.1f} tok/s", refresh=False)

    results = engine.generate(prompts, plist, on_output=progress)
    bar.close()
    if not lead:
        return
    out_path = Path(args.output)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    with tmp.open("w") as f:  # written whole, then renamed: never a partial results file
        for item, res in zip(lines, results):
            f.write(json.dumps({"id": item.get("id", item["_line"]), "text": res.text,
                                "token_ids": list(res.token_ids), "finish_reason": res.finish_reason,
                                "prompt_tokens": len(res.prompt_token_ids),
                                "completion_tokens": len(res.token_ids)}) + "\n")
    os.replace(tmp, out_path)
    elapsed = time.perf_counter() - start
    print(f"{len(results)} prompts, {produced[0]} tokens in {elapsed:.1f} s "
          f"({produced[0] / elapsed:.1f} tok/s) → {out_path}", file=sys.stderr)


def _generate_remote(args) -> None:
    """Stream one prompt from a running server; a failed call is one line with its status."""
    import grpc

    from meshserve.serving.client import Client

    if args.input is not None:
        raise RequestError("--input runs locally; with --server give one prompt")
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    min_p=args.min_p, seed=args.seed, stop=args.stop)
    prompt = dict(messages=[{"role": "user", "content": args.prompt}]) if args.chat else dict(text=args.prompt)
    try:
        with Client(args.server, token=args.token, tls_ca=args.tls_ca) as client:
            for resp in client.generate(**prompt, **sampling):
                sys.stdout.write(resp.text)
                sys.stdout.flush()
    except grpc.RpcError as e:
        raise ServerError(f"{args.server}: {e.code().name}: {e.details()}") from None
    sys.stdout.write("\n")


class ServerError(MeshserveError):
    """A call to a server failed (its status and message)."""


def _serve(args) -> None:
    import logging

    from meshserve.runtime import progress
    from meshserve.serving.config import ServerConfig
    from meshserve.serving.server import Server, build_engine

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    progress.enable(not args.quiet)
    if args.model and args.model_flag and args.model != args.model_flag:
        raise MeshserveError(f"two models given: {args.model} and --model {args.model_flag}")
    overrides = None
    if args.override_generation_config is not None:
        try:
            overrides = json.loads(args.override_generation_config)
        except json.JSONDecodeError as e:
            raise MeshserveError(f"--override-generation-config: not JSON: {e}") from None
    config = ServerConfig.from_yaml(args.config)
    config = config.override(
        host=args.host, port=args.port, mesh=args.mesh, metrics_port=args.metrics_port, http_port=args.http_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key, served_model_name=args.served_model_name,
        auth_tokens=(*config.auth_tokens, *args.api_key) if args.api_key else None,
        generation_config=args.generation_config, override_generation_config=overrides,
        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel)
    if args.port == 0:  # on the command line 0 turns gRPC off (in the file: null; 0 there takes any free port)
        config = dataclasses.replace(config, port=None)
    if config.port is None and config.http_port is None:
        raise MeshserveError("no gRPC port and no HTTP port: nothing would serve requests")
    engine_config = _engine_config(args)
    mesh = config.mesh_config()  # checked now: a bad mesh fails before the model is converted or loaded
    config = _serving(args, config, args.model or args.model_flag or config.model)
    replicas = dict(mesh.axes).get("data", 1) if mesh is not None else 1  # -1: known once the devices are
    if engine_config.kv_cache_bytes is not None and replicas > 0:  # a pool too small fails before listening
        from meshserve.models.checkpoint import read_meta
        from meshserve.runtime.kv_cache import page_bytes
        from meshserve.runtime.kv_manager import kv_pages
        from meshserve.runtime.kv_quant import cache_dtype

        _, model, dtype = read_meta(config.model)
        ps = engine_config.page_size
        per_page = page_bytes(model, ps, cache_dtype(engine_config.kv_cache_dtype, dtype))
        kv_pages(per_page, ps, min(engine_config.max_seq_len, model.max_position_embeddings), replicas,
                 engine_config.kv_cache_bytes)
    build = build_engine(config, engine_config, progress=False)
    mirror = _multihost(config, build)  # a mesh over several processes: process 0 serves, the others follow
    if mirror is False:
        return
    run_server(Server(config, build, mirror=mirror))


def _worker(args) -> None:
    import logging

    from meshserve.runtime import progress
    from meshserve.serving.config import ServerConfig
    from meshserve.serving.handoff import HandoffConfig
    from meshserve.serving.server import build_engine
    from meshserve.serving.worker import Worker, run_worker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    progress.enable(not args.quiet)
    config = ServerConfig.from_yaml(args.config).override(
        mesh=args.mesh, tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel)
    engine_config = _engine_config(args)
    config.mesh_config()  # a bad mesh fails before the model is converted or loaded
    config = _serving(args, config, args.model or config.model)
    if args.role != "both":  # the page export and import programs
        engine_config = dataclasses.replace(engine_config, kv_transfer=True)
    build = build_engine(config, engine_config, progress=False)
    mirror = _multihost(config, build)
    if mirror is False:
        return  # a following process: its part is done
    handoff = HandoffConfig(args.kv_transport, args.transfer_host, args.kv_transfer_store, args.kv_pull_timeout_s,
                            args.kv_offer_timeout_s)
    worker = Worker(config, build, model_name=args.model_name, namespace=args.namespace,
                    component=args.component, metrics_port=args.metrics_port, mirror=mirror, role=args.role,
                    handoff=handoff)
    _exit_if_failed(run_worker(worker), "worker")


def _multihost(config, build):
    """For a mesh over several processes (a `distributed` mesh file): jax.distributed is started;
    process 0 gets the StepMirror its engine loop publishes to, and the others follow it here
    (then False). None for one process."""
    mesh = config.mesh_config()
    if mesh is None or mesh.distributed is None:
        return None
    import jax

    from meshserve.serving.mirror import StepMirror, follow

    mesh.setup()
    mirror = StepMirror()
    if jax.process_index() == 0:
        return mirror
    follow(build(), mirror)
    return False


def _fleet(args) -> None:
    from meshserve.serving.fleet import run_fleet

    if args.workers < 1:
        raise MeshserveError(f"--workers must be at least 1, got {args.workers}")
    if args.prefill_workers < 0:
        raise MeshserveError(f"--prefill-workers must be >= 0, got {args.prefill_workers}")
    frontend_args = []
    if args.conditional_disagg is not None:
        if not args.prefill_workers or args.router != "kv":
            raise MeshserveError("--conditional-disagg needs --prefill-workers and --router kv")
        try:
            policy = json.loads(args.conditional_disagg)
        except json.JSONDecodeError as e:
            raise MeshserveError(f"--conditional-disagg: not JSON: {e}") from None
        frontend_args = ["--router-conditional-disagg"]
        if policy:
            frontend_args += ["--router-conditional-disagg-config", json.dumps(policy)]
    from meshserve.models.sources import resolve_model

    # converted once here, not by every worker at once
    model = resolve_model(args.model, args.dtype, quantization=args.quantization)
    worker_args = ["--config", args.config, "--model", str(model)]
    name = args.model_name or source_name(args.model)
    if name:
        worker_args += ["--model-name", name]
    run_fleet(args.workers, args.router, args.port, worker_args, args.prefill_workers, frontend_args)


def run_server(server) -> None:
    """Serve until SIGTERM (then return) or an engine failure (then exit the process non-zero)."""
    import asyncio

    from meshserve.serving.server import serve_forever

    _exit_if_failed(asyncio.run(serve_forever(server)), "server")


def _exit_if_failed(code: int, what: str) -> None:
    """The engine failed (its cause is in the log above): exit for a supervisor to restart the
    process, without waiting on an engine thread that may be stuck on the device."""
    if code:
        import logging

        print(f"meshserve: error: the engine failed; exiting so that a supervisor restarts the {what}",
              file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(code)


def _fetch_default(args) -> None:
    from meshserve.models.default import default_checkpoint

    print(default_checkpoint(dtype=args.dtype))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"convert": _convert, "generate": _generate, "serve": _serve, "worker": _worker, "fleet": _fleet,
               "fetch-default": _fetch_default}[args.command]
    try:
        handler(args)
    except MeshserveError as e:
        print(f"meshserve: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

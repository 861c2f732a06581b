"""The `meshserve` command line.

    meshserve convert --from gguf:FILE | hf:DIR --out CKPT_DIR [--dtype bfloat16|float32]
    meshserve generate [--model CKPT_DIR] [--mesh MESH.yaml] [--chat] [sampling flags] "prompt"
    meshserve generate --input prompts.jsonl --output results.jsonl [--chat] [sampling flags]
    meshserve generate --server HOST:PORT [--chat] [sampling flags] "prompt"   stream from a server
    meshserve serve [--config FILE] [--host H] [--port P] [--model CKPT_DIR] [--mesh MESH.yaml] ...
    meshserve fetch-default [--dtype ...]     fetch and convert the default model, print its folder
    meshserve --version                       meshserve's version and the libraries' it runs on

Errors the user can fix are printed as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from meshserve.models.errors import MeshserveError, RequestError
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
    conv.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))

    gen = sub.add_parser("generate", help="stream a completion, or run a JSONL file of prompts")
    gen.add_argument("prompt", nargs="?")
    gen.add_argument("--model", metavar="CKPT_DIR",
                     help="checkpoint folder (default: the default model, fetched on first use)")
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

    srv = sub.add_parser("serve", help="run the gRPC and OpenAI-compatible HTTP servers")
    srv.add_argument("--config", default=str(DEFAULT_SERVING_CONFIG),
                     help="serving config: 'server' and 'engine' sections")
    srv.add_argument("--host")
    srv.add_argument("--grpc-port", "--port", dest="port", type=int,
                     help="the gRPC API's port; 0: no gRPC (the OpenAI HTTP API alone)")
    srv.add_argument("--model", metavar="CKPT_DIR", help="checkpoint folder (default: the default model)")
    srv.add_argument("--mesh", metavar="MESH_YAML")
    srv.add_argument("--metrics-port", type=int)
    srv.add_argument("--http-port", type=int, help="the OpenAI-compatible HTTP API's port")
    srv.add_argument("--tls-cert", metavar="PEM")
    srv.add_argument("--tls-key", metavar="PEM")
    srv.add_argument("--quiet", action="store_true", help="no progress bars")

    wrk = sub.add_parser("worker", help="serve as an NVIDIA Dynamo backend worker (behind dynamo.frontend)")
    wrk.add_argument("--config", default=str(DEFAULT_SERVING_CONFIG), help="serving config: its 'engine' section")
    wrk.add_argument("--model", metavar="CKPT_DIR", help="checkpoint folder (default: the default model)")
    wrk.add_argument("--mesh", metavar="MESH_YAML")
    wrk.add_argument("--model-name", help="the name the frontend serves it under (default: the checkpoint's)")
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
    wrk.add_argument("--quiet", action="store_true", help="no progress bars")

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
    flt.add_argument("--model", metavar="CKPT_DIR")
    flt.add_argument("--model-name")

    fetch = sub.add_parser("fetch-default", help="fetch and convert the default model; print its folder")
    fetch.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return p


def _convert(args) -> None:
    from meshserve.models.convert import convert

    out = convert(args.source, args.out, dtype=args.dtype)
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
    from meshserve.models.default import default_checkpoint

    folder = args.model or default_checkpoint(progress=not args.quiet)
    if layout is None:
        return load_checkpoint(folder, progress=not args.quiet)
    from meshserve.sharding.mesh import load_sharded

    layout.for_model(read_meta(folder)[1])  # a model the mesh cannot split fails here, before loading
    return load_sharded(folder, layout, progress=not args.quiet)


def _generate(args) -> None:
    from meshserve.runtime.engine import EngineConfig

    if (args.input is None) == (args.prompt is None):
        raise RequestError("give either a prompt or --input FILE")
    if args.server:
        return _generate_remote(args)
    if args.input is not None and args.output is None:
        raise RequestError("--input needs --output")
    params = _sampling(args)
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

    from meshserve.runtime.engine import EngineConfig
    from meshserve.serving.config import ServerConfig
    from meshserve.serving.server import Server, build_engine

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    config = ServerConfig.from_yaml(args.config).override(
        host=args.host, port=args.port, model=args.model, mesh=args.mesh, metrics_port=args.metrics_port,
        http_port=args.http_port, tls_cert=args.tls_cert, tls_key=args.tls_key)
    if args.port == 0:  # on the command line 0 turns gRPC off (in the file: null; 0 there takes any free port)
        config = dataclasses.replace(config, port=None)
    if config.port is None and config.http_port is None:
        raise MeshserveError("no gRPC port and no HTTP port: nothing would serve requests")
    engine_config = EngineConfig.from_yaml(args.config)
    replicas = 1
    if config.mesh:  # checked now: a bad mesh file fails before the server starts
        from meshserve.sharding.mesh import MeshConfig

        mesh = MeshConfig.from_yaml(config.mesh)
        replicas = dict(mesh.axes).get("data", 1)  # -1: known once the devices are
    if engine_config.kv_cache_bytes is not None and replicas > 0:  # a pool too small fails before listening
        from meshserve.models.checkpoint import read_meta
        from meshserve.models.default import default_checkpoint
        from meshserve.runtime.kv_cache import page_bytes
        from meshserve.runtime.kv_manager import kv_pages

        _, model, dtype = read_meta(config.model or default_checkpoint(progress=not args.quiet))
        ps = engine_config.page_size
        kv_pages(page_bytes(model, ps, dtype), ps, min(engine_config.max_seq_len, model.max_position_embeddings),
                 replicas, engine_config.kv_cache_bytes)
    build = build_engine(config, engine_config, progress=not args.quiet)
    mirror = _multihost(config, build)  # a mesh over several processes: process 0 serves, the others follow
    if mirror is False:
        return
    run_server(Server(config, build, mirror=mirror))


def _worker(args) -> None:
    import logging

    from meshserve.runtime.engine import EngineConfig
    from meshserve.serving.config import ServerConfig
    from meshserve.serving.handoff import HandoffConfig
    from meshserve.serving.server import build_engine
    from meshserve.serving.worker import Worker, run_worker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    config = ServerConfig.from_yaml(args.config).override(model=args.model, mesh=args.mesh)
    engine_config = EngineConfig.from_yaml(args.config)
    if args.role != "both":  # the page export and import programs
        engine_config = dataclasses.replace(engine_config, kv_transfer=True)
    build = build_engine(config, engine_config, progress=not args.quiet)
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
    if not config.mesh:
        return None
    from meshserve.sharding.mesh import MeshConfig

    mesh = MeshConfig.from_yaml(config.mesh)
    if mesh.distributed is None:
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
    worker_args = ["--config", args.config]
    for flag, value in (("--model", args.model), ("--model-name", args.model_name)):
        if value:
            worker_args += [flag, value]
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

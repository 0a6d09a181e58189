"""CLI commands ``generate`` and ``serve``: decode with a large base steered by small expert pairs, or serve the
skills of a library over one base (``serve --library``, ``route/serve.py``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from skillgraft.cli.main import app, console
from skillgraft.cli.render import print_json, progress_bar
from skillgraft.cli.skill_cmd import LIBRARY_OPT
from skillgraft.errors import InputError, NotFoundError

if TYPE_CHECKING:  # heavy imports stay inside the commands, so --help is instant
    from skillgraft.route.serve import ServeSpec
    from skillgraft.transfer.load import TransferSpec


def read_prompts(path: Path) -> list[str]:
    from skillgraft.route.routed import read_prompt_file

    return read_prompt_file(path)


@app.command()
def generate(
    base: str = typer.Option(..., "--base", help="The (large) base model directory."),
    expert: list[str] = typer.Option(
        [], "--expert", help="SMALL_TUNED:SMALL_BASE[:ALPHA] (repeatable); without it, --library + --route."
    ),
    prompts: Path = typer.Option(..., "--prompts", help="JSONL with a 'prompt' per line."),
    method: str = typer.Option("proxy", help="proxy | eft | dlf"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(16, "--batch-size"),
    dlf_grid: int = typer.Option(11, "--dlf-grid", help="Candidate α values in [0, 2] per step (dlf)."),
    speculate: int = typer.Option(
        0, "--speculate", help="Greedy only: the small models draft K tokens per round, one large forward checks them."
    ),
    gate: bool = typer.Option(False, "--gate", help="Weight several experts per prompt by prompt-likelihood gain."),
    parallel: bool = typer.Option(
        False, "--parallel", help="Run the small models in a second process, side by side with the large one."
    ),
    chat: bool = typer.Option(
        False, "--chat", help="Each model formats every prompt with its own tokenizer's chat template."
    ),
    library: Path = LIBRARY_OPT,
    route: str = typer.Option(
        None,
        "--route",
        help="Per prompt, one --library skill (arrow | centroid | classifier | arrow-token), or with --expert one "
        "expert (arrow | centroid | classifier).",
    ),
    examples: list[str] = typer.Option(
        [], "--examples", help="NAME=PROMPTS.jsonl: labelled prompts of a skill or expert for centroid/classifier."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Generate with a large base steered by small (expert, base) pairs — proxy tuning, EFT or DLF — or with
    the base's library skills routed per prompt (--library + --route, no --expert).

    Example: skillgraft generate --base ./large --expert ./small-math:./small --method dlf --prompts q.jsonl
    --parallel

    Routed: skillgraft generate --base ./base --library ./lib --route arrow --prompts q.jsonl --json
    """
    from skillgraft.route.routed import read_examples
    from skillgraft.transfer.fused import GenerationSpec
    from skillgraft.transfer.load import ExpertSpec, TransferSpec, load_fused

    if speculate and temperature != 0:
        raise InputError("--speculate is greedy only", hint="drop --speculate or use --temperature 0")
    labelled = read_examples(examples)
    if not expert:
        if route is None:
            raise InputError(
                "generate needs --expert (logit transfer) or --library with --route (routed skills)",
                hint="e.g. --library ./lib --route arrow",
            )
        _generate_routed(
            base, library, route, labelled, read_prompts(prompts), max_new_tokens, stop, batch_size, as_json
        )
        return
    spec = TransferSpec(
        base,
        tuple(ExpertSpec.parse(e) for e in expert),
        method,
        dlf_grid,
        library,
        speculate,
        gate,
        parallel,
        chat,
        route,
        tuple((k, tuple(v)) for k, v in labelled.items()),
    )
    gen = GenerationSpec(max_new_tokens, temperature, top_p, top_k, tuple(stop), seed)
    texts = read_prompts(prompts)
    fused = load_fused(spec)
    outputs: list[str] = []
    rounds = accepted = 0  # summed over batches (speculative decoding only)
    start = time.perf_counter()
    with fused, progress_bar() as progress:
        for i in range(0, len(texts), batch_size):
            progress("generate", i, len(texts))
            outputs += fused.generate(texts[i : i + batch_size], gen)
            rounds, accepted = rounds + fused.draft_stats[0], accepted + fused.draft_stats[1]
        progress("generate", len(texts), len(texts))
    seconds = time.perf_counter() - start
    if as_json:
        print_json(
            {
                "method": method,
                "seconds": seconds,
                **({"draft_rounds": rounds, "drafts_accepted": accepted} if speculate else {}),
                "results": [{"prompt": p, "output": o} for p, o in zip(texts, outputs)],
            }
        )
        return
    table = Table(title=f"{method}: {len(texts)} prompts in {seconds:.1f} s")
    table.add_column("prompt")
    table.add_column("output")
    for p, o in zip(texts, outputs):
        table.add_row(p, o)
    console.print(table)


def _generate_routed(
    base: str,
    library: Path | None,
    route: str,
    examples: dict[str, list[str]],
    texts: list[str],
    max_new_tokens: int,
    stop: list[str],
    batch_size: int,
    as_json: bool,
) -> None:
    """Greedy decoding with each prompt's routed skill (``route.routed``)."""
    from skillgraft.route.routed import open_routed

    if library is None:
        raise InputError("--route without --expert routes among a library's skills", hint="pass --library DIR")
    model = open_routed(base, library, route, examples=examples or None)
    start = time.perf_counter()
    outputs: list[str] = []
    with progress_bar() as progress:
        for i in range(0, len(texts), batch_size):
            progress("generate", i, len(texts))
            outputs += model.harness_generate(texts[i : i + batch_size], max_new_tokens, tuple(stop), batch_size)
        progress("generate", len(texts), len(texts))
    seconds = time.perf_counter() - start
    skills = [model.choice(p) for p in texts]
    if as_json:
        print_json(
            {
                "route": route,
                "seconds": seconds,
                "results": [{"prompt": p, "skill": k, "output": o} for p, k, o in zip(texts, skills, outputs)],
            }
        )
        return
    table = Table(title=f"routed ({route}): {len(texts)} prompts in {seconds:.1f} s")
    for col in ("prompt", "skill", "output"):
        table.add_column(col)
    for row in zip(texts, skills, outputs):
        table.add_row(*row)
    console.print(table)


@app.command()
def serve(
    base: str = typer.Option(..., "--base", help="The base model directory."),
    expert: list[str] = typer.Option(
        [], "--expert", help="SMALL_TUNED:SMALL_BASE[:ALPHA] (repeatable): serve logit transfer instead of skills."
    ),
    method: str = typer.Option("proxy", help="With --expert: proxy | eft | dlf"),
    dlf_grid: int = typer.Option(11, "--dlf-grid", help="Candidate α values in [0, 2] per step (dlf)."),
    speculate: int = typer.Option(0, "--speculate", help="Draft tokens per round for greedy requests (0: off)."),
    gate: bool = typer.Option(False, "--gate", help="Weight several experts per prompt by prompt-likelihood gain."),
    parallel: bool = typer.Option(
        False, "--parallel", help="Run the small models in a second process, side by side with the large one."
    ),
    chat: bool = typer.Option(
        False, "--chat", help="Each model formats every prompt with its own tokenizer's chat template."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port)."),
    library: Path = LIBRARY_OPT,
    max_batch: int = typer.Option(16, "--max-batch", help="Skill server: most prompts decoded in one batch."),
    batch_wait_ms: float = typer.Option(
        10.0, "--batch-wait-ms", help="Skill server: how long a batch waits for more requests to join it."
    ),
    queue: int = typer.Option(256, "--queue", help="Skill server: requests waiting beyond this get HTTP 503."),
    route: str = typer.Option(
        "arrow", "--route", help="Skill server: the router of model 'auto' (arrow | centroid | classifier)."
    ),
) -> None:
    """Serve an OpenAI-compatible API: the skills of a --library over one base, or logit transfer (--expert).

    Example: skillgraft serve --base ./base --library ./lib --port 8000, then
    curl -s localhost:8000/v1/completions -d '{"model": "cipher", "prompt": "...", "max_tokens": 8}'
    (model: base | auto | arrow-token | NAME[@VERSION] | NAME:WEIGHT+NAME:WEIGHT; see docs/serving.md).

    Logit transfer: skillgraft serve --base ./large --expert ./small-math:./small --port 8000
    """
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be 0 to 65535, not {port}")
    if expert:
        from skillgraft.transfer.load import ExpertSpec, TransferSpec

        tspec = TransferSpec(
            base, tuple(ExpertSpec.parse(e) for e in expert), method, dlf_grid, library, speculate, gate, parallel, chat
        )
        _serve_transfer(tspec, host, port)
        return
    if library is None:
        raise InputError(
            "serve needs --library (serve its skills) or --expert (logit transfer)",
            hint="pass --library DIR, or set $SKILLGRAFT_LIBRARY",
        )
    from skillgraft.route.serve import ServeSpec

    spec = ServeSpec(max_batch=max_batch, batch_wait_ms=batch_wait_ms, queue=queue, route=route)
    _serve_library(Path(base), library, spec, host, port)


def _serve_library(base: Path, library: Path, spec: ServeSpec, host: str, port: int) -> None:
    from skillgraft.route.serve import SkillServer, make_uvicorn

    if not (base / "config.json").is_file():
        raise NotFoundError(f"{base} is not a model directory (no config.json)")
    if not library.is_dir():
        raise NotFoundError(f"{library}: no such library", hint="create it first (mkdir, or `skillgraft library add`)")
    server = SkillServer.open(base, library, spec)
    for ref, (_, why) in server.stats["skipped"].items():
        console.print(f"warning: {ref} is not served: {why}")
    console.print(f"{len(server.served.keys)} skills from {library}: {', '.join(server.served.keys) or 'none yet'}")
    try:
        srv, sock, url = make_uvicorn(server, host, port)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}", hint="pick another --port") from None
    console.print(f"serving {base.name} on {url}/v1 (completions, chat/completions, models; Ctrl-C to stop)")
    try:
        srv.run(sockets=[sock])  # uvicorn's graceful shutdown on Ctrl-C, then the signal again
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    console.print("stopped")


def _serve_transfer(spec: TransferSpec, host: str, port: int) -> None:
    from skillgraft.transfer.load import load_fused
    from skillgraft.transfer.serve import make_server

    fused = load_fused(spec)
    try:
        server = make_server(fused, host, port, model_name=f"{Path(spec.large).name}+{spec.method}")
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}", hint="pick another --port") from None
    bound = server.server_address
    console.print(f"serving {spec.method} on http://{bound[0]!s}:{bound[1]}/v1/completions (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        fused.close()

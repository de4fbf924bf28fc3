"""Accuracy of multiple-choice video QA with V²Drop, against full tokens and random dropping.

    python -m bench.bench_accuracy --manifest mvbench.jsonl --model-source Qwen/Qwen2.5-VL-7B-Instruct
    python -m bench.bench_accuracy --manifest toy.jsonl --preset offline         # CPU, tiny random model

The labelled manifest is JSONL, one question per line (the MVBench / Video-MME shape):

    {"video": "/data/mvbench/clip_017.mp4", "question": "What does the man do after sitting down?",
     "options": ["He reads", "He stands up", "He eats"], "answer": "B"}

`video` is a local path or s3:// URI, `answer` the letter of the right option (A = options[0]).
Each question becomes the prompt `prompt_text` (question, lettered options, "Answer with the
option's letter ..."), and the questions of one video go into one pipeline manifest row, so a
video's frames are decoded once per variant and its video prefill is shared by its questions.

Variants, each one `pipeline.run.run` of jobs/qa.yaml on a local Ray (same frames, prompts and
greedy settings; one clip per video, covering the whole video; no shadow, no resume):
    full            model.retention=1.0 (the stock model)
    v2drop-<r>      model.retention=<r>, model.scorer=variation   for r in --retentions (0.5 0.25 0.1)
    random-<r>      model.retention=<r>, model.scorer=random      the control at the same schedule

Scoring: the answer letter parsed from the output (`parse_letter`); an output with no letter, an
error row or a missing row counts as wrong. Printed per variant: accuracy, its share of the full
model's accuracy (the paper's "98.6 % at 25 %" is this share), how many outputs held a letter,
clips/s and wall seconds of the run, retention achieved and prefill FLOPs saved. Writes
<out-dir>/accuracy-<tag>.json and .md (bench/results/ by default).

On the random-weight tiny model the accuracies are noise; the suite runs this to check the
plumbing and the scoring, and the same command with real weights checks the paper's claim.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report as report_file
from bench.report import RESULTS_DIR

REPO = Path(__file__).resolve().parents[1]
LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
WHOLE_VIDEO_S = 86_400.0  # clip length and stride: one clip per video, covering all of it
RETENTIONS = (0.5, 0.25, 0.1)


@dataclass(frozen=True)
class Question:
    video: str
    question: str
    options: tuple[str, ...]
    answer: str  # a letter, A = options[0]

    @property
    def prompt(self) -> str:
        return prompt_text(self.question, self.options)


@dataclass(frozen=True)
class Variant:
    name: str
    retention: float
    scorer: str  # variation | random

    @property
    def overrides(self) -> list[str]:
        return [f"model.retention={self.retention}", f"model.scorer={self.scorer}"]


# -- questions and answers (pure) ---------------------------------------------------------------


def prompt_text(question: str, options: Sequence[str]) -> str:
    """The question with lettered options. Example: ("Who?", ["a cat", "a dog"]) ->
    'Who?\\n(A) a cat\\n(B) a dog\\nAnswer with the option's letter from the given choices directly.'"""
    lettered = [f"({LETTERS[i]}) {option}" for i, option in enumerate(options)]
    return "\n".join([question.strip(), *lettered, INSTRUCTION])


def parse_letter(output: str | None, options: Sequence[str]) -> str | None:
    """The option letter an output chose, or None. In order: a letter alone at the start ('B',
    'B.', '(B)', 'B) ...', 'B: ...'); 'answer is B' / 'answer: (B)' anywhere; the first '(B)'; an
    output that is exactly one option's text. A sentence that only starts with the article 'A'
    ('A man walks') is not read as option A."""
    text = (output or "").strip()
    valid = LETTERS[: len(options)]
    patterns = (r"^\(?([A-J])(?:[.):]|\s*$)", r"answer(?:\s+is)?\s*[:：]?\s*\(?([A-J])\b", r"\(([A-J])\)")
    for pattern in patterns:
        match = re.search(pattern, text, flags=re.IGNORECASE if "answer" in pattern else 0)
        if match and match.group(1).upper() in valid:
            return match.group(1).upper()
    by_text = {option.strip().lower().rstrip("."): LETTERS[i] for i, option in enumerate(options)}
    return by_text.get(text.lower().rstrip("."))


def score(questions: Sequence[Question], outputs: dict[tuple[str, str], str | None]) -> dict[str, Any]:
    """Accuracy of `outputs` ((video, prompt) -> text; missing = no answer) on `questions`."""
    graded = []
    for q in questions:
        output = outputs.get((q.video, q.prompt))
        chosen = parse_letter(output, q.options)
        graded.append({"video": q.video, "question": q.question, "answer": q.answer, "output": output,
                       "chosen": chosen, "correct": chosen == q.answer})
    correct = sum(g["correct"] for g in graded)
    return {"questions": len(graded), "correct": correct, "answered": sum(g["chosen"] is not None for g in graded),
            "accuracy": correct / len(graded) if graded else None, "graded": graded}


def share_of_full(accuracy: float | None, full_accuracy: float | None) -> float | None:
    """accuracy / full accuracy; None when the full model got nothing right (no share to keep)."""
    if accuracy is None or not full_accuracy:
        return None
    return accuracy / full_accuracy


def read_labelled(path: str | os.PathLike) -> list[Question]:
    """Questions from a labelled JSONL manifest; errors name the line and the field."""
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = [k for k in ("video", "question", "options", "answer") if k not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(missing)}")
        options = tuple(str(o) for o in record["options"])
        answer = str(record["answer"]).strip().upper()
        if not 2 <= len(options) <= len(LETTERS) or answer not in LETTERS[: len(options)]:
            raise ValueError(f"{path}:{number}: answer {answer!r} is not one of the {len(options)} options' letters")
        questions.append(Question(video_uri(str(record["video"]), path), str(record["question"]), options, answer))
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def video_uri(video: str, manifest: str | os.PathLike) -> str:
    """A relative local path is relative to the labelled manifest's folder; made absolute here,
    because the pipeline writes each row's video_uri as the absolute path it read."""
    if "://" in video or os.path.isabs(video):
        return video
    return str((Path(manifest).resolve().parent / video).resolve())


def pipeline_manifest(questions: Iterable[Question]) -> list[dict[str, Any]]:
    """One pipeline manifest row per video, holding the prompts of all its questions."""
    videos: dict[str, list[str]] = {}
    for q in questions:
        videos.setdefault(q.video, []).append(q.prompt)
    return [{"uri": video, "questions": list(dict.fromkeys(prompts))} for video, prompts in videos.items()]


def variants(retentions: Sequence[float]) -> list[Variant]:
    dropped = [Variant(f"{scorer_name}-{r:g}", r, scorer) for scorer, scorer_name in
               (("variation", "v2drop"), ("random", "random")) for r in retentions]
    return [Variant("full", 1.0, "variation"), *dropped]


# -- running the pipeline -------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True, help="labelled JSONL: video, question, options, answer")
    p.add_argument("--model-source", default=None, help="model.source (default: the job's, or the preset's)")
    p.add_argument("--preset", default=None, help="e.g. offline: CPU, tiny random-weight model")
    p.add_argument("--retentions", type=float, nargs="+", default=list(RETENTIONS))
    p.add_argument("--num-frames", type=int, default=None, help="decode.num_frames (default: the job's)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation.max_new_tokens; a letter needs few")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="more job overrides, key=value")
    p.add_argument("--tag", default="cpu", help="results file name: accuracy-<tag>.json / .md")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def job_config(args: argparse.Namespace, variant: Variant, manifest: Path, output_dir: Path):
    from pipeline.config import load_job, with_absolute_paths

    overrides = [
        f"input.uri={manifest}", f"output.uri={output_dir}", "prompt.questions=[]", *variant.overrides,
        f"clips.clip_len_s={WHOLE_VIDEO_S}", f"clips.stride_s={WHOLE_VIDEO_S}", "clips.max_clips_per_video=1",
        f"generation.max_new_tokens={args.max_new_tokens}", "generation.temperature=0.0",
        "quality.shadow_fraction=0.0", "run.resume=false",
    ]
    overrides += [f"preset={args.preset}"] if args.preset else []
    overrides += [f"model.source={args.model_source}"] if args.model_source else []
    overrides += [f"decode.num_frames={args.num_frames}"] if args.num_frames else []
    return with_absolute_paths(load_job(REPO / "jobs" / "qa.yaml", [*overrides, *args.overrides]))


def ensure_ray() -> None:
    """Join the Ray this process already runs (the test suite's), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False


def run_variant(args: argparse.Namespace, variant: Variant, questions: list[Question], manifest: Path,
                scratch: Path) -> dict[str, Any]:
    """One pipeline run; its summary figures and its graded answers."""
    from pipeline._write import job_data_uri
    from pipeline.run import run
    from pipeline.storage import Storage

    output_dir = scratch / variant.name
    cfg = job_config(args, variant, manifest, output_dir)
    summary = run(cfg, log=lambda line: print(f"  [{variant.name}] {line}", flush=True))
    rows = Storage().read_parquet(job_data_uri(str(output_dir), cfg.job)).to_pylist()
    outputs = {(r["video_uri"], r["prompt"]): r["output_text"] for r in rows if r["status"] == "ok"}
    shutil.rmtree(output_dir, ignore_errors=True)
    return {
        "retention_asked": variant.retention, "scorer": variant.scorer,
        "retention_achieved": summary["retention_achieved_mean"], "flops_saved": summary["flops_saved_fraction"],
        "wall_s": summary["wall_s"], "clips_per_s": summary["clips_per_s"],
        "rows_error": summary["rows_error"], "rows_skipped": summary["rows_skipped"],
        "model_id": summary["model_id"], "model_random_weights": summary["model_random_weights"],
        **score(questions, outputs),
    }


def measure(args: argparse.Namespace, questions: list[Question]) -> dict[str, dict[str, Any]]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    manifest = scratch / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in pipeline_manifest(questions)) + "\n")
    try:
        results = {v.name: run_variant(args, v, questions, manifest, scratch) for v in variants(args.retentions)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    full = results["full"]["accuracy"]
    for result in results.values():
        result["share_of_full"] = share_of_full(result["accuracy"], full)
    return results


# -- report ----------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    v = report["variants"]
    full = v["full"]
    weights = "random weights: accuracies are noise" if full["model_random_weights"] else "real weights"
    lines = [
        f"# Video QA accuracy: full tokens, V²Drop and random dropping ({report['args']['tag']})",
        "",
        f"{full['questions']} questions from `{report['args']['manifest']}`, model `{full['model_id']}` ({weights}); "
        f"jobs/qa.yaml, greedy, max_new_tokens {report['args']['max_new_tokens']}, one clip per video. "
        "Clips/s are of this machine: compare them side by side only.",
        "",
        "| variant | retention asked / achieved | accuracy | share of full | answered | clips/s | wall s | FLOPs saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in v.items():
        share = "n/a" if r["share_of_full"] is None else f"{100 * r['share_of_full']:.1f} %"
        saved = "n/a" if r["flops_saved"] is None else f"{100 * r['flops_saved']:.1f} %"
        achieved = "n/a" if r["retention_achieved"] is None else f"{r['retention_achieved']:.3f}"
        lines.append(f"| {name} | {r['retention_asked']:g} / {achieved} | {100 * r['accuracy']:.1f} % "
                     f"({r['correct']}/{r['questions']}) | {share} | {r['answered']}/{r['questions']} | "
                     f"{r['clips_per_s']:.3f} | {r['wall_s']:.1f} | {saved} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-machine Ray, on 127.0.0.1 only
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        questions = read_labelled(args.manifest)
    except (OSError, ValueError) as error:
        sys.exit(f"--manifest: {error}")
    ensure_ray()
    began = time.perf_counter()
    report = {"args": vars(args), "variants": measure(args, questions), "bench_wall_s": time.perf_counter() - began}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"accuracy-{args.tag}"
    report_file.write(stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()

"""The accuracy harness: its scoring on known answers, and one end-to-end run on the tiny model.

The end-to-end run uses the random-weight tiny Qwen2.5-VL, so its accuracies are noise; what is
checked is that every variant runs the real pipeline with the asked retention and scorer, that
every question gets an output, and that each accuracy is exactly the re-scored outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_accuracy as ba

OPTIONS = ("a cat", "a dog", "a bird")


@pytest.mark.parametrize("output, expected", [
    ("B", "B"), ("B.", "B"), ("(C) a bird", "C"), ("A) a cat", "A"), ("c: a bird", None), ("C: a bird", "C"),
    ("The answer is B because it barks", "B"), ("answer: (c)", "C"), ("I think (A) fits", "A"),
    ("A dog is barking", None), ("a dog", "B"), ("D", None), ("", None), (None, None), ("Bird.", None),
])
def test_parse_letter(output, expected) -> None:
    assert ba.parse_letter(output, OPTIONS) == expected


def test_score_counts_right_wrong_unanswered_and_missing_outputs() -> None:
    questions = [ba.Question(f"/v/{i}.mp4", "Which animal?", OPTIONS, answer) for i, answer in enumerate("ABCA")]
    outputs = {("/v/0.mp4", questions[0].prompt): "A", ("/v/1.mp4", questions[1].prompt): "(C)",
               ("/v/2.mp4", questions[2].prompt): "no idea"}  # /v/3 has no row at all
    result = ba.score(questions, outputs)
    assert (result["questions"], result["correct"], result["answered"], result["accuracy"]) == (4, 1, 2, 0.25)
    assert [g["chosen"] for g in result["graded"]] == ["A", "C", None, None]
    assert ba.share_of_full(0.2, 0.25) == pytest.approx(0.8) and ba.share_of_full(0.2, 0.0) is None


def test_prompt_letters_the_options_and_videos_group_their_questions(tmp_path: Path) -> None:
    assert ba.prompt_text("Who?", ["a cat", "a dog"]) == f"Who?\n(A) a cat\n(B) a dog\n{ba.INSTRUCTION}"
    labelled = tmp_path / "q.jsonl"
    lines = [{"video": "v1.mp4", "question": "Q1", "options": ["x", "y"], "answer": "b"},
             {"video": "s3://b/v2.mp4", "question": "Q2", "options": ["x", "y"], "answer": "A"},
             {"video": "v1.mp4", "question": "Q3", "options": ["x", "y", "z"], "answer": "C"}]
    labelled.write_text("\n".join(map(json.dumps, lines)))
    questions = ba.read_labelled(labelled)
    assert [q.answer for q in questions] == ["B", "A", "C"] and questions[0].video == str(tmp_path / "v1.mp4")
    rows = ba.pipeline_manifest(questions)
    assert [(r["uri"], len(r["questions"])) for r in rows] == [(str(tmp_path / "v1.mp4"), 2), ("s3://b/v2.mp4", 1)]
    assert [v.name for v in ba.variants([0.5, 0.1])] == ["full", "v2drop-0.5", "v2drop-0.1", "random-0.5", "random-0.1"]


def test_a_bad_label_names_the_line(tmp_path: Path) -> None:
    labelled = tmp_path / "q.jsonl"
    labelled.write_text(json.dumps({"video": "v.mp4", "question": "Q", "options": ["x", "y"], "answer": "C"}))
    with pytest.raises(ValueError, match=r"q.jsonl:1: answer 'C' is not one of the 2 options' letters"):
        ba.read_labelled(labelled)


@pytest.mark.slow
def test_the_harness_runs_every_variant_through_the_pipeline(ray_cluster: None, shared_videos: Path,
                                                             tmp_path: Path) -> None:
    labelled = tmp_path / "toy.jsonl"
    toy = [(shared_videos / "nasa_13013.mp4", "What is shown?", ["space", "a kitchen", "a forest"], "A"),
           (shared_videos / "nasa_13013.mp4", "Is it daytime?", ["yes", "no"], "B"),
           (shared_videos / "flipping_a_pancake.mkv", "What is cooked?", ["soup", "a pancake"], "B")]
    labelled.write_text("\n".join(json.dumps({"video": str(v), "question": q, "options": o, "answer": a})
                                  for v, q, o, a in toy))
    report = ba.main(["--manifest", str(labelled), "--preset", "offline", "--retentions", "0.25",
                      "--max-new-tokens", "4", "--out-dir", str(tmp_path), "--tag", "toy"])

    variants = report["variants"]
    assert list(variants) == ["full", "v2drop-0.25", "random-0.25"]
    for result in variants.values():
        assert result["questions"] == 3 and result["rows_error"] == 0 and result["model_random_weights"]
        assert all(g["output"] is not None for g in result["graded"])  # every question answered by a real run
        options = {q: o for _, q, o, _ in toy}
        rescored = [ba.parse_letter(g["output"], options[g["question"]]) for g in result["graded"]]
        assert [g["chosen"] for g in result["graded"]] == rescored
        assert result["correct"] == sum(c == a for c, (*_, a) in zip(rescored, toy))
        assert result["accuracy"] == result["correct"] / 3 and result["clips_per_s"] > 0
    assert variants["full"]["retention_achieved"] == 1.0 and variants["full"]["flops_saved"] == 0
    for name in ("v2drop-0.25", "random-0.25"):
        assert variants[name]["retention_achieved"] == pytest.approx(0.25, abs=0.05)
        assert variants[name]["flops_saved"] > 0
        assert variants[name]["scorer"] == ("random" if name.startswith("random") else "variation")
    # the same schedule costs the same, whichever tokens it keeps
    assert variants["random-0.25"]["flops_saved"] == pytest.approx(variants["v2drop-0.25"]["flops_saved"])
    table = (tmp_path / "accuracy-toy.md").read_text()
    assert table.count("\n| ") == 4 and "random weights: accuracies are noise" in table
    assert json.loads((tmp_path / "accuracy-toy.json").read_text())["variants"].keys() == variants.keys()

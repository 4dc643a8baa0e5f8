"""Multi-task data: a task column (CSV/TSV/JSONL) or one file per task, task ids in the batches, the
CLI's `--task-column` / `--train TASK=FILE` (errors naming the file and line), training a Polytropon
module from the command line, `modfit routing-plot`, and the synthetic shared-skill data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import modfit
from modfit import cli
from modfit.batching import collate, encode
from modfit.commands import _sources
from modfit.data import DataError, TextExample, read_examples, task_list, with_task
from modfit.methods import poly
from modfit.routing import skills_data as sd
from modfit.routing.plot import Allocation, plot_allocation
from train_fixtures import bert_config, tiny_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- reading -----------------------------------------------------------------------------------------


def test_csv_task_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label,task\ncat sat,a,t2\ndog ran,b,t1\n")
    examples = read_examples(path, "seq-cls", task_column="task")
    assert [ex.task for ex in examples] == ["t2", "t1"]
    assert task_list(examples) == ["t1", "t2"]
    assert read_examples(path, "seq-cls")[0].task is None  # no task column asked for: no task


def test_csv_task_column_errors_name_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label,task\ncat sat,a,t1\n\ndog ran,b, \n")
    with pytest.raises(DataError, match=rf"^{path}:4: empty task in column 'task'$"):
        read_examples(path, "seq-cls", task_column="task")
    with pytest.raises(DataError, match=rf"^{path}:1: no task column 'kind'; columns found: 'text', 'label'"):
        read_examples(path, "seq-cls", task_column="kind")


def test_jsonl_task_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        '{"text": "cat", "label": "a", "task": 3}\n{"text": "dog", "label": "b", "task": "x"}\n',
    )
    assert [ex.task for ex in read_examples(path, "seq-cls", task_column="task")] == ["3", "x"]
    bad = _write(
        tmp_path / "bad.jsonl", '{"text": "cat", "label": "a", "task": "x"}\n{"text": "dog", "label": "b"}\n'
    )
    with pytest.raises(DataError, match=rf"^{bad}:2: no task key 'task'; keys found: 'text', 'label'$"):
        read_examples(bad, "seq-cls", task_column="task")
    tokens = _write(tmp_path / "t.jsonl", '{"tokens": ["bob"], "tags": ["B-PER"], "task": "ner"}\n')
    assert read_examples(tokens, "token-cls", task_column="task")[0].task == "ner"


def test_task_column_not_for_formats_without_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.conll", "bob B-PER\n")
    with pytest.raises(ValueError, match="task_column= applies to csv, tsv and jsonl, not conll"):
        read_examples(path, "token-cls", task_column="task")


def test_task_list_sorts_like_labels() -> None:
    examples = with_task([TextExample("x")], "10") + with_task([TextExample("y")], "9")
    assert task_list(examples) == ["9", "10"]
    with pytest.raises(ValueError, match="must not be empty"):
        with_task([TextExample("x")], " ")


# -- encoding and batches ----------------------------------------------------------------------------


def test_encode_puts_task_ids_in_the_batch() -> None:
    tokenizer = tiny_tokenizer()
    examples = [TextExample("cat sat", label="a", task="t2"), TextExample("dog", label="b", task="t1")]
    features = encode(examples, tokenizer, "seq-cls", labels=["a", "b"], max_length=8, tasks=["t1", "t2"])
    assert [f["task_ids"] for f in features] == [1, 0]
    batch = collate(features, tokenizer.pad_token_id)
    assert torch.equal(batch["task_ids"], torch.tensor([1, 0]))
    plain = encode(examples, tokenizer, "seq-cls", labels=["a", "b"], max_length=8)
    assert "task_ids" not in plain[0]
    with pytest.raises(DataError, match="example 2: task 't1' is not one of the tasks t2"):
        encode(examples, tokenizer, "seq-cls", labels=["a", "b"], max_length=8, tasks=["t2"])
    with pytest.raises(DataError, match="example 1 names no task"):
        encode(
            [TextExample("cat", label="a")],
            tokenizer,
            "seq-cls",
            labels=["a", "b"],
            max_length=8,
            tasks=["t"],
        )


def test_sources() -> None:
    assert _sources(["d.csv"], "--train") == [(None, "d.csv")]
    assert _sources(["a=x.csv", "b=y.csv"], "--train") == [("a", "x.csv"), ("b", "y.csv")]
    with pytest.raises(ValueError, match="--train: give every file as TASK=FILE"):
        _sources(["a=x.csv", "y.csv"], "--train")
    with pytest.raises(ValueError, match="--train: task 'a' is given more than one file"):
        _sources(["a=x.csv", "a=y.csv"], "--train")
    with pytest.raises(ValueError, match="--eval 'a=': no file after '='"):
        _sources(["a="], "--eval")


def test_an_existing_file_with_equals_in_its_name_is_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "k=v.csv", "text,label\n")
    assert _sources(["k=v.csv"], "--train") == [(None, "k=v.csv")]


# -- the command line ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    transformers.BertModel(bert_config()).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _task_files(tmp_path: Path) -> dict[str, Path]:
    rows = {"t1": [("cat sat", "a"), ("dog ran", "b")] * 4, "t2": [("paris park", "b"), ("bob sat", "a")] * 4}
    return {
        t: _write(tmp_path / f"{t}.csv", "text,label\n" + "".join(f"{x},{y}\n" for x, y in r))
        for t, r in rows.items()
    }


def test_train_poly_with_one_file_per_task_then_eval_and_plot(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _task_files(tmp_path)
    out = tmp_path / "poly"
    common = ["--base", base, "--max-length", "8", "--batch-size", "4"]
    status, stdout, err = _run(
        capsys, "train", *common, "--task", "seq-cls", "--method", "poly", "--param", "n_skills=3",
        "--train", f"t2={files['t2']}", "--train", f"t1={files['t1']}", "--eval", f"t1={files['t1']}",
        "--steps", "3", "--out", out, "--json",
    )  # fmt: skip
    assert status == 0, err
    card = json.loads((out / "module.json").read_text())
    assert card["config"]["tasks"] == ["t2", "t1"]  # in the order given
    assert card["head"]["labels"] == ["a", "b"]  # one head over the tasks' labels
    # eval needs the task of each example: TASK=FILE, or --task-column
    status, stdout, _ = _run(capsys, "eval", *common, "--load", out, "--data", f"t1={files['t1']}", "--json")
    assert status == 0 and json.loads(stdout)["examples"] == 8
    status, _, err = _run(capsys, "eval", *common, "--load", out, "--data", files["t1"])
    assert status == 2 and "module 'poly' has tasks (t2, t1): name each example's task" in err
    mixed = _write(tmp_path / "mixed.csv", "text,label,kind\ncat sat,a,t1\nbob sat,a,t3\n")
    status, _, err = _run(capsys, "eval", *common, "--load", out, "--data", mixed, "--task-column", "kind")
    assert status == 2 and f"{mixed}: example 2: task 't3' is not one of the tasks t2, t1" in err
    # the allocation plot
    png = tmp_path / "alloc.png"
    status, stdout, err = _run(capsys, "routing-plot", "--base", base, "--load", out, "--out", png, "--json")
    assert status == 0, err
    assert png.read_bytes().startswith(PNG)
    result = json.loads(stdout)
    assert result["tasks"] == ["t2", "t1"] and result["skills"] == 3
    assert torch.tensor(result["allocation"]).shape == (2, 1, 3)


def test_train_with_a_task_column(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = "".join(f"{t},{y},{k}\n" for t, y, k in [("cat sat", "a", "t1"), ("paris", "b", "t2")] * 4)
    data = _write(tmp_path / "d.csv", "text,label,kind\n" + rows)
    out = tmp_path / "p"
    status, _, err = _run(
        capsys, "train", "--base", base, "--task", "seq-cls", "--method", "poly", "--train", data,
        "--task-column", "kind", "--steps", "2", "--batch-size", "4", "--out", out, "--json",
    )  # fmt: skip
    assert status == 0, err
    assert json.loads((out / "module.json").read_text())["config"]["tasks"] == ["t1", "t2"]  # sorted
    # a LoRA module trains on the same data (the task ids ride along, unused)
    status, _, err = _run(
        capsys, "train", "--base", base, "--task", "seq-cls", "--method", "lora", "--train", data,
        "--task-column", "kind", "--steps", "2", "--batch-size", "4", "--out", tmp_path / "l",
    )  # fmt: skip
    assert status == 0, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task-column", "kind"], "give the tasks with --task-column or as --train TASK=FILE, not both"),
        (["--param", "tasks=x,y"], "--method poly has tasks (x, y): name each example's task"),
    ],
)
def test_train_errors(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    files = _task_files(tmp_path)
    train = ["--train", f"t1={files['t1']}"] if "--task-column" in extra else ["--train", files["t1"]]
    status, _, err = _run(
        capsys, "train", "--base", base, "--task", "seq-cls", "--method", "poly", *train, *extra,
        "--steps", "1", "--out", tmp_path / "x",
    )  # fmt: skip
    assert status == 2 and message in err, err


def test_train_task_column_error_names_file_and_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write(tmp_path / "d.csv", "text,label,kind\ncat,a,t1\ndog,b,\n")
    status, _, err = _run(
        capsys, "train", "--base", base, "--task", "seq-cls", "--method", "poly", "--train", data,
        "--task-column", "kind", "--steps", "1", "--out", tmp_path / "x",
    )  # fmt: skip
    assert status == 2 and f"{data}:3: empty task in column 'kind'" in err


def test_routing_plot_refuses_modules_without_allocation(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mm = modfit.wrap(transformers.BertModel.from_pretrained(base))
    mm.add("l", modfit.config("lora", r=2))
    mm.save("l", tmp_path / "l")
    status, _, err = _run(
        capsys, "routing-plot", "--base", base, "--load", tmp_path / "l", "--out", tmp_path / "p.png"
    )
    assert status == 2 and "module 'l' (lora) has no task x skill allocation to draw" in err
    status, _, err = _run(
        capsys, "routing-plot", "--base", base, "--load", tmp_path / "l", "--out", tmp_path / "p.jpg"
    )
    assert status == 2 and "drawn as a .png file" in err


def test_plot_allocation_with_heads(tmp_path: Path) -> None:
    allocation = Allocation(torch.rand(5, 2, 4), tuple(f"task{i}" for i in range(5)))
    path = plot_allocation(allocation, tmp_path / "a.png", title="mhr")
    assert path.read_bytes().startswith(PNG)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind


def test_allocation_of_a_poly_module(tmp_path: Path) -> None:
    mm = modfit.wrap(transformers.BertModel(bert_config()))
    mm.add("p", modfit.config("poly", tasks="x,y", n_skills=3, n_splits=2))
    z = poly.router(mm, "p").logits
    torch.testing.assert_close(poly.allocation(mm, "p"), torch.sigmoid(z.detach()))


# -- the synthetic shared-skill data -------------------------------------------------------------------


def test_skills_data_is_deterministic_balanced_and_follows_the_skills() -> None:
    tasks = sd.skill_tasks(6)
    assert len(tasks) == 15 and tasks[0].name == "animal-colour"
    train, held = sd.split_tasks(tasks, heldout=3, seed=0)
    assert len(train) == 12 and len(held) == 3
    assert sd.split_tasks(tasks, heldout=3, seed=0) == (train, held)
    for task in held:  # each held-out skill is trained by at least two training tasks
        assert all(sum(s in t.skills for t in train) >= 2 for s in task.skills)
    examples = sd.examples(tasks[0], 40, seed=1)
    assert examples == sd.examples(tasks[0], 40, seed=1)
    assert examples != sd.examples(tasks[0], 40, seed=1, split="test")
    assert [ex.label for ex in examples].count("yes") == 20
    categories = [set(words) for words in sd.SKILLS.values()]
    for ex in examples:
        words = set(ex.text.split())
        present = {i for i, c in enumerate(categories) if words & c}
        assert ex.label == ("yes" if {0, 1} <= present else "no")
        assert ex.task == "animal-colour"
    xor = sd.SkillTask((2, 3), "xor")
    assert xor.name == "fruit-xor-number" and xor.label({2}) == "yes" and xor.label({2, 3}) == "no"


def test_skills_data_csv_reads_back(tmp_path: Path) -> None:
    rows = sd.examples(sd.skill_tasks(4)[1], 6)
    path = sd.write_csv(tmp_path / "d.csv", rows)
    assert read_examples(path, "seq-cls", task_column="task") == rows

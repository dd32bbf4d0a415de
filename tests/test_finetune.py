"""Fine-tuning end to end: real launches on real data (WNUT-16), metrics against seqeval,
the training techniques against references."""

import json

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MODEL, deepspeed_cmd, pretrain, run_cmd, world_relations, write_ds_config

from sparsexpert.finetune.model import TaskModel, TaskSpec
from sparsexpert.model import ModelConfig, build_model
from sparsexpert.weights.deepspeed_formats import load_weights
from sparsexpert.weights.export import upcycle


def _slice_conll(src, dst, n):
    sents = src.read_text(encoding="utf-8").strip().split("\n\n")[:n]
    dst.write_text("\n\n".join(sents) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, example_data):
    out = tmp_path_factory.mktemp("pre")
    ds = write_ds_config(out / "ds.json", "moe_z2.json")
    pretrain(
        out / "run",
        1,
        ds,
        *TINY_MODEL,
        f"--data.path={example_data}",
        "--train.max_steps=4",
        "--train.eval_every=0",
    )
    return out / "run"


@pytest.fixture(scope="module")
def wnut(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("wnut")
    src = shared_data / "ner" / "wnut16"
    return _slice_conll(src / "train.conll", d / "train.conll", 240), _slice_conll(
        src / "dev.conll", d / "dev.conll", 50
    )


def finetune(out, init, *args, nproc=1, ds=None, timeout=300):
    ds = ds or write_ds_config(
        out.parent / f"{out.name}_ds.json", "moe_z2.json", train_micro_batch_size_per_gpu=8
    )
    cmd = deepspeed_cmd(
        nproc, "launcher/finetune.py", "--ds_config", str(ds), "--output_dir", str(out), *args
    )
    if init:
        cmd += ["--init", str(init)]
    return run_cmd(cmd, out, timeout=timeout)


def test_ner_metrics_equal_seqeval_and_early_stopping(tmp_path, pretrained, wnut):
    from seqeval.metrics import classification_report

    train, dev = wnut
    run = finetune(
        tmp_path / "ner",
        pretrained,
        *ner_args(train, dev, "--test", str(dev)),
        "--train.max_steps=12",
        "--train.eval_every=6",
        "--train.log_every=5",
        "--freeze_experts=true",
        "--freeze_embeddings=true",
    )
    res = json.loads((tmp_path / "ner" / "results.json").read_text())
    sents = (tmp_path / "ner" / "predictions" / "ner_dev.conll").read_text().strip().split("\n\n")
    rows = [[line.split("\t") for line in s.splitlines()] for s in sents]
    assert len(rows) == 50 and [r[0] for r in rows[0]] == [
        line.split("\t")[0] for line in dev.read_text().split("\n\n")[0].splitlines()
    ]
    want = classification_report(
        [[r[1] for r in s] for s in rows],
        [[r[2] for r in s] for s in rows],
        output_dict=True,
        zero_division=0,
    )
    got = res["reports"]["ner"]
    for key in ("micro avg", "macro avg"):
        for m in ("precision", "recall", "f1-score"):
            assert got[key][m] == pytest.approx(want[key][m], abs=1e-12), (key, m)
    assert res["results"]["ner"]["f1"] == pytest.approx(want["micro avg"]["f1-score"], abs=1e-12)
    assert "ner/test" in res["results"] and (tmp_path / "ner" / "best" / "latest").is_file()
    assert res["majority_baseline"]["ner"]["f1"] == 0.0  # all "O": no entity found
    # --freeze_experts / --freeze_embeddings: bit-identical after training, the rest trained
    before, _ = load_weights(pretrained)
    after, meta = load_weights(tmp_path / "ner")
    assert meta["kind"] == "finetune" and meta["step"] == res["best_step"]
    frozen = [k for k in before if ".experts." in k or k == "tok_embeddings.weight"]
    assert len(frozen) == 1 + 3 * 2  # the embeddings, w1/w2/w3 of TINY_MODEL's 2 MoE layers
    for k in frozen:
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["layers.0.attn.wq.weight"], before["layers.0.attn.wq.weight"])
    assert "micro avg" in run.output  # the entity-level report is printed

    # lr 0: the dev metric can never improve after the first evaluation -> stops after `patience` more
    ds = write_ds_config(
        tmp_path / "lr0.json",
        "moe_z2.json",
        train_micro_batch_size_per_gpu=8,
        optimizer={"type": "AdamW", "params": {"lr": 0.0}},
        scheduler=None,
    )
    cfgds = json.loads(ds.read_text())
    cfgds.pop("scheduler")
    ds.write_text(json.dumps(cfgds))
    stop = finetune(
        tmp_path / "stop",
        pretrained,
        *ner_args(train, dev),
        "--train.max_steps=100",
        "--train.eval_every=2",
        "--train.patience=2",
        ds=ds,
    )
    assert "early stop at step 6" in stop.output
    assert json.loads((tmp_path / "stop" / "results.json").read_text())["steps"] == 6


def ner_args(train, dev, *more):
    return ["--task", "ner", "--train", str(train), "--dev", str(dev), *more]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_adversarial_training(tmp_path, pretrained, wnut):
    """FGM adds a loss on perturbed embeddings that is larger than the clean one and changes training.
    PGD with one step of size epsilon in 1 process accumulating 2 micro-batches equals FGM in 2
    processes with ep=2: PGD reduces to FGM, and backward/step counts respect gradient accumulation."""
    train, dev = wnut
    common = ner_args(train, dev, "--train.max_steps=4", "--train.eval_every=4", "--train.log_every=1")
    accum = write_ds_config(
        tmp_path / "a2.json", "moe_z2.json", train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2
    )
    per_rank = write_ds_config(tmp_path / "d2.json", "moe_z2.json", train_micro_batch_size_per_gpu=4)
    pgd = [
        "--adversarial.method=pgd",
        "--adversarial.epsilon=2.0",
        "--adversarial.steps=1",
        "--adversarial.alpha=2.0",
    ]
    finetune(tmp_path / "plain", pretrained, *common, ds=accum)
    finetune(tmp_path / "pgd", pretrained, *common, *pgd, ds=accum)
    finetune(
        tmp_path / "fgm",
        pretrained,
        *common,
        "--adversarial.method=fgm",
        "--adversarial.epsilon=2.0",
        "--model.moe.ep_size=2",
        nproc=2,
        ds=per_rank,
    )
    plain, one, two = (
        [r for r in _metrics(tmp_path / name) if "total_loss" in r] for name in ("plain", "pgd", "fgm")
    )
    assert len(two) == 4 and all(r["adv_loss"] > r["loss"] for r in two)
    for a, b in zip(one, two):
        for key in ("loss", "adv_loss", "total_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert one[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)  # same first batch and weights
    assert one[3]["loss"] != pytest.approx(
        plain[3]["loss"], rel=1e-4
    )  # the adversarial term changed training


def test_distillation_and_teacher_checks(tmp_path, pretrained, wnut):
    train, dev = wnut
    common = ner_args(train, dev, "--train.max_steps=3", "--train.eval_every=3", "--train.log_every=1")
    finetune(tmp_path / "teacher", pretrained, *common)
    finetune(
        tmp_path / "student",
        pretrained,
        *common,
        f"--distill.teacher={tmp_path / 'teacher'}",
        "--distill.alpha=1.0",
        "--distill.temperature=2.0",
    )
    for r in (r for r in _metrics(tmp_path / "student") if "distill_kl" in r):
        assert r["distill_kl"] > 0 and r["total_loss"] == pytest.approx(4.0 * r["distill_kl"], rel=1e-5)
    cmd = deepspeed_cmd(
        1,
        "launcher/finetune.py",
        "--ds_config",
        str(REPO / "ds_configs" / "moe_z2.json"),
        "--output_dir",
        str(tmp_path / "bad"),
        "--init",
        str(pretrained),
        *common,
        f"--distill.teacher={pretrained}",
    )
    bad = run_cmd(cmd, tmp_path / "bad", check=False)
    assert bad.returncode != 0 and "must be a fine-tuning checkpoint" in bad.output


def test_upcycled_model_computes_the_dense_model():
    """Every expert a copy of the dense FFN and routing weights that sum to 1: the MoE computes the
    dense model's function exactly, whatever the router says."""
    dense_cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
    dense_cfg.moe.num_experts = 0
    dense = build_model(dense_cfg, seed=1).eval()
    moe_cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
    moe_cfg.moe.num_experts, moe_cfg.moe.top_k = 4, 2
    moe = TaskModel(moe_cfg, [TaskSpec("ner", "ner", ["O", "B-x"])]).eval()
    missing, unexpected = moe.load_state_dict(
        upcycle(dense.state_dict(), dense_cfg, moe_cfg, seed=0), strict=False
    )
    assert not unexpected and all(k.startswith("heads.") for k in missing)
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h_moe, _ = moe.hidden_states(x)
        h_dense, _ = dense.hidden_states(x)
    torch.testing.assert_close(h_moe, h_dense, atol=1e-5, rtol=1e-5)
    assert moe.layers[0].mlp.gate.weight.abs().max() < 0.02  # the router starts small


def test_task_schedule_sampling_and_rank_split():
    from sparsexpert.finetune.data import TaskSchedule

    prop = TaskSchedule([100, 900], 4, 1, 1, 0, seed=0, sampling="proportional", temperature=2.0)
    temp = TaskSchedule([100, 900], 4, 1, 1, 0, seed=0, sampling="temperature", temperature=2.0)
    share = [np.mean([s.task_of(i) == 0 for i in range(4000)]) for s in (prop, temp)]
    assert share[0] == pytest.approx(0.1, abs=0.02) and share[1] == pytest.approx(0.25, abs=0.025)
    # one rank accumulating 2 reads what two ranks read; each epoch visits every example once
    one = TaskSchedule([10, 30], 3, 2, 1, 0, seed=1, sampling="proportional", temperature=1.0)
    two = [
        TaskSchedule([10, 30], 3, 1, 2, r, seed=1, sampling="proportional", temperature=1.0) for r in (0, 1)
    ]
    seen = {0: [], 1: []}
    for step in range(20):
        for m in range(2):
            task, idx = one.examples(step, m)
            t2, idx2 = two[m].examples(step, 0)
            assert task == t2 and idx.tolist() == idx2.tolist()
            seen[task] += idx.tolist()
    assert sorted(seen[0][:10]) == list(range(10)) and sorted(seen[1][:30]) == list(range(30))


def test_multitask_classification_and_relation(tmp_path, pretrained, wnut, example_data):
    from sparsexpert.finetune.metrics import classification_scores, relation_scores

    train, dev = wnut
    for src, dst in ((train, "cls_train.jsonl"), (dev, "cls_dev.jsonl")):
        with open(tmp_path / dst, "w") as f:
            for sent in src.read_text().strip().split("\n\n"):
                rows = [line.split("\t") for line in sent.splitlines()]
                label = "entity" if any(r[-1] != "O" for r in rows) else "none"
                f.write(json.dumps({"text": " ".join(r[0] for r in rows), "label": label}) + "\n")
    world_relations(example_data, tmp_path / "re")
    config = {
        "tasks": [
            {
                "name": "cls",
                "kind": "classification",
                "train": str(tmp_path / "cls_train.jsonl"),
                "dev": str(tmp_path / "cls_dev.jsonl"),
            },
            {
                "name": "rel",
                "kind": "relation",
                "train": str(tmp_path / "re" / "train.jsonl"),
                "dev": str(tmp_path / "re" / "dev.jsonl"),
            },
        ],
        "sampling": "temperature",
        "task_aware_routing": True,
        "train": {"max_steps": 12, "eval_every": 6, "log_every": 1},
    }
    (tmp_path / "mt.json").write_text(json.dumps(config))
    finetune(tmp_path / "mt", pretrained, "--config", str(tmp_path / "mt.json"))
    res = json.loads((tmp_path / "mt" / "results.json").read_text())
    logged = {k for r in _metrics(tmp_path / "mt") for k in r}
    assert {"cls/loss", "rel/loss"} <= logged  # both tasks were trained
    preds = {
        n: [
            json.loads(line)
            for line in (tmp_path / "mt" / "predictions" / f"{n}_dev.jsonl").read_text().splitlines()
        ]
        for n in ("cls", "rel")
    }
    c = classification_scores([p["gold"] for p in preds["cls"]], [p["pred"] for p in preds["cls"]])
    r = relation_scores([p["gold"] for p in preds["rel"]], [p["pred"] for p in preds["rel"]])
    assert res["results"]["cls"]["accuracy"] == pytest.approx(c["accuracy"]) and len(preds["cls"]) == 50
    assert res["results"]["rel"]["f1"] == pytest.approx(r["f1"]) and len(preds["rel"]) > 50
    assert res["best_dev_metric"] == pytest.approx((c["accuracy"] + r["f1"]) / 2)
    train_labels = [
        json.loads(line)["label"] for line in (tmp_path / "cls_train.jsonl").read_text().splitlines()
    ]
    majority = max(set(train_labels), key=train_labels.count)
    share = np.mean([p["gold"] == majority for p in preds["cls"]])
    assert res["majority_baseline"]["cls"]["accuracy"] == pytest.approx(share)


def test_upcycling_a_dense_checkpoint(tmp_path, example_data, wnut):
    train, dev = wnut
    ds = write_ds_config(tmp_path / "ds.json", "moe_z2.json")
    pretrain(
        tmp_path / "dense",
        1,
        ds,
        *TINY_MODEL,
        "--model.moe.num_experts=0",
        f"--data.path={example_data}",
        "--train.max_steps=3",
        "--train.eval_every=0",
    )
    finetune(
        tmp_path / "ft",
        tmp_path / "dense",
        "--task",
        "ner",
        "--train",
        str(train),
        "--dev",
        str(dev),
        "--train.max_steps=2",
        "--train.eval_every=2",
        "--train.upcycle_experts=4",
        "--model.moe.top_k=2",
    )
    dense, _ = load_weights(tmp_path / "dense")
    moe, meta = load_weights(tmp_path / "ft")
    assert meta["model"]["moe"]["num_experts"] == 4 and meta["model"]["moe"]["top_k"] == 2
    for layer in (0, 1):
        experts = moe[f"layers.{layer}.mlp.experts.w1"]
        assert experts.shape[0] == 4  # each started as the dense FFN; two small steps later still close
        assert (experts - dense[f"layers.{layer}.mlp.w1.weight"]).abs().max() < 0.05


def test_a_ner_set_saved_by_hugging_face_datasets_fine_tunes(tmp_path, tiny_pretrained, wnut):
    """conll2003's and wnut_17's layout on disk (integer ner_tags with a ClassLabel): the same
    predictions file format, with the tag names, as from the CoNLL files."""
    import datasets

    from sparsexpert.finetune.readers import label_vocab, read_ner

    train, dev = (read_ner(p) for p in wnut)
    names = label_vocab(t for ex in train + dev for t in ex.tags)
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names)),
        }
    )

    def split(examples):
        rows = {
            "tokens": [e.tokens for e in examples],
            "ner_tags": [[names.index(t) for t in e.tags] for e in examples],
        }
        return datasets.Dataset.from_dict(rows, features=features)

    datasets.DatasetDict({"train": split(train), "validation": split(dev)}).save_to_disk(str(tmp_path / "hf"))
    finetune(
        tmp_path / "ner",
        tiny_pretrained,
        *ner_args(
            tmp_path / "hf" / "train",
            tmp_path / "hf" / "validation",
            "--train.max_steps=2",
            "--train.eval_every=2",
        ),
    )
    res = json.loads((tmp_path / "ner" / "results.json").read_text())
    assert res["steps"] == 2 and 0 <= res["results"]["ner"]["f1"] <= 1
    sents = (tmp_path / "ner" / "predictions" / "ner_dev.conll").read_text().strip().split("\n\n")
    assert len(sents) == len(dev)
    assert [line.split("\t")[1] for line in sents[0].splitlines()] == dev[0].tags  # gold tags by name

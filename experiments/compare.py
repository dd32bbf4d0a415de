"""The fine-tuning comparison at equal compute: (a) our MoE pretrained with the KG, (b) the same
MoE pretrained without it, (c) a dense model with the same active parameters pretrained the same
way, (d) the MoE trained from scratch on the task. Same pretraining steps and tokens for a-c, same
fine-tuning steps, batch and data for all four; one table of dev metrics, parameters, active
parameters and tokens/s.
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments.ablation import SHARED, _launch, arm_overrides, mean_tokens_per_s, table
from sparsexpert.data.format import is_dataset
from sparsexpert.weights import checkpoint

REPO = Path(__file__).resolve().parents[1]


def prepare_news_wiki(out: Path, seq_len: int, log=print) -> Path:
    """News + the Wikipedia sample (its links are entity mentions), joined with the Nations KG."""
    from data_prep.pipeline import PrepConfig, prepare

    data = out / "data"
    if not is_dataset(data):
        cfg = PrepConfig(
            corpus=[
                str(SHARED / "news" / "lee_background.txt"),
                str(SHARED / "wiki" / "enwiki-sample.xml.bz2"),
            ],
            kg=str(SHARED / "kg" / "nations" / "train.tsv"),
            aliases=str(REPO / "data_prep" / "examples" / "nations_aliases.tsv"),
            case="exact",
            output=str(data),
            vocab_size=4000,
            seq_len=seq_len,
        )
        prepare(cfg, log=log)
    return data


def _main(scores: dict[str, float]) -> str:
    value = scores.get("f1", scores.get("accuracy"))
    return "-" if value is None else f"{value:.4f}"


def run_comparison(
    task_args: list[str],
    output_dir: str | Path,
    ds_config: str,
    nproc: int,
    model_overrides: list[str],
    pretrain_steps: int,
    finetune_overrides: list[str],
    kg_arm: str = "fusion",
    seq_len: int = 128,
    reuse: bool = False,
    data: str | Path | None = None,
) -> str:
    """task_args: the fine-tuning task (`--task ner --train F --dev F`); model_overrides
    (`--model.*`) shape every model, the dense twin's FFN excepted. data: an already prepared
    dataset to pretrain on instead of news + Wikipedia + Nations."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data) if data else prepare_news_wiki(out, seq_len)
    base = [
        "--ds_config",
        ds_config,
        "--data.path",
        str(data),
        f"--train.max_steps={pretrain_steps}",
        "--train.eval_every=0",
        *model_overrides,
    ]
    arms: dict[str, list[str] | None] = {
        "a) MoE + KG": arm_overrides(kg_arm),
        "b) MoE, text only": arm_overrides("none"),
        "c) dense, same active": [*arm_overrides("none"), "--model.moe.num_experts=0"],
        "d) MoE from scratch": None,
    }
    rows: dict[str, dict[str, str]] = {}
    for name, pre in arms.items():
        slug = name.split(")")[0]
        if pre is not None:
            run = out / f"pretrain_{slug}"
            extra = list(pre)
            if "--model.moe.num_experts=0" in extra:  # dense twin: one FFN as wide as a token's top_k experts
                moe = json.loads((out / "pretrain_b" / "config.json").read_text())["run"]["model"]
                extra.append(f"--model.d_ff={moe['moe']['top_k'] * (moe['moe']['d_expert'] or moe['d_ff'])}")
            if not (reuse and checkpoint.find_latest(run / "checkpoints")):
                print(f"compare: {name}: pretraining into {run}", flush=True)
                _launch(
                    nproc,
                    "launcher/pretrain.py",
                    [*base, "--output_dir", str(run), "--overwrite", *extra],  # this command's folder
                    Path(f"{run}.log"),
                )
            init = ["--init", str(run)]
        else:
            init = [
                f"--tokenizer={data / 'tokenizer.model'}",
                *(o for o in model_overrides if ".knowledge." not in o),
            ]
        ft = out / f"finetune_{slug}"
        if not (reuse and (ft / "results.json").is_file()):
            print(f"compare: {name}: fine-tuning into {ft}", flush=True)
            args = ["--ds_config", ds_config, "--output_dir", str(ft), "--overwrite", *init, *task_args]
            args += finetune_overrides
            _launch(nproc, "launcher/finetune.py", args, Path(f"{ft}.log"))
        res = json.loads((ft / "results.json").read_text())
        p = res["params"]
        first = next(iter(res["results"].values()))
        rows[name] = {
            "best dev metric": f"{res['best_dev_metric']:.4f}",
            **{f"dev {k}": f"{v:.4f}" for k, v in first.items() if isinstance(v, float)},
            "majority-class baseline (dev metric)": _main(
                next(iter(res.get("majority_baseline", {}).values()), {})
            ),
            "params total (M)": f"{p['total'] / 1e6:.3f}",
            "params active (M)": f"{p['active'] / 1e6:.3f}",
            "pretrain tokens/s": f"{mean_tokens_per_s(out / f'pretrain_{slug}'):,.0f}"
            if pre is not None
            else "-",
            "fine-tune tokens/s": f"{mean_tokens_per_s(ft):,.0f}",
            "fine-tune steps (best at)": f"{res['steps']} ({res['best_step']})",
        }
    text = table(list(arms), rows)
    (out / "comparison.txt").write_text(text + "\n")
    print(f"\ncomparison, written to {out / 'comparison.txt'}:\n{text}", flush=True)
    return text

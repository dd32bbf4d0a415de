"""Evaluation of a pretrained checkpoint: perplexity, the knowledge probe, link prediction.

- Perplexity: exp(mean next-token loss) over every row of the held-out split, on the text alone.
- Knowledge probe (the built-in knowledge world): for facts (head, relation, ?) rank the true tail
  among all entities by the model's text, i.e. the mean over the relation's sentence templates of
  log p(" tail." | "head <template words>"); with entity fusion, also by the TransE score of the
  entity and relation embeddings. Facts are reported in two groups: held out (never stated in the
  corpus; only the KG holds them) and stated. Accuracy@1 and MRR.
- Fact probe (any KG whose relations are named by their words, e.g. linked text such as REBEL): the
  same ranking for groups of facts given as files, the candidates of (head, relation, ?) being the
  tails seen with that relation, and the templates made from the relation's surface form
  (`fact_probe`, `relation_templates`).
- Link prediction (a KG with a test split, e.g. Nations): rank heads and tails of each test triple
  among the KG's entities, filtered the standard way (other known true triples are removed from the
  ranking); MRR and Hits@1/3/10, by text (log-likelihood of the verbalized triple) and, with entity
  fusion, by the embeddings.

Runs under a DeepSpeed engine built from the checkpoint's own configuration (`open_checkpoint`: the
full weights of any world size, ep_size or ZeRO stage, no optimizer), at the world size at hand;
the scoring work is split over ranks. Inputs reach the engine through `device.to_device`, scores stay
on the device until a whole ranking is done.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sparsexpert.config import from_dict
from sparsexpert.data.knowledge import DatasetKG, KnowledgeLoader
from sparsexpert.data.shards import PackedDataset, read_manifest
from sparsexpert.distributed import comm, parallel
from sparsexpert.distributed.device import to_device
from sparsexpert.harness import Harness, load_state
from sparsexpert.knowledge.config import KnowledgeConfig
from sparsexpert.knowledge.modules import KnowledgeBatch
from sparsexpert.metrics import Progress, log_results
from sparsexpert.model import build_model
from sparsexpert.train.config import RunConfig
from sparsexpert.weights import checkpoint, deepspeed_formats

# ---------------------------------------------------------------- ranking metrics


def rank_of(scores: np.ndarray, true_idx: int, exclude: np.ndarray | None = None) -> float:
    """1-based rank of scores[true_idx] among scores, candidates in `exclude` (other true answers)
    removed; ties count half (the mean of the optimistic and pessimistic rank)."""
    keep = np.ones(len(scores), dtype=bool)
    if exclude is not None and len(exclude):
        keep[exclude] = False
    keep[true_idx] = True
    s, t = scores[keep], scores[true_idx]
    return 1.0 + float((s > t).sum()) + 0.5 * float((s == t).sum() - 1)


def ranking_metrics(ranks: list[float], hits: tuple[int, ...] = (1, 3, 10)) -> dict[str, float]:
    r = np.asarray(ranks, dtype=np.float64)
    if not len(r):
        return {"n": 0}
    out = {"n": int(len(r)), "mrr": float((1.0 / r).mean())}
    for k in hits:
        out[f"hits@{k}"] = float((r <= k).mean())
    return out


def random_baseline(n_candidates: list[int], hits: tuple[int, ...] = (1, 3, 10)) -> dict[str, float]:
    """What uniformly random scores achieve in expectation, for queries with these numbers of
    candidates left after filtering: MRR = mean(H_n / n), Hits@k = mean(min(k, n) / n)."""
    n = np.asarray(n_candidates, dtype=np.float64)
    if not len(n):
        return {"n": 0}
    harmonic = np.array([np.sum(1.0 / np.arange(1, int(c) + 1)) for c in n])
    out = {"n": int(len(n)), "mrr": float((harmonic / n).mean())}
    for k in hits:
        out[f"hits@{k}"] = float((np.minimum(k, n) / n).mean())
    return out


# ---------------------------------------------------------------- loading


@dataclass
class Opened:
    """A pretraining checkpoint under a DeepSpeed engine, in evaluation mode."""

    h: Harness
    engine: Any
    cfg: RunConfig
    step: int
    data_dir: Path
    tokenizer_file: Path
    param_counts: dict[str, int]
    valid_loader: KnowledgeLoader | None
    """The valid split, text only, `micro` rows per rank and forward (None without rows)."""
    batches: int = 0
    """Forwards so far (for the failure watch's message and the failure tests)."""

    def tick(self) -> None:
        self.batches += 1
        self.h.tick(self.batches)


def open_checkpoint(run_dir: str | Path) -> Opened:
    """The latest complete checkpoint of a pretraining run under an engine built with its own model
    and DeepSpeed config at this world size: the full weights (`deepspeed_formats.load_weights`, any world
    size, ep_size or ZeRO stage) loaded before deepspeed.initialize shards the experts, no optimizer.
    Collective: call on every rank."""
    from sparsexpert.train.trainer import make_loader

    run_dir = Path(run_dir)
    try:  # the newest usable checkpoint, those passed over logged with the reason
        tag = checkpoint.resolve_tag(run_dir / "checkpoints")
    except checkpoint.CheckpointError as exc:
        raise FileNotFoundError(f"{exc}; is {run_dir} a pretraining output folder?") from None
    meta = json.loads((tag / checkpoint.META).read_text())
    cfg = from_dict(RunConfig, meta["run"])
    data_dir = Path(meta["data_dir"])
    t = cfg.train
    h = Harness(run_dir, t.max_steps, False, t.collective_timeout_minutes, claim="read")
    if cfg.model.moe.ep_size and h.world % cfg.model.moe.ep_size:
        cfg.model.moe.ep_size = 0  # written at another world size: the largest ep_size that fits this one
    manifest = read_manifest(data_dir)
    ds_config, triplet = h.deepspeed_config(
        meta["ds_json"], cfg.model, t.max_steps, manifest["tokenizer"]["vocab_size"], manifest["seq_len"]
    )
    model = build_model(cfg.model, t.seed)
    state, _ = deepspeed_formats.load_weights(tag)
    load_state(model, state, str(tag))
    param_counts = model.num_params()
    engine = h.build_engine(model, ds_config, training=False)
    engine.eval()
    tokenizer_file = data_dir / manifest["tokenizer"]["file"]
    valid = None
    if len(PackedDataset(data_dir, "valid", verify=cfg.data.verify)):
        valid = make_loader(
            data_dir,
            "valid",
            KnowledgeConfig(),
            cfg.model.causal,
            triplet.micro,
            1,
            h.world,
            h.rank,
            cfg.data.seed,
            tokenizer_file,
            verify=cfg.data.verify,
        )
    h.log(f"evaluating {tag} (step {meta['step']}) at world size {h.world}")
    return Opened(h, engine, cfg, meta["step"], data_dir, tokenizer_file, param_counts, valid)


# ---------------------------------------------------------------- scoring text


@dataclass
class Scorer:
    """Log-likelihoods of token sequences under the engine's model, work split over ranks."""

    engine: Any
    eos_id: int
    batch_size: int = 64
    tick: Any = None
    """Called with a running batch count before each forward (the harness's failure watch)."""
    max_len: int = 0
    """The model's max_seq_len: a longer sequence loses its first tokens (the context the scored ones
    follow; an entity span moves with them, or goes where it is cut). 0: no limit."""

    @torch.no_grad()
    def logprobs(
        self,
        seqs: list[np.ndarray],
        score_from: list[int],
        entity_spans: list[tuple[int, int, int]] | None = None,
    ) -> np.ndarray:
        """sum_{t >= score_from[i]} log p(seq_i[t] | seq_i[:t]) for every sequence. entity_spans:
        (start, end, entity) per sequence fed to the entity fusion (None: no entity inputs).
        The sums stay on the device until every batch is scored: one host synchronization."""
        rank, world = comm.rank(), comm.world_size()
        device = next(self.engine.parameters()).device
        if self.max_len:
            cut = [max(len(q) - self.max_len, 0) for q in seqs]
            if any(cut):
                seqs = [q[c:] for q, c in zip(seqs, cut)]
                score_from = [max(f - c, 1) for f, c in zip(score_from, cut)]
                if entity_spans is not None:
                    entity_spans = [
                        (max(s - c, 0), max(e - c, 0), k) for (s, e, k), c in zip(entity_spans, cut)
                    ]
        n = len(seqs)
        n_batches = math.ceil(n / self.batch_size)
        n_batches += (-n_batches) % world  # every rank runs the same number of forwards (expert parallelism)
        out = to_device(torch.zeros(n, dtype=torch.float64), device)
        mine = range(rank, n_batches, world)
        progress = Progress(f"evaluate: scoring {n:,} sequences", len(mine), "batches", enabled=rank == 0)
        for bi in mine:
            if self.tick is not None:
                self.tick()
            progress.update()
            idx = list(range(bi * self.batch_size, min(n, (bi + 1) * self.batch_size)))
            real = bool(idx)
            if not real:
                idx = [0]  # a padding forward; its result is not kept
            L = max(len(seqs[i]) for i in idx)
            x = torch.full((len(idx), L), self.eos_id, dtype=torch.long)
            for b, i in enumerate(idx):
                x[b, : len(seqs[i])] = torch.from_numpy(np.asarray(seqs[i], dtype=np.int64))
            # scored positions of row b in the shifted log-probs: [score_from - 1, len - 1)
            lo = torch.tensor([score_from[i] - 1 for i in idx])
            hi = torch.tensor([len(seqs[i]) - 1 for i in idx])
            kwargs: dict[str, Any] = {}
            if entity_spans is not None:
                ent = torch.full_like(x, -1)
                for b, i in enumerate(idx):
                    s, e, k = entity_spans[i]
                    ent[b, s:e] = k
                z = torch.zeros(0, dtype=torch.long)
                kwargs["knowledge"] = KnowledgeBatch(ent, z, z, z, z, z.view(0, 3), z.view(0, 0, 3))
            x, lo, hi, kwargs = to_device((x, lo, hi, kwargs), device)
            logits = self.engine(x, **kwargs).logits.float()
            logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
            if not real:
                continue
            pos = torch.arange(logp.shape[1], device=device)
            scored = (pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])
            sums = (logp * scored).sum(1).double()
            out[bi * self.batch_size : bi * self.batch_size + len(idx)] = sums
        progress.close()
        comm.all_reduce(out)
        return out.cpu().numpy()


@torch.no_grad()
def perplexity(pt: Opened) -> dict[str, float]:
    """exp(mean next-token loss) over all rows of the valid split (text only)."""
    loader = pt.valid_loader
    if loader is None:
        return {}
    plan = loader.loader.plan
    rows_total = plan.num_rows
    per_step = plan.micro * plan.dp
    total = pt.h.to_device(torch.zeros(2, dtype=torch.float64))
    n_batches = math.ceil(rows_total / per_step)
    progress = Progress("evaluate: perplexity", n_batches, "batches", enabled=pt.h.rank == 0)
    for g in range(n_batches):
        pt.tick()
        progress.update()
        global_pos = g * per_step + plan.rank * plan.micro + torch.arange(plan.micro)
        keep = (global_pos < rows_total).double()  # the last global batch wraps around: count each row once
        x, keep = pt.h.to_device((loader.batch(g, 0)["input_ids"], keep))
        logits = pt.engine(x).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(
            x.shape[0], -1
        )
        total[0] += (nll.double().sum(1) * keep).sum()
        total[1] += keep.sum() * nll.shape[1]
    progress.close()
    comm.all_reduce(total)
    loss_sum, tokens = total.tolist()
    loss = loss_sum / tokens
    return {"valid_lm_loss": loss, "perplexity": math.exp(loss), "valid_tokens_scored": int(tokens)}


# ---------------------------------------------------------------- knowledge probe and link prediction


def _read_facts(path: Path) -> list[tuple[str, str, str]]:
    facts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3:
            raise ValueError(f"{path}:{lineno}: expected head<TAB>relation<TAB>tail, got {line!r}")
        facts.append((fields[0], fields[1], fields[2]))
    return facts


def _sample(items: list, n: int, seed: int) -> list:
    if n <= 0 or len(items) <= n:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]


def _rank_all(scores_QC: np.ndarray, truth: list[int], exclude: list[np.ndarray]) -> list[float]:
    return [rank_of(scores_QC[q], truth[q], exclude[q]) for q in range(len(truth))]


def knowledge_probe(
    pt, scorer: Scorer, world_dir: str | Path, max_facts: int = 60, seed: int = 0
) -> dict[str, Any]:
    """The built-in world's probe (see the module docstring)."""
    from data_prep.example_world import RELATIONS
    from data_prep.tokenizer import CachedEncoder, load_tokenizer

    world_dir = Path(world_dir)
    names = dict(
        line.split("\t", 1) for line in (world_dir / "aliases.tsv").read_text(encoding="utf-8").splitlines()
    )
    all_facts = _read_facts(world_dir / "kg.tsv")
    heldout = _read_facts(world_dir / "heldout.tsv")
    held = set(heldout)
    stated = [f for f in all_facts if f not in held]
    cand_ids = sorted(names)
    cand_pos = {e: i for i, e in enumerate(cand_ids)}
    tails_of: dict[tuple[str, str], set[str]] = {}
    for h, r, t in all_facts:
        tails_of.setdefault((h, r), set()).add(t)
    enc = CachedEncoder(load_tokenizer(pt.tokenizer_file))
    kg = DatasetKG.load(pt.data_dir)
    e_index = {e: i for i, e in enumerate(kg.entities)}
    r_index = {r: i for i, r in enumerate(kg.relations)}
    fusion = pt.cfg.model.knowledge.fusion
    results: dict[str, Any] = {}
    for group, facts in (
        ("heldout", _sample(heldout, max_facts, seed)),
        ("stated", _sample(stated, max_facts, seed)),
    ):
        scores = np.zeros((len(facts), len(cand_ids)))
        for q, (h, r, _t) in enumerate(facts):
            templates = [tp for tp in RELATIONS[r][2] if tp.endswith("{t}.") and "{h}" in tp]
            for tp in templates:
                before, rest = tp.split("{h}")
                middle = rest[: rest.index("{t}")]
                pre, head, mid = enc(before.strip()), enc(names[h]), enc(middle.strip())
                prompt = np.concatenate([pre, head, mid])
                seqs = [np.concatenate([prompt, enc(names[c] + ".")]) for c in cand_ids]
                spans = [(len(pre), len(pre) + len(head), e_index.get(h, -1))] * len(seqs) if fusion else None
                scores[q] += scorer.logprobs(seqs, [len(prompt)] * len(seqs), spans) / len(templates)
        truth = [cand_pos[t] for _, _, t in facts]
        exclude = [
            np.array([cand_pos[x] for x in tails_of[(h, r)] if x != t], dtype=np.int64) for h, r, t in facts
        ]
        res = {
            "text": ranking_metrics(_rank_all(scores, truth, exclude), hits=(1, 10)),
            "random": random_baseline([len(cand_ids) - len(e) for e in exclude], hits=(1, 10)),
        }
        if fusion:
            known = [f for f in facts if f[0] in e_index and f[1] in r_index]
            emb = _embedding_scores(
                pt, known, e_index, r_index, [e_index.get(c, -1) for c in cand_ids], tails=True
            )
            keep = [facts.index(f) for f in known]
            res["embeddings"] = ranking_metrics(
                _rank_all(emb, [truth[i] for i in keep], [exclude[i] for i in keep]), hits=(1, 10)
            )
        for m in res.values():
            m["accuracy@1"] = m.pop("hits@1", 0.0)
        results[group] = res
    results["candidates"] = len(cand_ids)
    return results


def _embedding_scores(pt, facts, e_index, r_index, cand_idx: list[int], tails: bool) -> np.ndarray:
    """[len(facts), len(cand_idx)] TransE scores of the candidates as tails (or heads); candidates
    the entity table lacks score -inf."""
    know = pt.engine.module.knowledge
    ids = [[e_index[f[0]] for f in facts], [r_index[f[1]] for f in facts], [e_index[f[2]] for f in facts]]
    h, r, t = pt.h.to_device(torch.tensor(ids, dtype=torch.long)).unbind(0)
    with parallel.gathered(list(know.parameters())):  # whole tables under ZeRO-3 (a method, not a forward)
        full = (know.tail_scores(h, r) if tails else know.head_scores(r, t)).cpu().numpy()
    idx = np.asarray(cand_idx)
    out = np.full((len(facts), len(idx)), -np.inf)
    out[:, idx >= 0] = full[:, idx[idx >= 0]]
    return out


def _embedding_candidates(
    pt, facts, e_index, r_index, rows: list[np.ndarray], tails: bool, n_entities: int, block: int = 64
) -> list[np.ndarray]:
    """Each fact's TransE scores of its candidates, given as table rows (-1: not in the table, scored
    -inf): a block of facts against the whole table at a time. Collective (ZeRO-3 gathers the tables)."""
    out = []
    for lo in range(0, len(facts), block):
        full = _embedding_scores(pt, facts[lo : lo + block], e_index, r_index, list(range(n_entities)), tails)
        for k, idx in enumerate(rows[lo : lo + block]):
            out.append(np.where(idx >= 0, full[k, np.maximum(idx, 0)], -np.inf))
    return out


_PREPOSITIONS = frozenset("of in on at by for from to with into as".split())


def relation_templates(relation: str) -> list[str]:
    """Sentence templates ({h}: the head's words, {t}: the tail's) of a relation known only by its
    surface form ("date of birth", "part of", "born_in"): the bare triple, and the relation as a noun
    ("The date of birth of {h} is {t}.") or, where it ends in a preposition, as a predicate ("{h} is
    part of {t}.")."""
    r = " ".join(relation.replace("_", " ").split())
    words = r.lower().split()
    second = f"{{h}} is {r} {{t}}." if words and words[-1] in _PREPOSITIONS else f"The {r} of {{h}} is {{t}}."
    return [f"{{h}} {r} {{t}}.", second]


def _read_surfaces(path: Path) -> dict[str, str]:
    """Entity -> surface form from a facts file's optional 4th and 5th columns (head's, tail's)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 5:
            out.setdefault(fields[0], fields[3])
            out.setdefault(fields[2], fields[4])
    return out


def fact_probe(
    pt,
    scorer: Scorer,
    fact_files: list[str | Path],
    known_files: list[str | Path],
    max_facts: int = 60,
    max_candidates: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """The knowledge probe on any KG whose relations are named by their surface form (e.g. linked text):
    each file is a group of facts (named by its stem); the true tail of (head, relation, ?) is ranked
    among the entities seen as a tail of that relation in the known facts (every file given), the other
    known tails filtered out, at most max_candidates of them (sampled as candidate_sets does; 0 = all),
    by the mean over relation_templates of log p(" tail." | "head <template words>") and, with entity
    fusion, by the TransE score where the table holds head, relation and tail (a candidate the table
    lacks scores -inf, behind every other; `n` counts the facts ranked so). Entities are written in
    their surface form: the files' 4th and 5th columns, else the dataset's. The random baseline is
    computed over the same candidate sets. Facts with a single candidate (the answer) are left out
    before max_facts are drawn, and counted (`one_candidate`)."""
    from data_prep.tokenizer import CachedEncoder, load_tokenizer

    known: set[tuple[str, str, str]] = set()
    surfaces: dict[str, str] = {}
    for path in [*known_files, *fact_files]:
        known |= set(_read_facts(Path(path)))
        surfaces.update(_read_surfaces(Path(path)))
    kg = DatasetKG.load(pt.data_dir)
    e_index = {e: i for i, e in enumerate(kg.entities)}
    r_index = {r: i for i, r in enumerate(kg.relations)}

    def surface(e: str) -> str:
        return surfaces.get(e) or (kg.surfaces[e_index[e]] if e in e_index else e.replace("_", " "))

    enc = CachedEncoder(load_tokenizer(pt.tokenizer_file))
    fusion = pt.cfg.model.knowledge.fusion
    results: dict[str, Any] = {}
    for path in fact_files:
        facts = _read_facts(Path(path))
        # a query whose relation has one tail left after filtering ranks nothing: left out, counted
        rankable = [len(c) > 1 for c in candidate_sets(facts, known, True, 2, seed)]
        facts = _sample([f for f, ok in zip(facts, rankable) if ok], max_facts, seed)
        cands = candidate_sets(facts, known, True, max_candidates, seed)
        seqs: list[np.ndarray] = []
        starts: list[int] = []
        spans: list[tuple[int, int, int]] = []
        n_templates = []
        for (h, r, _t), cs in zip(facts, cands):
            templates = relation_templates(r)
            n_templates.append(len(templates))
            for tp in templates:
                before, rest = tp.split("{h}")
                pre, head, mid = enc(before.strip()), enc(surface(h)), enc(rest[: rest.index("{t}")].strip())
                prompt = np.concatenate([pre, head, mid])
                seqs += [np.concatenate([prompt, enc(surface(c) + ".")]) for c in cs]
                starts += [len(prompt)] * len(cs)
                spans += [(len(pre), len(pre) + len(head), e_index.get(h, -1))] * len(cs)
        text = scorer.logprobs(seqs, starts, spans if fusion else None) if seqs else np.zeros(0)
        ranks, at = [], 0
        for k, cs in zip(n_templates, cands):  # the answer is each candidate set's first
            ranks.append(rank_of(text[at : at + k * len(cs)].reshape(k, len(cs)).mean(0), 0))
            at += k * len(cs)
        res: dict[str, Any] = {
            "text": ranking_metrics(ranks, hits=(1, 10)),
            "random": random_baseline([len(c) for c in cands], hits=(1, 10)),
        }
        if fusion:
            table = [q for q, (h, r, t) in enumerate(facts) if h in e_index and r in r_index and t in e_index]
            rows = [np.array([e_index.get(c, -1) for c in cands[q]]) for q in table]
            emb = _embedding_candidates(
                pt, [facts[q] for q in table], e_index, r_index, rows, True, kg.n_entities
            )
            res["embeddings"] = ranking_metrics([rank_of(e, 0) for e in emb], hits=(1, 10))
        for m in res.values():
            m["accuracy@1"] = m.pop("hits@1", 0.0)
        res["one_candidate"] = rankable.count(False)
        results[Path(path).stem] = res
    results["candidates"] = "tails of the relation in the known facts, filtered" + (
        f", at most {max_candidates} (sampled, seed {seed})" if max_candidates else ""
    )
    return results


def filtered_targets(
    queries: list[tuple[str, str, str]], known: set[tuple[str, str, str]], ents: list[str], tails: bool
) -> tuple[list[int], list[np.ndarray]]:
    """For each (h, r, t): the position of the answer (t, or h when ranking heads) in `ents`, and
    the positions of the other entities that also make a known true triple (filtered from the ranking)."""
    pos = {e: i for i, e in enumerate(ents)}
    answers = _answers(known, tails)
    truth, exclude = [], []
    for h, r, t in queries:
        answer = t if tails else h
        others = sorted(
            pos[c] for c in answers.get((h, r) if tails else (r, t), ()) if c != answer and c in pos
        )
        truth.append(pos[answer])
        exclude.append(np.asarray(others, dtype=np.int64))
    return truth, exclude


def _answers(known: set[tuple[str, str, str]], tails: bool) -> dict[tuple[str, str], set[str]]:
    """(h, r) -> every known tail (tails) or (r, t) -> every known head: the filter, built once."""
    out: dict[tuple[str, str], set[str]] = {}
    for h, r, t in known:
        out.setdefault((h, r) if tails else (r, t), set()).add(t if tails else h)
    return out


def candidate_sets(
    queries: list[tuple[str, str, str]],
    known: set[tuple[str, str, str]],
    tails: bool,
    max_candidates: int,
    seed: int = 0,
) -> list[list[str]]:
    """Each query's candidates, the answer first: the relation-constrained protocol for KGs too large to
    rank every entity against every query. The candidates of (h, r, ?) are the entities that are the tail of
    some known triple of relation r (heads of r, ranking heads), less the other known answers (filtered);
    where more than max_candidates - 1 remain, that many are drawn uniformly without replacement (seeded
    by seed, direction and query). The random baseline is then computed over the same sets."""
    pool: dict[str, list[str]] = {}
    for h, r, t in known:
        pool.setdefault(r, []).append(t if tails else h)
    ordered = {r: sorted(set(v)) for r, v in pool.items()}
    answers = _answers(known, tails)
    out = []
    for q, (h, r, t) in enumerate(queries):
        answer = t if tails else h
        taken = answers.get((h, r) if tails else (r, t), set())
        others = [c for c in ordered.get(r, []) if c != answer and c not in taken]
        if max_candidates and len(others) > max_candidates - 1:
            rng = np.random.default_rng([seed, int(tails), q])
            pick = np.sort(rng.choice(len(others), max_candidates - 1, replace=False))
            others = [others[i] for i in pick]
        out.append([answer, *others])
    return out


def link_prediction(
    pt,
    scorer: Scorer,
    test_path: str | Path,
    known_paths: list[str | Path],
    max_triples: int = 0,
    max_candidates: int = 0,
) -> dict[str, Any]:
    """Filtered head and tail ranking of the test triples: among all the KG's entities (max_candidates 0),
    or among at most max_candidates relation-constrained ones (see candidate_sets)."""
    from data_prep.tokenizer import CachedEncoder, load_tokenizer

    test = _read_facts(Path(test_path))
    known = set(test)
    for p in known_paths:
        known |= set(_read_facts(Path(p)))
    kg = DatasetKG.load(pt.data_dir)
    e_index = {e: i for i, e in enumerate(kg.entities)}
    r_index = {r: i for i, r in enumerate(kg.relations)}
    ents = sorted({x for h, _, t in known for x in (h, t)})
    usable = [f for f in test if f[0] in e_index and f[2] in e_index and f[1] in r_index]
    skipped = len(test) - len(usable)
    usable = _sample(usable, max_triples, 0)
    enc = CachedEncoder(load_tokenizer(pt.tokenizer_file))
    fusion = pt.cfg.model.knowledge.fusion
    out: dict[str, Any] = {
        "test_triples": len(test),
        "skipped_not_in_vocabulary": skipped,
        "entities": len(ents),
        "candidates": "all entities, filtered"
        if not max_candidates
        else f"relation-constrained, filtered, at most {max_candidates} (sampled, seed 0)",
    }

    def surface(e: str) -> str:
        return kg.surfaces[e_index[e]] if e in e_index else e.replace("_", " ")

    ranks: dict[str, list[float]] = {"text": [], "embeddings": []}
    left: list[int] = []  # candidates left after filtering, per query
    shared = None if max_candidates else np.array([e_index.get(c, -1) for c in ents])  # table rows of `ents`
    for tails in (True, False):
        if max_candidates:
            cands = candidate_sets(usable, known, tails, max_candidates)
            truth = [0] * len(usable)
            exclude = [np.zeros(0, np.int64)] * len(usable)
        else:
            truth, exclude = filtered_targets(usable, known, ents, tails)
            cands = [ents] * len(usable)
        left += [len(c) - len(e) for c, e in zip(cands, exclude)]
        seqs = []
        for (h, r, t), cs in zip(usable, cands):
            rel = enc(r.replace("_", " "))
            for c in cs:
                head, tail = (h, c) if tails else (c, t)
                seqs.append(np.concatenate([enc(surface(head)), rel, enc(surface(tail) + ".")]))
        if not usable:
            continue
        text = scorer.logprobs(seqs, [1] * len(seqs))
        bounds = np.cumsum([0, *map(len, cands)])
        ranks["text"] += [
            rank_of(text[bounds[q] : bounds[q + 1]], truth[q], exclude[q]) for q in range(len(usable))
        ]
        if fusion:
            rows = [
                shared if shared is not None else np.array([e_index.get(c, -1) for c in cs]) for cs in cands
            ]
            emb = _embedding_candidates(pt, usable, e_index, r_index, rows, tails, kg.n_entities)
            ranks["embeddings"] += [rank_of(emb[q], truth[q], exclude[q]) for q in range(len(usable))]
    out["text"] = ranking_metrics(ranks["text"])
    out["random"] = random_baseline(left)
    if fusion:
        out["embeddings"] = ranking_metrics(ranks["embeddings"])
    return out


def evaluate(
    run_dir: str | Path,
    probe_world: str | Path | None = None,
    link_test: str | Path | None = None,
    link_known: list[str | Path] | None = None,
    max_facts: int = 60,
    max_triples: int = 0,
    max_candidates: int = 0,
    probe_facts: list[str | Path] | None = None,
    probe_known: list[str | Path] | None = None,
) -> dict[str, Any]:
    """Every evaluation that applies; rank 0 writes <run_dir>/eval.json and, where the run writes
    TensorBoard, its figures there as `eval/...` scalars at the checkpoint's step. Collective: call on
    every rank. probe_facts: the knowledge probe on these groups of facts (fact_probe), instead of the
    built-in world's."""
    if probe_world and probe_facts:
        raise ValueError("give --probe_world (the built-in world) or --probe_facts (any KG), not both")
    pt = open_checkpoint(run_dir)
    with pt.h.watch("evaluation"):
        return _evaluate(
            pt,
            run_dir,
            probe_world,
            link_test,
            link_known or [],
            max_facts,
            max_triples,
            max_candidates,
            probe_facts or [],
            probe_known or [],
        )


def _evaluate(
    pt: Opened,
    run_dir,
    probe_world,
    link_test,
    link_known,
    max_facts,
    max_triples,
    max_candidates,
    probe_facts,
    probe_known,
) -> dict[str, Any]:
    log = pt.h.log
    res: dict[str, Any] = {
        "run": str(run_dir),
        "step": pt.step,
        "knowledge_mode": pt.cfg.model.knowledge.mode,
        "params": pt.param_counts,
    }
    if not pt.cfg.model.causal:
        log(
            "evaluate: a masked LM has no perplexity or left-to-right text scores; only embedding scores apply"
        )
    else:
        res.update(perplexity(pt))
    eos = int(read_manifest(pt.data_dir)["tokenizer"]["eos_id"])
    scorer = Scorer(pt.engine, eos, tick=pt.tick, max_len=pt.cfg.model.max_seq_len)
    if probe_world and pt.cfg.model.causal:
        res["knowledge_probe"] = knowledge_probe(pt, scorer, probe_world, max_facts)
    if probe_facts and pt.cfg.model.causal:
        res["knowledge_probe"] = fact_probe(pt, scorer, probe_facts, probe_known, max_facts, max_candidates)
    if link_test and pt.cfg.model.causal:
        res["link_prediction"] = link_prediction(
            pt, scorer, link_test, link_known, max_triples, max_candidates
        )
    if pt.h.rank == 0:
        (Path(run_dir) / "eval.json").write_text(json.dumps(res, indent=2))
        t = pt.cfg.train
        if t.tensorboard and "tensorboard" in t.report_to:
            log_results(Path(run_dir) / "tensorboard", "eval", res, pt.step)
        log(json.dumps(res, indent=2))
    return res

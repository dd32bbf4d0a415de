"""Row-wise Adagrad for the entity table (model.knowledge.entity_optimizer="rowwise_adagrad").

DeepSpeed's optimizer steps every entry of every weight it holds: for a table of millions of entities
that is a dense gradient of the whole table each step (zeroed, reduced over the ranks, clipped) and Adam
over all of it, while a micro-batch looks up a few thousand rows. On this path the table is outside
DeepSpeed's optimizer and a step costs what the rows looked up cost:

1. backward hands each lookup's row gradients to the module (`KnowledgeEmbeddings.looked_up`), with
   the ids: the table gets no gradient;
2. at the optimizer step every rank's lookups are gathered (one all-gather of a fixed size, `cap` rows
   a rank, so that no rank waits on another's count: no host synchronization), averaged over the ranks
   as DeepSpeed averages the other gradients, and summed per row;
3. row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): for each row r with summed gradient g_r,
   s_r += mean(g_r ** 2); w_r -= lr * g_r / (sqrt(s_r) + eps). Every rank computes the same update from
   the same gathered rows, so the table stays the same on every rank.

The table and the accumulators (`entity_sq`) stay fp32 whatever the training precision, are whole on
every rank (ZeRO 0-2), and are saved with the weights in every checkpoint. A step DeepSpeed skipped
(gradients not finite) is skipped here too; rows whose gradient is not finite are not updated.

Shape letters: K lookups of this rank, W ranks, R = W * cap gathered rows, De entity width.
"""

from __future__ import annotations

import torch

from sparsexpert.distributed import comm
from sparsexpert.knowledge.config import KnowledgeConfig
from sparsexpert.knowledge.modules import KnowledgeEmbeddings


def lookups_per_step(k: KnowledgeConfig, micro: int, seq_len: int, grad_accum: int) -> int:
    """The most entity rows one rank's forward passes look up between two optimizer steps: per
    micro-batch the fusion's micro x seq_len tokens, the entity prediction's candidates (at most one a
    mention token plus the sampled negatives), the triple loss's heads and tails of its positives and
    corrupted triples, and one row of the zero loss."""
    per_micro = micro * seq_len
    per_micro += micro * seq_len + k.entity_negatives
    per_micro += 2 * k.triple_batch * (1 + k.triple_negatives)
    return grad_accum * (per_micro + 1)


class RowwiseAdagrad:
    def __init__(self, module: KnowledgeEmbeddings, cap: int):
        """module: the model's knowledge module (after deepspeed.initialize); cap: rows a rank sends a
        step (`lookups_per_step`)."""
        if not module.rowwise:
            raise ValueError("RowwiseAdagrad needs model.knowledge.entity_optimizer=rowwise_adagrad")
        self.module, self.cap = module, cap
        self.lr, self.eps = module.cfg.entity_lr, module.cfg.entity_eps
        # fp32 whatever the training precision (DeepSpeed casts a bf16 run's weights, these with them)
        weight = module.entities.weight
        weight.data = weight.data.float()
        module.entity_sq.data = module.entity_sq.data.float()

    def step(self, applied: bool) -> None:
        """The optimizer step of the rows looked up since the last one (collective: every rank calls it
        once per optimizer step). applied: whether DeepSpeed applied its step; if not, neither is this."""
        looked_up, self.module.looked_up = self.module.looked_up, []
        weight, sq = self.module.entities.weight, self.module.entity_sq
        De = weight.shape[1]
        ids_K = torch.cat([i for i, _ in looked_up]) if looked_up else weight.new_zeros(0, dtype=torch.long)
        g_KD = torch.cat([g.float() for _, g in looked_up]) if looked_up else weight.new_zeros(0, De)
        K = ids_K.numel()  # known on the host from the shapes
        if K > self.cap:
            raise RuntimeError(
                f"row-wise Adagrad: {K} entity lookups this step, more than the {self.cap} sized from the "
                "config (sparsexpert.train.rowwise.lookups_per_step); please report it"
            )
        if not applied:  # the same on every rank (DeepSpeed's decision is over all of them)
            return
        # a fixed size on every rank: padding is row 0 with a zero gradient, which changes nothing
        ids_pad = ids_K.new_zeros(self.cap)
        ids_pad[:K] = ids_K
        g_pad = g_KD.new_zeros(self.cap, De)
        g_pad[:K] = g_KD
        ids_R = comm.all_gather(ids_pad).reshape(-1)
        g_RD = comm.all_gather(g_pad).reshape(-1, De) / comm.world_size()

        # sum per row with shapes fixed by R (no host synchronization): sort, number the runs of equal
        # ids, add each gradient into its run's slot; slots past the last run stay row 0 with zero
        R = ids_R.numel()
        order_R = torch.argsort(ids_R, stable=True)
        sorted_R = ids_R[order_R]
        new_R = torch.ones(R, dtype=torch.bool, device=ids_R.device)
        new_R[1:] = sorted_R[1:] != sorted_R[:-1]
        run_R = torch.cumsum(new_R, 0) - 1
        grad_RD = g_RD.new_zeros(R, De).index_add_(0, run_R, g_RD[order_R])
        row_R = ids_R.new_zeros(R).scatter_(0, run_R, sorted_R)
        finite_R = torch.isfinite(grad_RD).all(dim=1, keepdim=True)
        grad_RD = torch.where(finite_R, grad_RD, 0.0)

        # each row once among the runs; a slot past them adds zero to row 0, exactly
        sq.index_add_(0, row_R, grad_RD.pow(2).mean(dim=1))
        step_RD = grad_RD / (sq[row_R].sqrt() + self.eps).unsqueeze(1)
        weight.data.index_add_(0, row_R, step_RD, alpha=-self.lr)

    def memory_bytes(self) -> int:
        """What the table costs a rank on this path: the fp32 table and one fp32 accumulator a row."""
        w = self.module.entities.weight
        return w.numel() * 4 + w.shape[0] * 4

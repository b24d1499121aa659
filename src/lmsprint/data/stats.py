"""``lmsprint data stats``: what each batching strategy costs on a corpus (padding waste, tokens per row)."""

from __future__ import annotations

from lmsprint.config import RunConfig
from lmsprint.data.batching import STRATEGIES, TokenStream, epoch_plan, plan_stats
from lmsprint.data.prepare import prepared_data


def strategy_stats(cfg: RunConfig) -> list[dict]:
    d, t = cfg.data, cfg.train
    data = prepared_data(d)
    stream = TokenStream(data.train)
    micro = t.micro_batch_size or t.batch_size
    out = []
    for strategy in STRATEGIES:
        plan = epoch_plan(stream, strategy, d.seq_len, seed=t.seed, epoch=0, batch_rows=t.batch_size,
                          bucket_window=d.bucket_window)
        out.append(plan_stats(plan, strategy=strategy, seq_len=d.seq_len, micro_rows=micro,
                              pad_multiple=d.pad_multiple))
    return out


def stats_table(cfg: RunConfig) -> str:
    rows = strategy_stats(cfg)
    stream_docs = f"seq_len {cfg.data.seq_len}, micro-batch {cfg.train.micro_batch_size or cfg.train.batch_size} rows"
    lines = [f"batching strategies on {cfg.data.source} ({stream_docs})", "",
             "| strategy | rows | real tokens | computed slots | waste | tokens/row |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['rows']:,} | {r['tokens']:,} | {r['slots']:,} | {r['waste']:.1%} | "
                     f"{r['tokens_per_row']:.1f} |")
    return "\n".join(lines)

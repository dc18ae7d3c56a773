"""The labelling job: stages built from a Config, run by Ray (or locally), committed per shard.

    stages.py     the ordered chain read -> decode -> infer -> encode -> write, a plain value,
                  each stage with its execution hints (memory, actor pool, blocks, batches)
    ray_graph.py  that chain as a Ray Data graph: the hints applied, the actor pool sized
    pool_watch.py the pool over time for the summary: its actors report to a per-run registry
    local.py      the same chain in one process (benchmarks, `depthray predict`)
    predictor.py  the inference stage: model loaded once, OOM fallback, hang watchdog
    inflight.py   crash/hang bookkeeping that survives the predictor's process
    checks.py     pre-run checks: input listing, path overlap, storage reachable
    ledger.py     the driver's shard ledger: commits a shard's manifest once its rows landed
    driver.py     run_job: list + resume, run, summary

Nothing here is imported by `depthray.job` itself, so `depthray status` (which needs only
checks.py) never loads Ray.
"""

"""The labelling job: stages built from a Config, run by Ray (or locally), committed per shard.

    stages.py     the ordered chain read -> decode -> infer -> encode -> write, a plain value
    ray_graph.py  that chain as a Ray Data graph (tasks, the autoscaling-free actor pool)
    local.py      the same chain in one process (benchmarks, `depthray predict`)
    predictor.py  the inference stage: model loaded once, OOM fallback, hang watchdog
    inflight.py   crash/hang bookkeeping that survives the predictor's process
    checks.py     pre-run checks: input listing, path overlap, storage reachable
    ledger.py     the driver's shard ledger: commits a shard's manifest once its rows landed
    driver.py     run_job: list + resume, run, summary

Nothing here is imported by `depthray.job` itself, so `depthray status` (which needs only
checks.py) never loads Ray.
"""

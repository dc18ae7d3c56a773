"""Where a job stands, read from its output alone: no Ray, nothing written.

The manifests are the commit records (depthray/io/manifest.py), so the input listing plus
`_manifest/` say exactly which shards are done; the manifests' counts say how many images
and errors they hold; `_jobs/` holds one summary per finished (or stopped) run, and
`_jobs/config.json` the output's one configuration (a config with other settings is
reported as `depthray run` would refuse it).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from depthray.config import Config, ConfigError
from depthray.io import output_config
from depthray.io.manifest import ManifestStore, why_not_done
from depthray.io.table import table_listing


def job_status(cfg: Config) -> dict[str, Any]:
    """Shards complete / to do, images and errors in complete shards, other configs, last run."""
    from depthray.job.checks import check_bucket, list_input_shards

    shards = list_input_shards(cfg)
    check_bucket(cfg.output.url, "output.url", cfg)  # a missing bucket is not "nothing done yet"
    store = ManifestStore(cfg.output.url, cfg.storage)
    try:
        listing = store.listing()
    except Exception as e:
        raise ConfigError(f"output.url {cfg.output.url!r}: cannot read it ({type(e).__name__}: {e})") from e
    listing = table_listing(cfg.output.url, cfg.storage, listing)  # a Delta output: listed files only
    committed = ManifestStore.names_in(listing)
    names = [s.name for s in shards]
    manifests = store.read_many([n for n in names if n in committed])
    # A manifest proves a shard done only with its parts in place (a deleted or truncated
    # part makes the next run redo the shard).
    damaged = {s.name: why for s in shards if s.name in manifests
               and (why := why_not_done(manifests[s.name], s, None, listing))}
    for name in damaged:
        manifests.pop(name)
    complete = [n for n in names if n in manifests]
    reasons: Counter = Counter()
    hashes: Counter = Counter()
    for m in manifests.values():
        reasons.update(m.get("error_reasons") or {})
        hashes[m.get("config_hash")] += 1
    # What `depthray run` would say of this config on this output (one configuration per
    # output: depthray/io/output_config.py), before it would start anything.
    record = output_config.recorded(store, listing)
    try:
        output_config.check(record, cfg, output_config.possible_kinds(cfg))
        refusal = None
    except ConfigError as e:
        refusal = str(e)
    this_hash = cfg.hash()
    # The job resolves dtype/device `auto` where its actors run: either kind is this config.
    these = {cfg.hash("cpu"), cfg.hash("cuda")}
    return {
        "input": cfg.input.url,
        "output": cfg.output.url,
        "shards": len(names),
        "shards_complete": len(complete),
        "shards_todo": [n for n in names if n not in manifests],
        "shards_damaged": damaged,
        "images": sum(int(m.get("outputs") or 0) for m in manifests.values()),
        "errors": sum(int(m.get("errors") or 0) for m in manifests.values()),
        "error_reasons": dict(reasons),
        "infer_seconds": round(sum(float(m.get("infer_seconds") or 0) for m in manifests.values()), 3),
        "config_hash": this_hash,
        # Shards labelled under other settings: a re-run skips them (delete their manifests,
        # or set output.overwrite, to relabel).
        "shards_other_config": {h: n for h, n in hashes.items() if h not in these},
        "output_config": None if record is None else {
            "config_hash": record.get("config_hash"), "hashes": record.get("hashes"), "refused": refusal},
        "manifests_not_in_input": sorted(committed - set(names)),
        "last_run": _last_run(store),
    }


def _last_run(store: ManifestStore) -> dict[str, Any] | None:
    runs = store.job_summaries()
    if not runs:
        return None
    s = store.read_job_summary(runs[-1])
    keep = ("run_id", "shards_complete", "shards_skipped", "shards_unfinished", "images", "errors",
            "images_per_second", "wall_seconds", "job_error", "config_hash")
    return {k: s.get(k) for k in keep} | {"runs": len(runs)}


def format_status(st: dict[str, Any]) -> str:
    todo = st["shards_todo"]
    lines = [
        f"input   {st['input']}: {st['shards']} shard(s)",
        f"output  {st['output']}: {st['shards_complete']} complete, {len(todo)} to do"
        + (f" ({', '.join(todo[:5])}{', ...' if len(todo) > 5 else ''})" if todo else ""),
        f"images  {st['images']} labelled, {st['errors']} error(s) in complete shards"
        + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(st["error_reasons"].items())) + ")"
           if st["error_reasons"] else ""),
    ]
    if st["shards_other_config"]:
        n = sum(st["shards_other_config"].values())
        lines.append(f"config  {n} complete shard(s) were labelled with other settings "
                     f"(config hash {', '.join(h or '?' for h in st['shards_other_config'])}; this config: "
                     f"{st['config_hash']}); a re-run skips them: set output.overwrite to relabel")
    if (st.get("output_config") or {}).get("refused"):
        lines.append(f"refused `depthray run` would stop before any work: {st['output_config']['refused']}")
    for name, why in sorted(st["shards_damaged"].items())[:5]:
        lines.append(f"damaged {name}: {why}; the next run redoes it")
    if st["manifests_not_in_input"]:
        lines.append(f"note    {len(st['manifests_not_in_input'])} manifest(s) for shards not in the input listing")
    run = st["last_run"]
    if run is None:
        lines.append("last run: none finished yet (no summary under _jobs/)")
    else:
        state = f"stopped early: {run['job_error']}" if run.get("job_error") else (
            f"{len(run.get('shards_unfinished') or {})} shard(s) unfinished" if run.get("shards_unfinished")
            else "finished")
        lines.append(f"last run {run['run_id']} ({run['runs']} run(s) in all): {run['shards_complete']} shard(s) "
                     f"done, {run['images']} images at {run['images_per_second']} images/s; {state}")
    lines.append("complete" if not todo else "re-run the same config to finish the remaining shards")
    return "\n".join(lines)

"""One configuration per output: `config.json` under `_jobs/`, written by the first run that labels.

It records the config hash and the settings behind it, with `model.device` and
`model.dtype` as they resolved (a CPU run labels in float32, a GPU run in bfloat16: other
depths). A run whose settings differ is refused before it touches anything, naming the
settings that differ, whatever shard names it brings, unless `output.overwrite: true`
(which makes its settings the output's). `output.allow_mixed_devices: true` accepts runs
that differ only in the device kind and the dtype it resolves to; each hash labelled under
it is listed in `hashes`.

`dtype`/`device: auto` resolve where the actors run, known once Ray is up. Before Ray the
check accepts a run if any device kind it may resolve to matches (`possible_kinds`: one kind
when `model.device` or `compute.num_gpus_per_actor` says, else both); `record` checks the
resolved kind again, once Ray is up and before any work, and writes the record.
"""

from __future__ import annotations

import json

from depthray.config import Config, ConfigError
from depthray.io.fs import join, write_atomic

CONFIG_FILE = "_jobs/config.json"
DEVICE_SETTINGS = ("model.device", "model.dtype")  # what differs between a CPU and a GPU run


def possible_kinds(cfg: Config) -> tuple[str, ...]:
    """The device kinds ("cpu", "cuda") this run's actors may turn out to use."""
    if cfg.model.device != "auto":
        return (cfg.model.device.split(":")[0],)
    if cfg.compute.num_gpus_per_actor is not None:
        return ("cuda" if cfg.compute.num_gpus_per_actor > 0 else "cpu",)
    return ("cpu", "cuda")


def config_difference(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every setting that differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def same_but_device(a: dict, b: dict) -> bool:
    strip = lambda s: {k: v for k, v in (s or {}).items() if k not in DEVICE_SETTINGS}  # noqa: E731
    return strip(a) == strip(b)


# `store` below is a depthray.io.manifest.ManifestStore (which imports this module).
def _path(store) -> str:
    return join(store.root, CONFIG_FILE)


def recorded(store, listing: dict[str, int]) -> dict | None:
    """The output's configuration: its record, else (an output labelled before records
    existed) the settings of its first manifest; None for an output nothing labelled yet."""
    try:
        return json.loads(store.fs.cat_file(_path(store)))
    except FileNotFoundError:
        pass
    names = sorted(store.names_in(listing))
    if not names:
        return None
    m = store.read_many(names[:1])[names[0]]
    settings = m.get("settings") or {}
    return {"config_hash": m.get("config_hash"), "settings": settings,
            "hashes": {m.get("config_hash"): settings.get("model.device")}}


def _accepts(record: dict, cfg: Config, kind: str) -> bool:
    if cfg.hash(kind) in (record.get("hashes") or {record.get("config_hash"): None}):
        return True
    return cfg.output.allow_mixed_devices and same_but_device(record.get("settings"), cfg.settings(kind))


def check(record: dict | None, cfg: Config, kinds: tuple[str, ...]) -> None:
    """Refuse (ConfigError) a run none of whose device kinds gives the output's settings."""
    if record is None or cfg.output.overwrite or any(_accepts(record, cfg, k) for k in kinds):
        return
    settings = record.get("settings") or {}
    kind = settings.get("model.device") if settings.get("model.device") in kinds else kinds[0]
    diff = config_difference(settings, cfg.settings(kind))
    devices_only = same_but_device(settings, cfg.settings(kind))
    raise ConfigError(
        f"output.url {cfg.output.url!r} holds labels made with other settings "
        f"({'; '.join(diff) if diff else 'config hash ' + str(record.get('config_hash'))}); one "
        "configuration per output. Use another output, or set output.overwrite: true to relabel it"
        + (", or output.allow_mixed_devices: true to add labels made on the other kind of device"
           if devices_only else "") + ".")


def record(store, cfg: Config, kind: str, run_id: str) -> None:
    """Once Ray has resolved the device kind, before any work: check again with it, and
    write the record (first run, or an overwrite with other settings) or add this hash."""
    listing = store.listing()
    current = recorded(store, listing)
    check(current, cfg, (kind,))
    h = cfg.hash(kind)
    if current is None or (cfg.output.overwrite and h != current.get("config_hash")):
        current = {"config_hash": h, "settings": cfg.settings(kind), "hashes": {}, "run_id": run_id}
    elif h in (current.get("hashes") or {}) and store.fs.exists(_path(store)):
        return  # already recorded
    current.setdefault("hashes", {})[h] = cfg.settings(kind)["model.device"]  # an explicit device wins
    write_atomic(store.fs, _path(store), json.dumps(current, indent=1, sort_keys=True).encode())

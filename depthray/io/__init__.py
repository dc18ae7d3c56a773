"""Storage I/O: shard listing and readers (sources), image decoding, depth codecs, part
writers (sinks) and the per-shard manifest that makes jobs resumable."""

"""Ray job entry point: predict depth for every shard a config names.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python pipelines/depth_job.py configs/s3_webdataset.yaml [--set key=value ...]

`depthray submit CONFIG` does the same with the config validated locally first. The job
joins the cluster it runs on, skips shards already complete (their `_manifest/` entry),
and exits 1 if any shard is left unfinished, so a re-submission resumes the rest.
"""

import sys

from depthray.pipeline import main

if __name__ == "__main__":
    sys.exit(main())

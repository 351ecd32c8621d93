"""Ray job entry point: run `posedata build` on an existing Ray cluster.

    ray job submit --address http://<head>:8265 --runtime-env-json '{"pip": ["posedata"]}' -- \
        python pipelines/build_dataset.py deepfashion --root /data/DeepFashion \
        --out s3://team-bucket/deepfashion --res 512x352

Arguments are those of `posedata build`; `--address auto` is added so the job joins the
cluster it was submitted to instead of starting a local Ray.
"""

import sys

from posedata.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]
    main(["build", *args])

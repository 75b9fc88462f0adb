"""Scale-out: cut a video at keyframes into segments that any worker can upscale, join them losslessly.

`segments` holds the Ray-free parts (plan, per-segment pipeline run, join, work folder with resume);
`ray_runner` runs segment and whole-file tasks on a Ray cluster; `batch` upscales every video of a folder.
Only `ray_runner` imports Ray, and only the `--ray` paths import `ray_runner`, so Ray stays optional.
"""

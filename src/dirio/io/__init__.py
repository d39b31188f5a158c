"""Files in and out: images with their affines (NIfTI with a verified gzip stream, SimpleITK formats),
Learn2Reg and ITK displacement fields, CSV keypoints, Learn2Reg dataset JSON, network checkpoints,
atomic writes with overwrite checks and output-folder locks, and the manifests of what earlier dirio
commands wrote into a folder (what ``--overwrite`` may replace)."""
